"""Boot page tables and GDT, decoded the way the CPU would."""

from __future__ import annotations

from pyvmm.arch.x86_64.gdt import BOOT_GDT, Selector, segment_from_entry, write_gdt
from pyvmm.arch.x86_64.layout import GDT_START, PML4_START
from pyvmm.arch.x86_64.paging import write_page_tables
from pyvmm.kvm.x86_64 import ffi
from pyvmm.memory import GuestMemory

MiB = 1 << 20


def _translate(mem: GuestMemory, vaddr: int) -> int | None:
    table = PML4_START
    for level, shift in enumerate((39, 30, 21)):
        entry = mem.read_u64(table + 8 * ((vaddr >> shift) & 0x1FF))
        if not entry & 1:
            return None
        if level == 2:
            assert entry & (1 << 7), "expected a 2 MiB page"
            return (entry & ~0x1FFFFF & ((1 << 52) - 1)) | (vaddr & 0x1FFFFF)
        table = entry & 0x000F_FFFF_FFFF_F000
    return None


def test_first_4g_identity_mapped_and_nothing_beyond() -> None:
    mem = GuestMemory([(0, 2 * MiB)])
    try:
        write_page_tables(mem)
        for addr in (0, 0x1234567, 0xBFFF_FFFF, 0xFEE0_0000, 0xFFFF_FFFF):
            assert _translate(mem, addr) == addr
        assert _translate(mem, 1 << 32) is None
    finally:
        mem.close()


def test_boot_segments_are_flat_64bit_code_and_data() -> None:
    mem = GuestMemory([(0, 2 * MiB)])
    try:
        write_gdt(mem)
        assert mem.read_u64(GDT_START + Selector.CODE) == BOOT_GDT[2]
    finally:
        mem.close()
    cs = ffi.new("struct kvm_segment *")
    segment_from_entry(cs, BOOT_GDT[Selector.CODE // 8], Selector.CODE)
    assert (cs.selector, cs.l, cs.db, cs.present, cs.dpl, cs.s) == (0x10, 1, 0, 1, 0, 1)
    assert cs.limit == 0xFFFF_FFFF and cs.type == 0xB
    ds = ffi.new("struct kvm_segment *")
    segment_from_entry(ds, BOOT_GDT[Selector.DATA // 8], Selector.DATA)
    assert (ds.selector, ds.l, ds.db, ds.type, ds.base) == (0x18, 0, 1, 3, 0)
    tr = ffi.new("struct kvm_segment *")
    segment_from_entry(tr, BOOT_GDT[Selector.TSS // 8], Selector.TSS)
    assert (tr.type, tr.s, tr.present) == (0xB, 0, 1)
