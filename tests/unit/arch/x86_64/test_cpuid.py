"""Per-vCPU CPUID: APIC IDs and topology as the guest reads them."""

from __future__ import annotations

from pyvmm.arch.x86_64.cpuid import vcpu_cpuid, xsave_features
from pyvmm.kvm.x86_64 import CpuidEntry

SUPPORTED = [
    CpuidEntry(0x1, 0, 0, 0x806F8, 0x00000800, 0, 0x10000000),
    CpuidEntry(0x4, 0, 1, 0x121, 0, 0, 0),
    CpuidEntry(0x4, 3, 1, 0x163, 0, 0, 0),
    CpuidEntry(0xB, 0, 1, 0, 0, 0, 0),
    CpuidEntry(0xB, 1, 1, 0, 0, 0, 0),
    CpuidEntry(0xB, 2, 1, 0, 0, 0, 0),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
]


def _leaf(entries: list[CpuidEntry], fn: int, index: int = 0) -> CpuidEntry:
    return next(e for e in entries if e.function == fn and e.index == index)


def test_leaf1_apic_id_and_logical_count() -> None:
    for vcpu in range(3):
        e = _leaf(vcpu_cpuid(SUPPORTED, vcpu, 3, tsc_deadline=True), 0x1)
        assert e.ebx >> 24 == vcpu
        assert (e.ebx >> 16) & 0xFF == 3
        assert e.ecx & (1 << 31), "hypervisor bit"
        assert e.ecx & (1 << 24), "TSC deadline"
        assert e.edx & (1 << 28), "HTT with several logical CPUs"


def test_single_vcpu_has_no_htt() -> None:
    e = _leaf(vcpu_cpuid(SUPPORTED, 0, 1, tsc_deadline=False), 0x1)
    assert not e.edx & (1 << 28)
    assert not e.ecx & (1 << 24)


def test_extended_topology_counts_cores_and_carries_x2apic_id() -> None:
    entries = vcpu_cpuid(SUPPORTED, 2, 4, tsc_deadline=False)
    smt, core, end = (_leaf(entries, 0xB, i) for i in range(3))
    assert (smt.ebx, (smt.ecx >> 8) & 0xFF, smt.edx) == (1, 1, 2)
    assert (core.eax, core.ebx, (core.ecx >> 8) & 0xFF, core.edx) == (2, 4, 2, 2)
    assert (end.ebx, (end.ecx >> 8) & 0xFF) == (0, 0)


def test_cache_leaf_reports_cores_per_package() -> None:
    entries = vcpu_cpuid(SUPPORTED, 0, 4, tsc_deadline=False)
    assert _leaf(entries, 0x4, 0).eax >> 26 == 3
    assert (_leaf(entries, 0x4, 3).eax >> 14) & 0xFFF == 3  # L3 shared by all 4


def test_paravirt_leaves_pass_through() -> None:
    e = _leaf(vcpu_cpuid(SUPPORTED, 0, 1, tsc_deadline=False), 0x40000000)
    assert (e.ebx, e.ecx, e.edx) == (0x4B4D564B, 0x564B4D56, 0x4D)


def test_xcr0_covers_every_offered_state_component() -> None:
    xsave = CpuidEntry(0x1, 0, 0, 0, 0, 1 << 26, 0)
    leaf_d = CpuidEntry(0xD, 0, 1, 0x207, 0x240, 0xA88, 0x1)
    assert xsave_features([xsave, leaf_d]) == 0x1_0000_0207


def test_no_xcr0_without_xsave() -> None:
    no_xsave = CpuidEntry(0x1, 0, 0, 0, 0, 0, 0)
    leaf_d = CpuidEntry(0xD, 0, 1, 0x207, 0x240, 0xA88, 0)
    assert xsave_features([no_xsave, leaf_d]) is None
    assert xsave_features([CpuidEntry(0x1, 0, 0, 0, 0, 1 << 26, 0)]) is None


def test_an_empty_amd_l1_cache_leaf_gets_a_cache_a_guest_can_divide_by() -> None:
    empty = [*SUPPORTED, CpuidEntry(0x80000005, 0, 0, 0, 0, 0, 0)]
    e = _leaf(vcpu_cpuid(empty, 0, 1, tsc_deadline=False), 0x80000005)
    # ECX/EDX: L1d/L1i size KiB [31:24], associativity [23:16], line size [7:0].
    for reg in (e.ecx, e.edx):
        assert reg >> 24 and (reg >> 16) & 0xFF and reg & 0xFF == 64


def test_a_host_amd_l1_cache_leaf_passes_unchanged() -> None:
    host = CpuidEntry(0x80000005, 0, 0, 0xFF40FF18, 0xFF40FF30, 0x20080140, 0x40040140)
    e = _leaf(vcpu_cpuid([*SUPPORTED, host], 0, 1, tsc_deadline=False), 0x80000005)
    assert (e.eax, e.ebx, e.ecx, e.edx) == (host.eax, host.ebx, host.ecx, host.edx)
