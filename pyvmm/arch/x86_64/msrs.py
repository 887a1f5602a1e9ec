"""Initial model-specific registers for a vCPU entering a Linux kernel."""

from __future__ import annotations

import enum


class Msr(enum.IntEnum):
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_TSC = 0x10
    IA32_MISC_ENABLE = 0x1A0
    MTRR_DEF_TYPE = 0x2FF
    STAR = 0xC0000081
    LSTAR = 0xC0000082
    CSTAR = 0xC0000083
    SYSCALL_MASK = 0xC0000084
    KERNEL_GS_BASE = 0xC0000102


MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITEBACK = 6


def boot_msrs() -> dict[int, int]:
    """Syscall MSRs cleared, fast strings on, all memory write-back by default."""
    return {
        Msr.IA32_SYSENTER_CS: 0,
        Msr.IA32_SYSENTER_ESP: 0,
        Msr.IA32_SYSENTER_EIP: 0,
        Msr.STAR: 0,
        Msr.CSTAR: 0,
        Msr.KERNEL_GS_BASE: 0,
        Msr.SYSCALL_MASK: 0,
        Msr.LSTAR: 0,
        Msr.IA32_TSC: 0,
        Msr.IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        Msr.MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITEBACK,
    }
