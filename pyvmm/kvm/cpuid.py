"""CPUID entries as plain values, converted to and from `struct kvm_cpuid2`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyvmm.kvm.abi import ffi

# kvm_cpuid_entry2.flags: the entry depends on ECX (the subleaf) as well as EAX.
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


@dataclass
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_c(cls, e: Any) -> CpuidEntry:
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


def to_kvm_cpuid2(entries: list[CpuidEntry]) -> Any:
    """Build a `struct kvm_cpuid2 *` holding `entries`."""
    cpuid: Any = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
    cpuid.nent = len(entries)
    for i, e in enumerate(entries):
        c = cpuid.entries[i]
        c.function, c.index, c.flags = e.function, e.index, e.flags
        c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
    return cpuid
