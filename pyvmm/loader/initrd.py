"""Initrd placement: page-aligned, as high in low RAM as the kernel allows, clear of the kernel."""

from __future__ import annotations

import os

from pyvmm.loader import (
    KernelImage,
    LoadArea,
    MiB,
    file_size,
    format_size,
    open_image,
    read_into_guest,
)
from pyvmm.loader.errors import (
    InitrdEmptyError,
    InitrdFileError,
    InitrdTooLargeError,
    InitrdTruncatedError,
)
from pyvmm.memory import PAGE_SIZE, GuestMemory


def _align_down(value: int, align: int) -> int:
    return value - value % align


def place_initrd(size: int, kernel: KernelImage, low_ram_end: int, floor: int) -> int | None:
    """The highest page-aligned address for `size` bytes of initrd, or None if none fits.

    The initrd ends at or below both `low_ram_end` and the kernel's initrd_addr_max, starts at or
    at or above `floor`, and does not overlap the kernel.
    """
    top = min(low_ram_end, kernel.initrd_addr_max + 1)
    # Above the kernel first, then below it.
    for limit in (top, min(top, kernel.load_start)):
        addr = _align_down(limit - size, PAGE_SIZE)
        overlaps = addr < kernel.load_end and kernel.load_start < addr + size
        if addr >= floor and not overlaps:
            return addr
    return None


def _too_large_message(
    path: str, size: int, kernel: KernelImage, low_ram_end: int, mem: GuestMemory, area: LoadArea
) -> str:
    where = f"beside the kernel at [{kernel.load_start:#x}, {kernel.load_end:#x})"
    addr_limit = kernel.initrd_addr_max + 1
    if addr_limit < low_ram_end:
        return (
            f"initrd {path} ({format_size(size)}) does not fit below {addr_limit:#x} (the "
            f"kernel's initrd_addr_max) {where}; use a smaller initrd"
        )
    if low_ram_end >= area.hole_start:
        return (
            f"initrd {path} ({format_size(size)}) does not fit below {format_size(low_ram_end)} "
            f"(where {area.hole_name} starts; a larger -m adds RAM only above "
            f"{format_size(area.hole_end)}) {where}; use a smaller initrd"
        )
    return (
        f"initrd {path} ({format_size(size)}) does not fit below {format_size(low_ram_end)} "
        f"{where} with -m {mem.size // MiB}; raise -m"
    )


def load_initrd(
    mem: GuestMemory, path: str, kernel: KernelImage, low_ram_end: int, area: LoadArea
) -> tuple[int, int]:
    """Load the initrd at `path` into `mem`, in `area` below `low_ram_end`; returns its (guest
    address, size)."""
    label = f"initrd {path} (-i/--initrd)"
    fd = open_image(path, label, InitrdFileError)
    try:
        size = file_size(fd, label, InitrdFileError)
        if size == 0:
            raise InitrdEmptyError(f"{label}: the file is empty; expected a cpio archive")
        addr = place_initrd(size, kernel, low_ram_end, area.floor)
        if addr is None or not mem.is_ram(addr, size):
            raise InitrdTooLargeError(
                _too_large_message(path, size, kernel, low_ram_end, mem, area)
            )
        got = read_into_guest(fd, mem, addr, size, 0, label, InitrdFileError)
        if got != size:
            raise InitrdTruncatedError(
                f"{label}: the file shrank while being read: expected {size} bytes, read {got}"
            )
        return addr, size
    finally:
        os.close(fd)
