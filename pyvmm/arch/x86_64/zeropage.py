"""The Linux zero page (`struct boot_params`) with its e820 memory map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyvmm.arch.x86_64.layout import (
    E820_RAM,
    E820_RESERVED,
    EBDA_START,
    HIGH_MEMORY_START,
    ZERO_PAGE_START,
)
from pyvmm.loader.bootparams import (
    BOOT_FLAG_MAGIC,
    E820_MAX_ENTRIES_ZEROPAGE,
    HDRS_MAGIC,
    LOADER_TYPE_UNDEFINED,
    ffi,
)
from pyvmm.memory import GuestMemory

# The alignment Linux relocates itself to; what Firecracker and crosvm put in the header.
KERNEL_ALIGNMENT = 0x0100_0000


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """Usable RAM below the EBDA, the EBDA and BIOS area reserved, then all RAM from 1 MiB."""
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ]
    for region in mem.ram_regions:
        start = max(region.guest_addr, HIGH_MEMORY_START)
        if start < region.end:
            entries.append(E820Entry(start, region.end - start, E820_RAM))
    return entries


@dataclass(frozen=True)
class BootInfo:
    cmdline_addr: int
    cmdline_size: int
    initrd: tuple[int, int] | None = None
    setup_header: bytes | None = None


def build_zero_page(mem: GuestMemory, info: BootInfo) -> bytes:
    params: Any = ffi.new("struct boot_params *")
    if info.setup_header is not None:
        hdr_size = min(len(info.setup_header), ffi.sizeof("struct setup_header"))
        ffi.memmove(ffi.addressof(params, "hdr"), info.setup_header, hdr_size)
    hdr = params.hdr
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.boot_flag = BOOT_FLAG_MAGIC
    hdr.header = HDRS_MAGIC
    hdr.cmd_line_ptr = info.cmdline_addr
    hdr.cmdline_size = info.cmdline_size
    if info.setup_header is None:
        hdr.kernel_alignment = KERNEL_ALIGNMENT
    if info.initrd is not None:
        addr, size = info.initrd
        hdr.ramdisk_image = addr & 0xFFFFFFFF
        hdr.ramdisk_size = size & 0xFFFFFFFF
        params.ext_ramdisk_image = addr >> 32
        params.ext_ramdisk_size = size >> 32
    entries = e820_map(mem)
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(entries)} e820 entries do not fit in the zero page")
    params.e820_entries = len(entries)
    for i, e in enumerate(entries):
        params.e820_table[i].addr = e.addr
        params.e820_table[i].size = e.size
        params.e820_table[i].type = e.type
    return bytes(ffi.buffer(params))


def write_zero_page(mem: GuestMemory, info: BootInfo) -> int:
    mem.write(ZERO_PAGE_START, build_zero_page(mem, info))
    return ZERO_PAGE_START
