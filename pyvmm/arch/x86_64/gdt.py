"""The boot GDT and the segment registers derived from it.

Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18 loaded as flat
segments; a busy 64-bit TSS follows because VMX refuses to enter a guest without a usable TR.
"""

from __future__ import annotations

import enum
from typing import Any

from pyvmm.arch.x86_64.layout import GDT_START, IDT_START
from pyvmm.memory import GuestMemory


class Selector(enum.IntEnum):
    CODE = 0x10
    DATA = 0x18
    TSS = 0x20


# Descriptor flag words: (G, D/B, L, AVL) nibble << 12 | (P, DPL, S, type) byte.
CODE64_FLAGS = 0xA09B  # present, DPL0, code, execute/read, accessed; L=1, G=1
DATA_FLAGS = 0xC093  # present, DPL0, data, read/write, accessed; D/B=1, G=1
TSS64_FLAGS = 0x808B  # present, DPL0, system, busy 64-bit TSS; G=1


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode one 8-byte segment descriptor."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


BOOT_GDT: tuple[int, ...] = (
    0,
    0,
    gdt_entry(CODE64_FLAGS, 0, 0xFFFFF),
    gdt_entry(DATA_FLAGS, 0, 0xFFFFF),
    gdt_entry(TSS64_FLAGS, 0, 0xFFFFF),
)


def segment_from_entry(segment: Any, entry: int, selector: int) -> None:
    """Fill a `struct kvm_segment` from a GDT descriptor."""
    base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    segment.base = base
    segment.limit = (limit << 12) | 0xFFF if g else limit
    segment.selector = selector
    segment.type = (entry >> 40) & 0xF
    segment.present = (entry >> 47) & 1
    segment.dpl = (entry >> 45) & 3
    segment.db = (entry >> 54) & 1
    segment.s = (entry >> 44) & 1
    segment.l = (entry >> 53) & 1
    segment.g = g
    segment.avl = (entry >> 52) & 1
    segment.unusable = 0 if segment.present else 1


def write_gdt(mem: GuestMemory) -> None:
    for i, entry in enumerate(BOOT_GDT):
        mem.write_u64(GDT_START + 8 * i, entry)
    mem.write_u64(IDT_START, 0)


def setup_segments(sregs: Any) -> None:
    """Point GDTR/IDTR at the boot tables and load flat 64-bit segments."""
    sregs.gdt.base = GDT_START
    sregs.gdt.limit = 8 * len(BOOT_GDT) - 1
    sregs.idt.base = IDT_START
    sregs.idt.limit = 7
    segment_from_entry(sregs.cs, BOOT_GDT[Selector.CODE // 8], Selector.CODE)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        segment_from_entry(seg, BOOT_GDT[Selector.DATA // 8], Selector.DATA)
    segment_from_entry(sregs.tr, BOOT_GDT[Selector.TSS // 8], Selector.TSS)
