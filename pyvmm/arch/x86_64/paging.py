"""Boot page tables: the first 4 GiB identity-mapped with 2 MiB pages (Linux's 64-bit entry)."""

from __future__ import annotations

from typing import Any

from pyvmm.arch.x86_64.layout import PDE_START, PDPTE_START, PML4_START
from pyvmm.memory import GuestMemory

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7
PAGE_2M = 2 << 20
IDENTITY_MAPPED_GIB = 4

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


def write_page_tables(mem: GuestMemory) -> None:
    table_flags = PTE_PRESENT | PTE_WRITABLE
    mem.write_u64(PML4_START, PDPTE_START | table_flags)
    for gib in range(IDENTITY_MAPPED_GIB):
        pd = PDE_START + gib * 0x1000
        mem.write_u64(PDPTE_START + 8 * gib, pd | table_flags)
        entries = b"".join(
            ((gib * 512 + i) * PAGE_2M | table_flags | PTE_PAGE_SIZE).to_bytes(8, "little")
            for i in range(512)
        )
        mem.write(pd, entries)


def setup_long_mode(sregs: Any) -> None:
    """Turn on protection, PAE paging with the boot tables, and long mode."""
    sregs.cr3 = PML4_START
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET | CR0_NE | CR0_MP
    sregs.efer |= EFER_LME | EFER_LMA
