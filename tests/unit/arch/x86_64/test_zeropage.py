"""Zero page and e820 map: what a Linux kernel reads at boot."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.arch.x86_64.layout import (
    E820_RAM,
    E820_RESERVED,
    EBDA_START,
    FIRST_ADDR_PAST_32BITS,
    PCI_HOLE_START,
    ZERO_PAGE_START,
    ram_ranges,
)
from pyvmm.arch.x86_64.zeropage import BootInfo, E820Entry, e820_map, write_zero_page
from pyvmm.loader.bootparams import HDRS_MAGIC, ffi
from pyvmm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def small_mem() -> Iterator[GuestMemory]:
    mem = GuestMemory(ram_ranges(64 * MiB))
    yield mem
    mem.close()


def test_ram_is_split_around_the_pci_hole() -> None:
    assert ram_ranges(256 * MiB) == [(0, 256 * MiB)]
    assert ram_ranges(4096 * MiB) == [
        (0, PCI_HOLE_START),
        (FIRST_ADDR_PAST_32BITS, 4096 * MiB - PCI_HOLE_START),
    ]


def test_e820_reserves_the_ebda_and_bios_area(small_mem: GuestMemory) -> None:
    assert e820_map(small_mem) == [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, MiB - EBDA_START, E820_RESERVED),
        E820Entry(MiB, 63 * MiB, E820_RAM),
    ]


def test_e820_lists_ram_above_4g_and_skips_the_hole() -> None:
    mem = GuestMemory([(0, 8 * MiB), (FIRST_ADDR_PAST_32BITS, 4 * MiB)])
    try:
        ram = [(e.addr, e.size) for e in e820_map(mem) if e.type == E820_RAM]
    finally:
        mem.close()
    assert ram == [(0, EBDA_START), (MiB, 7 * MiB), (FIRST_ADDR_PAST_32BITS, 4 * MiB)]


def test_zero_page_carries_cmdline_initrd_and_e820(small_mem: GuestMemory) -> None:
    write_zero_page(small_mem, BootInfo(0x20000, 12, initrd=(0x3000000, 0x1234)))
    bp = ffi.from_buffer("struct boot_params *", small_mem.view(ZERO_PAGE_START, 4096))
    assert bp.hdr.header == HDRS_MAGIC
    assert bp.hdr.boot_flag == 0xAA55
    assert bp.hdr.type_of_loader == 0xFF
    assert bp.hdr.cmd_line_ptr == 0x20000
    assert bp.hdr.cmdline_size == 12
    assert (bp.hdr.ramdisk_image, bp.hdr.ramdisk_size) == (0x3000000, 0x1234)
    assert bp.e820_entries == 3
    assert (bp.e820_table[2].addr, bp.e820_table[2].size) == (MiB, 63 * MiB)


def test_zero_page_keeps_the_bzimage_setup_header(small_mem: GuestMemory) -> None:
    hdr = ffi.new("struct setup_header *")
    hdr.version = 0x20F
    hdr.kernel_alignment = 0x200000
    hdr.init_size = 0x1000
    write_zero_page(small_mem, BootInfo(0x20000, 1, setup_header=bytes(ffi.buffer(hdr))))
    bp = ffi.from_buffer("struct boot_params *", small_mem.view(ZERO_PAGE_START, 4096))
    assert bp.hdr.version == 0x20F
    assert bp.hdr.kernel_alignment == 0x200000
    assert bp.hdr.init_size == 0x1000
    assert bp.hdr.cmd_line_ptr == 0x20000
