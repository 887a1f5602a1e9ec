"""What KVM has only on x86: registers, CPUID, MSRs, XCRs, the local APIC, the in-kernel
irqchip pair (PIC and IOAPIC) with the PIT, and the VMX TSS pages.

Declared with cffi exactly as in `<asm/kvm.h>` (checked against the header by
`tests/unit/kvm/test_abi.py`). The functions here act on the generic `Vm` and `Vcpu`; the x86
machine itself (what goes where in guest memory, the boot state) is `pyvmm.arch.x86_64`.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Any

from pyvmm.cdecl import declare
from pyvmm.ioc import IOC_READ, IOC_WRITE
from pyvmm.kvm.abi import Cap, ioc
from pyvmm.kvm.errors import KvmError, MissingCapabilityError
from pyvmm.kvm.ioctl import ioctl
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm

ffi: Any = declare(
    "kvm_x86_64",
    """
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8,  r9,  r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t  type;
        uint8_t  present, dpl, db, s, l, g, avl;
        uint8_t  unusable;
        uint8_t  padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };

    struct kvm_fpu {
        uint8_t  fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t  ftwx;
        uint8_t  pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t  xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_xcr {
        uint32_t xcr;
        uint32_t reserved;
        uint64_t value;
    };

    struct kvm_xcrs {
        uint32_t nr_xcrs;
        uint32_t flags;
        struct kvm_xcr xcrs[16];
        uint64_t padding[16];
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    struct kvm_pit_config {
        uint32_t flags;
        uint32_t pad[15];
    };

    """,
)

KVM_MAX_CPUID_ENTRIES = 256
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24
# kvm_cpuid_entry2.flags: the entry depends on ECX (the subleaf) as well as EAX.
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

# Three pages just below the 4 GiB boundary that Intel's VMX needs for its real-mode TSS and
# identity map; ignored elsewhere. They lie in the PCI hole, never in guest RAM.
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000

# What an x86 VM needs besides what every pyvmm VM needs (pyvmm.kvm.system.REQUIRED_CAPS).
REQUIRED_CAPS = (
    Cap.KVM_CAP_HLT,
    Cap.KVM_CAP_EXT_CPUID,
    Cap.KVM_CAP_PIT2,
    Cap.KVM_CAP_SET_TSS_ADDR,
)


def _ior(nr: int, ctype: str) -> int:
    return ioc(IOC_READ, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return ioc(IOC_WRITE, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return ioc(IOC_READ | IOC_WRITE, nr, ffi.sizeof(ctype))


class X86Ioctl(enum.IntEnum):
    """x86 ioctl request numbers, named as in <linux/kvm.h>."""

    KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
    KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
    KVM_SET_TSS_ADDR = ioc(0, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
    KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
    KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
    KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
    KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
    KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
    KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
    KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
    KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
    KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
    KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
    KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
    KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
    KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
    KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
    KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")


# --- the VM ------------------------------------------------------------------------------------


def configure_vm(vm: Vm) -> None:
    """The x86 VM state pyvmm relies on: the VMX TSS pages, the in-kernel PIC/IOAPIC pair and
    the PIT (its speaker a dummy)."""
    ioctl(vm.fd, X86Ioctl.KVM_SET_TSS_ADDR, TSS_ADDRESS)
    ioctl(vm.fd, X86Ioctl.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", IDENTITY_MAP_ADDRESS))
    vm.create_irqchip()
    pit: Any = ffi.new("struct kvm_pit_config *")
    pit.flags = KVM_PIT_SPEAKER_DUMMY
    ioctl(vm.fd, X86Ioctl.KVM_CREATE_PIT2, pit)


def irqchip_routes() -> list[tuple[int, int, int]]:
    """(GSI, irqchip, pin) of the routes KVM sets up by default, which pyvmm keeps: ISA IRQs to
    both PICs and the IOAPIC, the rest of the IOAPIC's pins alone."""
    routes = []
    for gsi in range(KVM_IOAPIC_NUM_PINS):
        if gsi < 8:
            routes.append((gsi, KVM_IRQCHIP_PIC_MASTER, gsi))
        elif gsi < 16:
            routes.append((gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8))
        routes.append((gsi, KVM_IRQCHIP_IOAPIC, gsi))
    return routes


# --- CPUID -------------------------------------------------------------------------------------


@dataclass
class CpuidEntry:
    """One CPUID leaf as plain values, for the arch code to edit."""

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


def supported_cpuid(kvm: Kvm) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID as a list of plain entries the arch code may edit."""
    cpuid: Any = ffi.new("struct kvm_cpuid2 *", {"entries": KVM_MAX_CPUID_ENTRIES})
    cpuid.nent = KVM_MAX_CPUID_ENTRIES
    try:
        ioctl(kvm.fd, X86Ioctl.KVM_GET_SUPPORTED_CPUID, cpuid)
    except KvmError as e:
        if e.errno == errno.E2BIG:
            raise MissingCapabilityError(
                f"{kvm.path}: more than {KVM_MAX_CPUID_ENTRIES} CPUID entries"
            ) from None
        raise
    return [CpuidEntry.from_c(cpuid.entries[i]) for i in range(cpuid.nent)]


def set_cpuid(vcpu: Vcpu, entries: list[CpuidEntry]) -> None:
    ioctl(vcpu.fd, X86Ioctl.KVM_SET_CPUID2, to_kvm_cpuid2(entries))


# --- registers ---------------------------------------------------------------------------------


def get_regs(vcpu: Vcpu) -> Any:
    regs: Any = ffi.new("struct kvm_regs *")
    ioctl(vcpu.fd, X86Ioctl.KVM_GET_REGS, regs)
    return regs


def set_regs(vcpu: Vcpu, regs: Any) -> None:
    ioctl(vcpu.fd, X86Ioctl.KVM_SET_REGS, regs)


def get_sregs(vcpu: Vcpu) -> Any:
    sregs: Any = ffi.new("struct kvm_sregs *")
    ioctl(vcpu.fd, X86Ioctl.KVM_GET_SREGS, sregs)
    return sregs


def set_sregs(vcpu: Vcpu, sregs: Any) -> None:
    ioctl(vcpu.fd, X86Ioctl.KVM_SET_SREGS, sregs)


def get_fpu(vcpu: Vcpu) -> Any:
    fpu: Any = ffi.new("struct kvm_fpu *")
    ioctl(vcpu.fd, X86Ioctl.KVM_GET_FPU, fpu)
    return fpu


def set_fpu(vcpu: Vcpu, fpu: Any) -> None:
    ioctl(vcpu.fd, X86Ioctl.KVM_SET_FPU, fpu)


def set_msrs(vcpu: Vcpu, msrs: dict[int, int]) -> None:
    c: Any = ffi.new("struct kvm_msrs *", {"entries": len(msrs)})
    c.nmsrs = len(msrs)
    for i, (index, value) in enumerate(msrs.items()):
        c.entries[i].index = index
        c.entries[i].data = value
    written = ioctl(vcpu.fd, X86Ioctl.KVM_SET_MSRS, c)
    if written != len(msrs):
        bad = list(msrs)[written]
        raise KvmError(f"KVM_SET_MSRS: MSR {bad:#x} refused", errno.EINVAL)


def set_xcr0(vcpu: Vcpu, value: int) -> None:
    xcrs: Any = ffi.new("struct kvm_xcrs *")
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].xcr = 0
    xcrs.xcrs[0].value = value
    ioctl(vcpu.fd, X86Ioctl.KVM_SET_XCRS, xcrs)


def get_lapic(vcpu: Vcpu) -> Any:
    lapic: Any = ffi.new("struct kvm_lapic_state *")
    ioctl(vcpu.fd, X86Ioctl.KVM_GET_LAPIC, lapic)
    return lapic


def set_lapic(vcpu: Vcpu, lapic: Any) -> None:
    ioctl(vcpu.fd, X86Ioctl.KVM_SET_LAPIC, lapic)
