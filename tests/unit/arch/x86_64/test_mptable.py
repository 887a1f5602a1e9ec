"""MP table: the CPU count and interrupt wiring a guest finds in the EBDA."""

from __future__ import annotations

import struct

import pytest

from pyvmm.arch.x86_64.layout import EBDA_START, IOAPIC_START
from pyvmm.arch.x86_64.mptable import MpTableError, build_mptable, max_cpus


def _parse(table: bytes, base: int = EBDA_START) -> dict[str, object]:
    assert table[:4] == b"_MP_"
    assert sum(table[:16]) & 0xFF == 0
    (physptr,) = struct.unpack_from("<I", table, 4)
    off = physptr - base
    assert table[off : off + 4] == b"PCMP"
    length, spec, _checksum = struct.unpack_from("<HBB", table, off + 4)
    assert spec == 4
    assert sum(table[off : off + length]) & 0xFF == 0
    (lapic,) = struct.unpack_from("<I", table, off + 36)
    pos, end = off + 44, off + length
    cpus: list[tuple[int, int]] = []
    ioapics: list[int] = []
    intsrc: list[tuple[int, int, int]] = []
    lint: list[tuple[int, int]] = []
    while pos < end:
        kind = table[pos]
        if kind == 0:
            cpus.append((table[pos + 1], table[pos + 3]))
            pos += 20
        elif kind == 2:
            ioapics.append(struct.unpack_from("<I", table, pos + 4)[0])
            pos += 8
        elif kind == 3:
            intsrc.append((table[pos + 4], table[pos + 5], table[pos + 7]))
            pos += 8
        elif kind == 4:
            lint.append((table[pos + 1], table[pos + 7]))
            pos += 8
        else:
            pos += 8
    assert pos == end
    return {"lapic": lapic, "cpus": cpus, "ioapics": ioapics, "intsrc": intsrc, "lint": lint}


@pytest.mark.parametrize("n", [1, 2, 7])
def test_one_enabled_processor_entry_per_vcpu_with_cpu0_the_bsp(n: int) -> None:
    t = _parse(build_mptable(n))
    assert t["cpus"] == [(i, 1 | (2 if i == 0 else 0)) for i in range(n)]


def test_ioapic_isa_irqs_and_local_interrupts() -> None:
    t = _parse(build_mptable(2))
    assert t["lapic"] == 0xFEE00000
    assert t["ioapics"] == [IOAPIC_START]
    assert t["intsrc"] == [(1, i, i) for i in range(16)]  # ISA is bus 1
    assert t["lint"] == [(3, 0), (1, 1)]  # ExtINT on LINT0, NMI on LINT1


def test_largest_table_fits_and_one_more_cpu_is_refused() -> None:
    table = build_mptable(max_cpus(), [(slot, 16 + slot % 8) for slot in range(16)])
    assert EBDA_START + len(table) <= 0xA0000
    with pytest.raises(MpTableError):
        build_mptable(max_cpus() + 1)
    with pytest.raises(MpTableError):
        build_mptable(0)


def test_pci_inta_lines_are_level_triggered_active_low() -> None:
    table = build_mptable(1, [(1, 16), (2, 17)])
    t = _parse(table)
    assert t["intsrc"][-2:] == [(0, 1 << 2, 16), (0, 2 << 2, 17)]  # PCI bus 0, slot << 2 | INTA
    # irqflag 0x0f: active low, level triggered, for both PCI entries
    pci = [i for i in range(16, len(table), 8) if table[i] == 3 and table[i + 4] == 0]
    assert [struct.unpack_from("<H", table, i + 2)[0] for i in pci] == [0x0F, 0x0F]
