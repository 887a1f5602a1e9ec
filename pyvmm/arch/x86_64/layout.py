"""Where things live in x86_64 guest-physical memory (DESIGN.md, "Boot contract")."""

from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30

GDT_START = 0x500
IDT_START = 0x520
ZERO_PAGE_START = 0x7000
# Boot page tables: PML4, one PDPT and four page directories of 2 MiB pages = first 4 GiB.
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
BOOT_STACK_POINTER = 0x8FF0
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
# Extended BIOS data area: the MP table goes here; e820 marks it reserved.
EBDA_START = 0x9FC00
# Start of the BIOS region (VGA hole and ROMs) that is never usable RAM.
LOW_RAM_END = 0xA0000
HIGH_MEMORY_START = 1 * MiB
KERNEL_DEFAULT_START = 16 * MiB

# The PCI hole below 4 GiB: RAM is split around it; BARs, IOAPIC and LAPIC live in it.
PCI_HOLE_START = 0xC000_0000
# Where BARs are placed: the PCI hole up to the IOAPIC.
PCI_MMIO_START = PCI_HOLE_START
FIRST_ADDR_PAST_32BITS = 4 * GiB
IOAPIC_START = 0xFEC0_0000
APIC_START = 0xFEE0_0000

E820_RAM = 1
E820_RESERVED = 2


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (address, size) ranges: below the PCI hole, then from 4 GiB up."""
    if mem_size <= PCI_HOLE_START:
        return [(0, mem_size)]
    return [(0, PCI_HOLE_START), (FIRST_ADDR_PAST_32BITS, mem_size - PCI_HOLE_START)]
