"""Policy files in minijail's syntax: what each line means, and a one-line error naming file and
line for each malformed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.sandbox.policy import Comparison, Op, PolicyError, Rule, load_policy, parse_rule
from pyvmm.sandbox.seccomp import constant, errno_value


def rule(line: str) -> Rule:
    return parse_rule(line, "p.policy:1", constant, errno_value)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_one_allows_every_call() -> None:
    assert rule("read: 1") == Rule("read", "p.policy:1", None)


def test_alternatives_of_conjunctions_with_named_and_or_ed_constants() -> None:
    parsed = rule("mmap: arg2 == PROT_READ|PROT_WRITE && arg3 != 0x10 || arg0 == 0")
    assert parsed.allowed_when == (
        (Comparison(2, Op.EQ, 3), Comparison(3, Op.NE, 16)),
        (Comparison(0, Op.EQ, 0),),
    )
    assert parsed.errno_otherwise is None


def test_every_operator_and_number_base() -> None:
    parsed = rule("x: arg0 < 8 && arg1 <= 010 && arg2 > 0x8 && arg3 >= 8 && arg4 in 0xf")
    ops = [(c.op, c.value) for c in (parsed.allowed_when or [()])[0]]
    assert ops == [(Op.LT, 8), (Op.LE, 8), (Op.GT, 8), (Op.GE, 8), (Op.IN, 15)]


def test_a_negative_number_is_its_64_bit_twos_complement() -> None:
    parsed = rule("openat: arg0 == AT_FDCWD")
    assert parsed.allowed_when == ((Comparison(0, Op.EQ, (1 << 64) - 100),),)


def test_return_after_an_expression_and_alone() -> None:
    assert rule("fcntl: arg1 == F_GETFL; return EPERM").errno_otherwise == 1
    alone = rule("uname: return ENOSYS")
    assert alone.allowed_when == ()
    assert alone.errno_otherwise == 38


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("read", "expected 'syscall: expression'"),
        ("Read: 1", "'Read' is not a system call name"),
        ("read:", "read has no expression"),
        ("read: 1;", "nothing after ';'"),
        ("read: 1; return EPERM", "1 allows every call"),
        ("read: arg0 == 1; kill", "expected 'return ERRNO'"),
        ("read: return EBOGUS", "unknown errno EBOGUS"),
        ("read: return EPERM; return EPERM", "'return' must be the last part"),
        ("read: arg6 == 1", "arg6: system calls have arg0 to arg5"),
        ("read: arg0 == 1 && arg0 == 2", "arg0 is compared twice"),
        ("read: arg0 = 1", "expected 'argN OP VALUE'"),
        ("read: arg0 & 1", "expected 'argN OP VALUE'"),
        ("read: arg0 == F_GETFX", "unknown constant 'F_GETFX'"),
        ("read: arg0 == 1_000", "unknown constant '1_000'"),
        ("read: arg0 == 0x10000000000000000", "does not fit in 64 bits"),
    ],
)
def test_malformed_lines_are_one_line_errors_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = write(tmp_path, "dev.policy", f"# a comment\n\nwrite: 1\n{line}  # why\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path, constant, errno_value)
    text = str(info.value)
    assert text.startswith(f"{path}:4: ")
    assert message in text
    assert "\n" not in text


def test_includes_are_relative_to_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path, "common.policy", "read: 1\n@include sub/more.policy\n")
    write(tmp_path / "sub", "more.policy", "close: 1\n")
    path = write(tmp_path, "dev.policy", "@include common.policy\nwrite: 1\n")
    policy = load_policy(path, constant, errno_value)
    assert sorted(policy.rules) == ["close", "read", "write"]
    assert policy.rules["close"].where == f"{(tmp_path / 'sub' / 'more.policy').resolve()}:1"


def test_a_call_given_twice_names_both_places(tmp_path: Path) -> None:
    common = write(tmp_path, "common.policy", "read: 1\n")
    path = write(tmp_path, "dev.policy", "@include common.policy\nread: 1\n")
    with pytest.raises(PolicyError, match=rf"^{path}:2: read is already given at {common}:1$"):
        load_policy(path, constant, errno_value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("@include\n", "@include needs a file name"),
        ("@include missing.policy\n", "cannot read"),
        ("@include dev.policy\n", "includes itself"),
        ("@frequency f.txt\n", "unknown directive @frequency"),
    ],
)
def test_bad_directives(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "dev.policy", text)
    with pytest.raises(PolicyError, match=message) as info:
        load_policy(path, constant, errno_value)
    assert str(info.value).startswith(f"{path}:1:")


def test_an_include_loop_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.policy", "@include b.policy\n")
    write(tmp_path, "b.policy", "@include a.policy\n")
    with pytest.raises(PolicyError, match="includes itself"):
        load_policy(tmp_path / "a.policy", constant, errno_value)


def test_a_missing_policy_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=f"cannot read {tmp_path}/none.policy: No such file"):
        load_policy(tmp_path / "none.policy", constant, errno_value)
