"""Initial vCPU state: long-mode entry for the boot vCPU, FPU defaults, LAPIC local interrupts."""

from __future__ import annotations

import struct

from pyvmm.arch.x86_64.gdt import setup_segments
from pyvmm.arch.x86_64.layout import BOOT_STACK_POINTER
from pyvmm.arch.x86_64.paging import setup_long_mode
from pyvmm.kvm import x86_64 as kvm_x86
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.x86_64 import ffi

RFLAGS_RESERVED = 0x2
FPU_CONTROL_WORD = 0x37F
MXCSR_DEFAULT = 0x1F80

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVT_MASKED = 1 << 16
APIC_DELIVERY_MODE_SHIFT = 8
APIC_DELIVERY_MODE_MASK = 0x7 << APIC_DELIVERY_MODE_SHIFT
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def setup_boot_vcpu(vcpu: Vcpu, entry: int, zero_page: int) -> None:
    """vCPU 0: 64-bit mode at `entry` with RSI pointing at the zero page."""
    sregs = kvm_x86.get_sregs(vcpu)
    setup_segments(sregs)
    setup_long_mode(sregs)
    kvm_x86.set_sregs(vcpu, sregs)
    regs = kvm_x86.get_regs(vcpu)
    regs.rflags = RFLAGS_RESERVED
    regs.rip = entry
    regs.rsp = BOOT_STACK_POINTER
    regs.rbp = BOOT_STACK_POINTER
    regs.rsi = zero_page
    kvm_x86.set_regs(vcpu, regs)


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = kvm_x86.get_fpu(vcpu)
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT
    kvm_x86.set_fpu(vcpu, fpu)


def _set_lvt_mode(value: int, mode: int) -> int:
    return (value & ~(APIC_DELIVERY_MODE_MASK | APIC_LVT_MASKED)) | (
        mode << APIC_DELIVERY_MODE_SHIFT
    )


def setup_lint(vcpu: Vcpu) -> None:
    """LINT0 takes the 8259's ExtINT, LINT1 the NMI: the PC "virtual wire" mode."""
    lapic = kvm_x86.get_lapic(vcpu)
    buf = ffi.buffer(lapic.regs)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", buf, reg)
        struct.pack_into("<I", buf, reg, _set_lvt_mode(value, mode))
    kvm_x86.set_lapic(vcpu, lapic)
