"""Seccomp policy files in minijail's syntax, parsed into rules (`seccomp.py` compiles them).

A policy has one line per system call a device process may make:

    read: 1                                   always allowed
    fcntl: arg1 == F_GETFL || arg1 == F_SETFL allowed when the expression holds
    ioctl: arg1 == FIONBIO; return ENOTTY     allowed when it holds, else fails with ENOTTY
    uname: return EPERM                       never made; fails with EPERM (not a kill)
    @include common.policy                    another file's lines (relative to this file)

An expression is alternatives joined by `||`, each a conjunction of comparisons joined by `&&`;
a comparison is `argN OP VALUE` with OP one of == != < <= > >= and `in` (`arg2 in MASK`: no bit
outside MASK is set). VALUE is a number (decimal, 0x hex, 0 octal) or named constants joined by
`|`. A call without a line, or whose expression fails without a `return`, kills the process.

Every error names the file and line:
`seccomp/x86_64/block_device.policy:12: unknown constant F_GETFX`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_INCLUDE_DEPTH = 8
ARG_COUNT = 6  # system calls take at most six arguments
U64_MASK = (1 << 64) - 1


class PolicyError(Exception):
    """A policy file that cannot be read or parsed; the message starts with `file:line:`."""


class Op(enum.Enum):
    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"


@dataclass(frozen=True)
class Comparison:
    arg: int
    op: Op
    value: int


Conjunction = tuple[Comparison, ...]


@dataclass(frozen=True)
class Rule:
    """What a policy says of one system call."""

    syscall: str
    where: str  # "file:line", for errors found later (an unknown system call, say)
    # None: always allowed; otherwise allowed when any one conjunction holds (empty: never).
    allowed_when: tuple[Conjunction, ...] | None
    # The errno returned when the call is not allowed; None: the process is killed.
    errno_otherwise: int | None = None


@dataclass
class Policy:
    rules: dict[str, Rule] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # every file read, includes too


_SYSCALL = re.compile(r"[a-z_][a-z0-9_]*")
_COMPARISON = re.compile(r"arg(\d+)\s*(==|!=|<=|>=|<|>|\bin\b)\s*(.+)")
_RETURN = re.compile(r"return\s+(\S+)")


def load_policy(
    path: Path, constant: Callable[[str], int | None], errno_of: Callable[[str], int | None]
) -> Policy:
    """Parse the policy file at `path`. `constant` resolves a named constant (None: unknown);
    `errno_of` resolves an errno name such as EPERM."""
    policy = Policy()
    _read_file(path, policy, constant, errno_of, [], "seccomp policy")
    return policy


def _read_file(
    path: Path,
    policy: Policy,
    constant: Callable[[str], int | None],
    errno_of: Callable[[str], int | None],
    chain: list[Path],
    where: str,
) -> None:
    """Add the rules of the file at `path`; `where` names what asked for it (for errors)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(f"{where}: cannot read {path}: {reason}") from None
    policy.files.append(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        if line.startswith("@"):
            _directive(line, where, path, policy, constant, errno_of, chain)
            continue
        rule = parse_rule(line, where, constant, errno_of)
        earlier = policy.rules.get(rule.syscall)
        if earlier is not None:
            raise PolicyError(f"{where}: {rule.syscall} is already given at {earlier.where}")
        policy.rules[rule.syscall] = rule


def _directive(
    line: str,
    where: str,
    path: Path,
    policy: Policy,
    constant: Callable[[str], int | None],
    errno_of: Callable[[str], int | None],
    chain: list[Path],
) -> None:
    word, _, rest = line.partition(" ")
    if word != "@include":
        raise PolicyError(f"{where}: unknown directive {word} (only @include is known)")
    target = rest.strip()
    if not target:
        raise PolicyError(f"{where}: @include needs a file name")
    included = (path.parent / target).resolve()
    if included in chain or included == path.resolve():
        raise PolicyError(f"{where}: @include {target} includes itself")
    if len(chain) >= MAX_INCLUDE_DEPTH:
        raise PolicyError(f"{where}: @include nested more than {MAX_INCLUDE_DEPTH} deep")
    _read_file(included, policy, constant, errno_of, [*chain, path.resolve()], where)


def parse_rule(
    line: str,
    where: str,
    constant: Callable[[str], int | None],
    errno_of: Callable[[str], int | None],
) -> Rule:
    """One `syscall: ...` line (comment already removed)."""
    name, colon, body = line.partition(":")
    name = name.strip()
    if not colon:
        raise PolicyError(f"{where}: expected 'syscall: expression', got {line!r}")
    if not _SYSCALL.fullmatch(name):
        raise PolicyError(f"{where}: {name!r} is not a system call name")
    expression, semicolon, action = (part.strip() for part in body.partition(";"))
    if not expression:
        raise PolicyError(f"{where}: {name} has no expression (use 1 to allow it always)")
    if semicolon and not action:
        raise PolicyError(f"{where}: nothing after ';' (expected 'return ERRNO')")
    returned = _return(expression, where, errno_of)
    if returned is not None:
        if semicolon:
            raise PolicyError(f"{where}: 'return' must be the last part of the line")
        return Rule(name, where, (), returned)
    errno_otherwise = None
    if semicolon:
        errno_otherwise = _return(action, where, errno_of)
        if errno_otherwise is None:
            raise PolicyError(f"{where}: after ';' expected 'return ERRNO', got {action!r}")
    if expression == "1":
        if errno_otherwise is not None:
            raise PolicyError(f"{where}: {name}: 1 allows every call; the return is never used")
        return Rule(name, where, None)
    alternatives = tuple(
        _conjunction(part.strip(), where, constant) for part in expression.split("||")
    )
    return Rule(name, where, alternatives, errno_otherwise)


def _return(text: str, where: str, errno_of: Callable[[str], int | None]) -> int | None:
    match = _RETURN.fullmatch(text)
    if match is None:
        return None
    value = errno_of(match.group(1))
    if value is None:
        raise PolicyError(f"{where}: unknown errno {match.group(1)}")
    return value


def _conjunction(text: str, where: str, constant: Callable[[str], int | None]) -> Conjunction:
    comparisons = []
    seen: set[int] = set()
    for part in text.split("&&"):
        part = part.strip()
        match = _COMPARISON.fullmatch(part)
        if match is None:
            raise PolicyError(f"{where}: expected 'argN OP VALUE', got {part!r}")
        arg = int(match.group(1))
        if arg >= ARG_COUNT:
            raise PolicyError(f"{where}: arg{arg}: system calls have arg0 to arg{ARG_COUNT - 1}")
        if arg in seen:  # libseccomp compares each argument once per rule
            raise PolicyError(f"{where}: arg{arg} is compared twice in {text!r}")
        seen.add(arg)
        comparisons.append(
            Comparison(arg, Op(match.group(2)), _value(match.group(3), where, constant))
        )
    return tuple(comparisons)


def _value(text: str, where: str, constant: Callable[[str], int | None]) -> int:
    value = 0
    for term in text.split("|"):
        term = term.strip()
        number = _number(term)
        if number is None:
            number = constant(term)
            if number is None:
                raise PolicyError(f"{where}: unknown constant {term!r}")
        if not -(1 << 63) <= number <= U64_MASK:
            raise PolicyError(f"{where}: {term} does not fit in 64 bits")
        value |= number & U64_MASK  # a negative number is its two's complement, as in a register
    return value


def _number(term: str) -> int | None:
    if not term or term.startswith(("+", "_")) or "_" in term:
        return None  # int() would accept "1_000" and "+1"; a policy has no use for them
    if term.startswith("-"):
        magnitude = _number(term[1:])
        return None if magnitude is None else -magnitude
    try:
        if term.startswith(("0x", "0X")):
            return int(term, 16)
        if len(term) > 1 and term.startswith("0"):
            return int(term, 8)
        return int(term, 10)
    except ValueError:
        return None
