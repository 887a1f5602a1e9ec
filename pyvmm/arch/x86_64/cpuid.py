"""Per-vCPU CPUID: KVM's supported leaves with the APIC ID and topology filled in."""

from __future__ import annotations

import dataclasses

from pyvmm.kvm.x86_64 import CpuidEntry

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXT_TOPOLOGY = 0xB
LEAF_V2_EXT_TOPOLOGY = 0x1F

# Leaf 1
EBX_CLFLUSH_SIZE_SHIFT = 8
EBX_CPU_COUNT_SHIFT = 16
EBX_APIC_ID_SHIFT = 24
ECX_TSC_DEADLINE = 1 << 24
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28
CLFLUSH_LINE_QWORDS = 8

# AMD's L1 cache and TLB leaf. KVM passes the host's; an emulated host (QEMU's TCG) can leave it
# all zeros, and Linux divides by its L1 instruction-cache associativity on AMD family 15h, a
# divide error before the guest has an IDT. An empty leaf is filled with a plain description,
# as QEMU fills it from its own cache model: 2M/4M TLBs 4-way with 32 entries, 4K TLBs fully
# associative with 64, L1d 32 KiB 8-way and L1i 64 KiB 4-way, both with 64-byte lines.
LEAF_AMD_L1_CACHE = 0x8000_0005
AMD_L1_CACHE_DEFAULT = (0x0420_0420, 0xFF40_FF40, 0x2008_0140, 0x4004_0140)

# Leaf 0xB / 0x1F level types (ECX[15:8])
LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2


def _apic_id_bits(count: int) -> int:
    return max(count - 1, 0).bit_length()


def vcpu_cpuid(
    supported: list[CpuidEntry], vcpu_id: int, num_cpus: int, tsc_deadline: bool
) -> list[CpuidEntry]:
    """CPUID for vCPU `vcpu_id` of `num_cpus`: one core per vCPU, one thread per core."""
    result: list[CpuidEntry] = []
    core_bits = _apic_id_bits(num_cpus)
    for entry in supported:
        e = dataclasses.replace(entry)
        if e.function == LEAF_FEATURES:
            e.ebx = (
                (e.ebx & 0xFF)
                | (CLFLUSH_LINE_QWORDS << EBX_CLFLUSH_SIZE_SHIFT)
                | (num_cpus << EBX_CPU_COUNT_SHIFT)
                | (vcpu_id << EBX_APIC_ID_SHIFT)
            )
            e.ecx |= ECX_HYPERVISOR
            if tsc_deadline:
                e.ecx |= ECX_TSC_DEADLINE
            if num_cpus > 1:
                e.edx |= EDX_HTT
            else:
                e.edx &= ~EDX_HTT
        elif e.function == LEAF_CACHE_PARAMS:
            # EAX[31:26]: addressable core IDs in the package - 1; EAX[25:14]: threads sharing
            # this cache - 1 (caches above L2 shared by the package, the rest private).
            cache_level = (e.eax >> 5) & 0x7
            sharing = (num_cpus - 1) if cache_level >= 3 else 0
            e.eax = (e.eax & 0x3FFF) | (sharing << 14) | ((num_cpus - 1) << 26)
        elif e.function in (LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY):
            e.edx = vcpu_id
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (LEVEL_TYPE_SMT << 8)
            elif e.index == 1:
                e.eax, e.ebx, e.ecx = core_bits, num_cpus, (LEVEL_TYPE_CORE << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, (LEVEL_TYPE_INVALID << 8) | e.index
        elif e.function == LEAF_AMD_L1_CACHE and not (e.eax or e.ebx or e.ecx or e.edx):
            e.eax, e.ebx, e.ecx, e.edx = AMD_L1_CACHE_DEFAULT
        result.append(e)
    return result


LEAF_XSAVE = 0xD
ECX_XSAVE = 1 << 26


def xsave_features(entries: list[CpuidEntry]) -> int | None:
    """Every XCR0 state component these CPUID entries offer, or None without XSAVE.

    pyvmm starts vCPUs with all of them enabled in XCR0. A guest kernel normally enables the same
    set itself, so it changes nothing there; but it keeps KVM's view of XCR0 right where a nested
    hypervisor fails to intercept XSETBV (QEMU's TCG SVM): otherwise KVM keeps CPUID.(0xD,0).EBX
    at the legacy 576-byte size and Linux warns "XSAVE consistency problem" at boot.
    """
    leaf1 = next((e for e in entries if e.function == LEAF_FEATURES), None)
    if leaf1 is None or not leaf1.ecx & ECX_XSAVE:
        return None
    leaf_d = next((e for e in entries if e.function == LEAF_XSAVE and e.index == 0), None)
    if leaf_d is None:
        return None
    return leaf_d.eax | (leaf_d.edx << 32)
