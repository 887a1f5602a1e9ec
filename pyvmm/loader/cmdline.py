"""The kernel command line: built from the defaults and every -p, written NUL-terminated."""

from __future__ import annotations

from pyvmm.loader.errors import CmdlineCharacterError, CmdlineTooLongError
from pyvmm.memory import GuestMemory

# Printable ASCII: the only bytes pyvmm puts on a command line.
FIRST_PRINTABLE = 0x20
LAST_PRINTABLE = 0x7E


def build_cmdline(base: str, params: list[str]) -> str:
    """`base` followed by each of `params` (from -p/--params), separated by single spaces."""
    return " ".join(part for part in (base, *params) if part)


def check_cmdline(cmdline: str, max_len: int) -> None:
    """Raise unless `cmdline` is printable ASCII of at most `max_len` bytes."""
    for pos, char in enumerate(cmdline):
        if not FIRST_PRINTABLE <= ord(char) <= LAST_PRINTABLE:
            kind = "non-ASCII" if ord(char) > LAST_PRINTABLE + 1 else "control"
            raise CmdlineCharacterError(
                f"kernel command line has a {kind} character {char!r} at byte {pos}; expected "
                "printable ASCII (check -p)"
            )
    if len(cmdline) > max_len:
        raise CmdlineTooLongError(
            f"kernel command line is {len(cmdline)} bytes; this kernel accepts at most {max_len} "
            "(check -p)"
        )


def write_cmdline(mem: GuestMemory, addr: int, cmdline: str, max_len: int) -> None:
    """Check `cmdline` and write it NUL-terminated at guest address `addr`."""
    check_cmdline(cmdline, max_len)
    mem.write(addr, cmdline.encode("ascii") + b"\0")
