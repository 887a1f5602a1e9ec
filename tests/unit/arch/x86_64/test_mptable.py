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
    intsrc: list[tuple[int, int]] = []
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
            intsrc.append((table[pos + 5], table[pos + 7]))
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
    assert t["intsrc"] == [(i, i) for i in range(16)]
    assert t["lint"] == [(3, 0), (1, 1)]  # ExtINT on LINT0, NMI on LINT1


def test_largest_table_fits_and_one_more_cpu_is_refused() -> None:
    table = build_mptable(max_cpus())
    assert EBDA_START + len(table) <= 0xA0000
    with pytest.raises(MpTableError):
        build_mptable(max_cpus() + 1)
    with pytest.raises(MpTableError):
        build_mptable(0)
