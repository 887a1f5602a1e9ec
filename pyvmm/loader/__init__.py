"""Kernel loading: detect the image format by content and load it into guest memory.

`load_kernel` is the entry point; `elf` and `bzimage` hold the two formats, `bootparams` the
Linux boot protocol's structures, `initrd` and `cmdline` the other things the boot contract places
in guest RAM (DESIGN.md, "Boot contract"). The helpers here (opening an image, reading it straight
into guest RAM, checking a range is RAM) are shared by those modules.

The loader knows file formats, not a machine: the architecture hands it a `LoadArea` saying where
in guest-physical memory a kernel and an initrd may go.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyvmm.files import FileKindError, open_file
from pyvmm.loader.errors import (
    CmdlineError,
    InitrdError,
    KernelFileError,
    KernelLoadError,
    KernelOutsideRamError,
    KernelTooLargeError,
    NotAKernelError,
)
from pyvmm.memory import MAX_MEM_MIB, GuestMemory

MiB = 1 << 20
# Bytes read at most per preadv() when copying a file into guest RAM.
READ_CHUNK = 16 * MiB
# Enough of the file to recognise either format (the bzImage setup header starts at 0x1f1).
DETECT_SIZE = 0x1000

__all__ = [
    "CmdlineError",
    "InitrdError",
    "KernelImage",
    "KernelLoadError",
    "LoadArea",
    "build_cmdline",
    "load_initrd",
    "load_kernel",
    "write_cmdline",
]


@dataclass(frozen=True)
class LoadArea:
    """Where, in an architecture's guest-physical map, a kernel and an initrd may lie."""

    floor: int
    """The lowest address either may use."""
    below_floor: str
    """What the VMM keeps below `floor`, for error messages."""
    hole_start: int
    """[hole_start, hole_end) is never RAM; RAM past hole_start continues at hole_end."""
    hole_end: int
    hole_name: str
    """What the hole is, for error messages (x86: "the PCI hole")."""


@dataclass(frozen=True)
class KernelImage:
    """Where a loaded kernel lies in guest memory and what it tells the boot code."""

    entry: int
    """Guest-physical address where vCPU 0 starts in 64-bit mode."""
    load_start: int
    """Lowest guest-physical byte the kernel occupies."""
    load_end: int
    """One past the highest byte the kernel occupies (BSS, or init_size for a bzImage)."""
    setup_header: bytes | None
    """bzImage: the raw setup header (file offset 0x1f1 to its end) for the zero page; ELF: None."""
    cmdline_max: int
    """Longest command line the kernel accepts, without the terminating NUL."""
    initrd_addr_max: int
    """Highest address the last byte of an initrd may be at."""
    kind: str
    """"elf" or "bzImage"."""


def load_kernel(mem: GuestMemory, path: str, area: LoadArea) -> KernelImage:
    """Load the ELF vmlinux or bzImage at `path` into `mem`, inside `area`; the format is
    detected by content."""
    label = f"kernel {path}"
    fd = open_image(path, label, KernelFileError)
    try:
        head = read_head(fd, DETECT_SIZE, label, KernelFileError)
        if is_elf(head):
            return load_elf(mem, fd, path, area)
        if is_bzimage(head):
            return load_bzimage(mem, fd, path, area)
        raise NotAKernelError(f"{label}: neither an ELF vmlinux nor a bzImage")
    finally:
        os.close(fd)


def open_image(path: str, label: str, error: type[Exception]) -> int:
    """Open a regular file read-only, never blocking (a FIFO is refused, not waited on); OS
    errors and other kinds of file become `error` with a message naming `label`."""
    try:
        return open_file(path)
    except OSError as exc:
        raise error(f"{label}: {describe_os_error(exc)}") from exc
    except FileKindError as exc:
        raise error(f"{label}: {exc}") from exc


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read: {exc.strerror or exc}"


def file_size(fd: int, label: str, error: type[Exception]) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise error(f"{label}: {describe_os_error(exc)}") from exc


def read_head(fd: int, length: int, label: str, error: type[Exception]) -> bytes:
    """Up to `length` bytes from the start of the file (fewer if the file is shorter)."""
    try:
        return os.pread(fd, length, 0)
    except OSError as exc:
        raise error(f"{label}: {describe_os_error(exc)}") from exc


def read_into_guest(
    fd: int,
    mem: GuestMemory,
    addr: int,
    length: int,
    offset: int,
    label: str,
    error: type[Exception],
) -> int:
    """Read file bytes [offset, offset+length) straight into guest RAM at `addr`, in place.

    Returns how many bytes were read: less than `length` only if the file ends first.
    """
    done = 0
    while done < length:
        n = min(READ_CHUNK, length - done)
        try:
            got = os.preadv(fd, [mem.view(addr + done, n)], offset + done)
        except OSError as exc:
            raise error(f"{label}: {describe_os_error(exc)}") from exc
        if got == 0:
            break
        done += got
    return done


def format_mib(n: int) -> str:
    """`n` bytes as MiB, rounded up to a whole MiB."""
    return f"{-(-n // MiB)} MiB"


def format_size(n: int) -> str:
    """`n` bytes in the largest unit that leaves at least 1 of it: "512 bytes", "9.8 KiB",
    "64 MiB", "1.5 GiB" (one decimal unless whole)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} byte{'' if n == 1 else 's'}"


def ram_needed_for(end: int, area: LoadArea) -> int:
    """The smallest -m (in bytes) whose RAM covers guest-physical addresses below `end`."""
    if end <= area.hole_start:
        return end
    return end - area.hole_end + area.hole_start


def check_kernel_ram(
    mem: GuestMemory, area: LoadArea, start: int, end: int, label: str, what: str
) -> None:
    """Raise unless guest RAM holds [start, end); the error says how to fix it."""
    if end <= start or mem.is_ram(start, end - start):
        return
    if start < area.hole_start < end or area.hole_start <= start < area.hole_end:
        raise KernelOutsideRamError(
            f"{label}: {what} [{start:#x}, {end:#x}) reaches into {area.hole_name} "
            f"[{area.hole_start:#x}, {area.hole_end:#x}), which is never RAM"
        )
    needed = ram_needed_for(end, area)
    if needed > MAX_MEM_MIB * MiB:
        raise KernelTooLargeError(
            f"{label}: {what} [{start:#x}, {end:#x}) needs RAM up to {format_mib(needed)}, more "
            f"than the largest -m/--mem ({MAX_MEM_MIB} MiB)"
        )
    raise KernelTooLargeError(
        f"{label}: {what} [{start:#x}, {end:#x}) needs RAM up to {format_mib(needed)}"
        f" but -m/--mem gives {mem.size // MiB} MiB; raise -m"
    )


# The submodules import KernelImage and the helpers above from this package, so they come last.
from pyvmm.loader.bzimage import is_bzimage, load_bzimage  # noqa: E402
from pyvmm.loader.cmdline import build_cmdline, write_cmdline  # noqa: E402
from pyvmm.loader.elf import is_elf, load_elf  # noqa: E402
from pyvmm.loader.initrd import load_initrd  # noqa: E402
