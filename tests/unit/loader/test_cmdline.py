"""Kernel command line: building from -p, checking, writing NUL-terminated."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.loader.cmdline import build_cmdline, write_cmdline
from pyvmm.loader.errors import CmdlineCharacterError, CmdlineTooLongError
from pyvmm.memory import GuestMemory

ADDR = 0x20000


def test_build_joins_with_spaces() -> None:
    assert build_cmdline("console=ttyS0 reboot=k", ["root=/dev/vda ro", "quiet"]) == (
        "console=ttyS0 reboot=k root=/dev/vda ro quiet"
    )
    assert build_cmdline("", ["a", "", "b"]) == "a b"
    assert build_cmdline("base", []) == "base"


def test_write_is_nul_terminated(mem: GuestMemory) -> None:
    write_cmdline(mem, ADDR, "console=ttyS0", 2047)
    assert mem.read(ADDR, 14) == b"console=ttyS0\0"


def test_exactly_max_len_fits(mem: GuestMemory) -> None:
    write_cmdline(mem, ADDR, "a" * 16, 16)
    assert mem.read(ADDR, 17) == b"a" * 16 + b"\0"


def test_too_long(mem: GuestMemory) -> None:
    with pytest.raises(CmdlineTooLongError) as exc:
        write_cmdline(mem, ADDR, "a" * 17, 16)
    assert str(exc.value) == (
        "kernel command line is 17 bytes; this kernel accepts at most 16 (check -p)"
    )
    assert mem.read_u8(ADDR) == 0xFF  # nothing written


@pytest.mark.parametrize(
    ("text", "kind"),
    [("a\0b", "control"), ("a\nb", "control"), ("a\x7fb", "control"), ("caf\u00e9", "non-ASCII")],
)
def test_rejects_bad_characters(mem: GuestMemory, text: str, kind: str) -> None:
    with pytest.raises(CmdlineCharacterError, match=rf"has a {kind} character .*\(check -p\)"):
        write_cmdline(mem, ADDR, text, 2047)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300))
def test_printable_ascii_round_trips(text: str) -> None:
    mem = GuestMemory([(0, 0x40000)])
    try:
        write_cmdline(mem, ADDR, text, 300)
        assert mem.read(ADDR, len(text) + 1) == text.encode() + b"\0"
    finally:
        mem.close()
