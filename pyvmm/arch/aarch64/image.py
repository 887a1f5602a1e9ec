"""The arm64 kernel `Image` (Linux's Documentation/arch/arm64/booting.rst) and the initrd.

The Image starts with a 64-byte header: code, then text_offset (where the Image goes past a
2 MiB-aligned base), image_size (the memory it needs from there, BSS included), flags (bit 0:
big-endian; bits 1-2: page size; bit 3: may be placed anywhere, not only near the start of RAM)
and the magic "ARM\\x64" at 0x38. pyvmm puts the base at the start of RAM, which satisfies both
placement rules, and enters at the first byte of the Image.
"""

from __future__ import annotations

import enum
import os
from typing import Any

from pyvmm.cdecl import declare, struct_for
from pyvmm.loader import (
    DETECT_SIZE,
    KernelImage,
    MiB,
    file_size,
    format_size,
    open_image,
    read_head,
    read_into_guest,
)
from pyvmm.loader.bzimage import is_bzimage
from pyvmm.loader.elf import is_elf
from pyvmm.loader.errors import (
    InitrdEmptyError,
    InitrdFileError,
    InitrdTooLargeError,
    InitrdTruncatedError,
    KernelFileError,
    KernelLoadError,
    KernelTooLargeError,
    KernelTruncatedError,
    NotAKernelError,
)
from pyvmm.loader.initrd import place_initrd
from pyvmm.memory import GuestMemory

ffi: Any = declare(
    "arm64_image",
    """
    struct arm64_image_header {
        uint32_t code0;
        uint32_t code1;
        uint64_t text_offset;
        uint64_t image_size;
        uint64_t flags;
        uint64_t res2;
        uint64_t res3;
        uint64_t res4;
        uint32_t magic;
        uint32_t res5;
    };
    """,
)

HEADER_SIZE: int = ffi.sizeof("struct arm64_image_header")
MAGIC = int.from_bytes(b"ARM\x64", "little")
# The base the Image is placed past must be 2 MiB-aligned.
BASE_ALIGN = 2 * MiB
# arm64's COMMAND_LINE_SIZE, the terminating NUL included.
CMDLINE_SIZE = 2048
# The initrd must lie inside a 1 GiB-aligned window of at most 32 GiB that holds the kernel too.
INITRD_WINDOW_ALIGN = 1 << 30
INITRD_WINDOW_SIZE = 32 << 30
# What other kernels look like, for a useful refusal.
GZIP_MAGIC = b"\x1f\x8b"
ZBOOT_MAGIC = b"zimg"  # an EFI zboot image: MZ header, "zimg" at offset 4


class Flag(enum.IntFlag):
    """arm64_image_header.flags."""

    BIG_ENDIAN = 1 << 0
    PAGE_SIZE_MASK = 3 << 1
    PHYS_BASE_ANYWHERE = 1 << 3


_HEADER = struct_for(
    ffi, "struct arm64_image_header", "text_offset", "image_size", "flags", "magic"
)
_HEADER_START: int = ffi.offsetof("struct arm64_image_header", "text_offset")


class ImageHeaderError(KernelLoadError):
    """The Image header says something pyvmm cannot boot (big-endian, no image_size)."""


def _what_else(head: bytes) -> str:
    """What a file without the Image magic is instead, said for the error."""
    if is_elf(head):
        return "an ELF file (a vmlinux?); on arm64 pyvmm boots an Image (arch/arm64/boot/Image)"
    if is_bzimage(head):
        return "an x86 bzImage, not an arm64 Image"
    if head.startswith(GZIP_MAGIC):
        return "gzip-compressed (Debian's vmlinuz); decompress it first: zcat vmlinuz > Image"
    if head[4:8] == ZBOOT_MAGIC:
        return "an EFI zboot image (compressed); pyvmm needs the plain Image inside it"
    return 'not an arm64 Image: no "ARM\\x64" magic at offset 0x38'


def parse_header(head: bytes, label: str) -> tuple[int, int, int]:
    """(text_offset, image_size, flags) of the Image whose first bytes are `head`."""
    if len(head) < HEADER_SIZE:
        if is_elf(head) or is_bzimage(head) or head.startswith(GZIP_MAGIC):
            raise NotAKernelError(f"{label}: {_what_else(head)}")
        raise NotAKernelError(f"{label}: {len(head)} bytes, shorter than an arm64 Image header")
    text_offset, image_size, flags, magic = _HEADER.unpack_from(head, _HEADER_START)
    if magic != MAGIC:
        raise NotAKernelError(f"{label}: {_what_else(head)}")
    if flags & Flag.BIG_ENDIAN:
        raise ImageHeaderError(f"{label}: a big-endian kernel; pyvmm runs little-endian guests")
    if image_size == 0:
        raise ImageHeaderError(
            f"{label}: image_size is 0 (a kernel older than Linux 3.17, whose header does not say "
            "how much memory it needs); pyvmm boots Linux 3.17 or later"
        )
    return text_offset, image_size, flags


def load_image(mem: GuestMemory, path: str) -> KernelImage:
    """Load the Image at `path` at the start of `mem`'s RAM (a 2 MiB-aligned base) plus its
    text_offset."""
    label = f"kernel {path}"
    fd = open_image(path, label, KernelFileError)
    try:
        head = read_head(fd, DETECT_SIZE, label, KernelFileError)
        text_offset, image_size, _ = parse_header(head, label)
        size = file_size(fd, label, KernelFileError)
        if size > image_size:
            raise ImageHeaderError(
                f"{label}: the file ({size} bytes) is larger than its header's image_size "
                f"({image_size} bytes)"
            )
        ram = mem.ram_regions[0]
        if ram.guest_addr % BASE_ALIGN:
            raise ValueError(f"RAM at {ram.guest_addr:#x} is not 2 MiB-aligned")
        start = ram.guest_addr + text_offset
        end = start + image_size
        if end > ram.end:
            raise KernelTooLargeError(
                f"{label}: the Image needs {format_size(text_offset + image_size)} from the "
                f"start of RAM (text_offset {text_offset:#x} + image_size {image_size:#x}) but "
                f"-m/--mem gives {mem.size // MiB} MiB; raise -m"
            )
        got = read_into_guest(fd, mem, start, size, 0, label, KernelFileError)
        if got != size:
            raise KernelTruncatedError(
                f"{label}: the file shrank while being read: expected {size} bytes, read {got}"
            )
    finally:
        os.close(fd)
    window = start - start % INITRD_WINDOW_ALIGN
    return KernelImage(
        entry=start,
        load_start=start,
        load_end=end,
        setup_header=None,
        cmdline_max=CMDLINE_SIZE - 1,
        initrd_addr_max=window + INITRD_WINDOW_SIZE - 1,
        kind="Image",
    )


def load_initrd(mem: GuestMemory, path: str, kernel: KernelImage, limit: int) -> tuple[int, int]:
    """Load the initrd at `path` page-aligned, as high as it fits below `limit` (where the
    device tree starts) and clear of the kernel; its (guest address, size)."""
    label = f"initrd {path} (-i/--initrd)"
    fd = open_image(path, label, InitrdFileError)
    try:
        size = file_size(fd, label, InitrdFileError)
        if size == 0:
            raise InitrdEmptyError(f"{label}: the file is empty; expected a cpio archive")
        ram_start = mem.ram_regions[0].guest_addr
        addr = place_initrd(size, kernel, limit, ram_start)
        if addr is None or not mem.is_ram(addr, size):
            room = max(0, limit - kernel.load_end)
            raise InitrdTooLargeError(
                f"{label}: {format_size(size)} does not fit between the kernel (which ends at "
                f"{kernel.load_end:#x}) and the device tree at {limit:#x} ({format_size(room)} "
                f"free) with -m {mem.size // MiB}; raise -m"
            )
        got = read_into_guest(fd, mem, addr, size, 0, label, InitrdFileError)
        if got != size:
            raise InitrdTruncatedError(
                f"{label}: the file shrank while being read: expected {size} bytes, read {got}"
            )
        return addr, size
    finally:
        os.close(fd)
