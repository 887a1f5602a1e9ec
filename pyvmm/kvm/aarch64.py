"""What KVM has only on arm64: vCPU init with a target and features (PSCI 0.2, power-off), core
registers by ONE_REG id, and the vGIC (v3, or v2) made with KVM_CREATE_DEVICE.

Declared with cffi exactly as in arm64's `<asm/kvm.h>` (checked against
/usr/aarch64-linux-gnu/include by `tests/unit/kvm/test_abi_aarch64.py`, on any host). Only the
core registers pyvmm sets are declared: `struct kvm_regs` continues with the floating-point
registers, which it never touches. The arm64 machine itself is `pyvmm.arch.aarch64`.
"""

from __future__ import annotations

import enum
from typing import Any

from pyvmm.cdecl import declare
from pyvmm.ioc import IOC_READ, IOC_WRITE
from pyvmm.kvm.abi import Cap, ioc
from pyvmm.kvm.device import KvmDevice, device_type_exists
from pyvmm.kvm.ioctl import ioctl
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm

ffi: Any = declare(
    "kvm_aarch64",
    """
    struct kvm_vcpu_init {
        uint32_t target;
        uint32_t features[7];
    };

    struct user_pt_regs {
        uint64_t regs[31];
        uint64_t sp;
        uint64_t pc;
        uint64_t pstate;
    };

    struct kvm_regs {
        struct user_pt_regs regs;
        uint64_t sp_el1;
        uint64_t elr_el1;
        uint64_t spsr[5];
    };
    """,
)

# What an arm64 VM needs besides what every pyvmm VM needs (pyvmm.kvm.system.REQUIRED_CAPS):
# registers by ONE_REG, in-kernel devices (the vGIC) and PSCI 0.2 (SYSTEM_OFF/RESET, CPU_ON).
REQUIRED_CAPS = (Cap.KVM_CAP_ONE_REG, Cap.KVM_CAP_DEVICE_CTRL, Cap.KVM_CAP_ARM_PSCI_0_2)


class Aarch64Ioctl(enum.IntEnum):
    """arm64 ioctl request numbers, named as in <linux/kvm.h>."""

    KVM_ARM_VCPU_INIT = ioc(IOC_WRITE, 0xAE, ffi.sizeof("struct kvm_vcpu_init"))
    KVM_ARM_PREFERRED_TARGET = ioc(IOC_READ, 0xAF, ffi.sizeof("struct kvm_vcpu_init"))


class VcpuFeature(enum.IntEnum):
    """Bit numbers in kvm_vcpu_init.features (KVM_ARM_VCPU_*)."""

    POWER_OFF = 0  # starts powered off, until a PSCI CPU_ON
    EL1_32BIT = 1
    PSCI_0_2 = 2
    PMU_V3 = 3


class DeviceType(enum.IntEnum):
    """KVM_DEV_TYPE_* of the interrupt controllers."""

    ARM_VGIC_V2 = 5
    ARM_VGIC_V3 = 7


class VgicGroup(enum.IntEnum):
    """KVM_DEV_ARM_VGIC_GRP_* attribute groups pyvmm sets."""

    ADDR = 0
    NR_IRQS = 3
    CTRL = 4


class VgicAddr(enum.IntEnum):
    """Attributes of VgicGroup.ADDR: which region's base address (KVM_VGIC_V*_ADDR_TYPE_*)."""

    V2_DIST = 0
    V2_CPU = 1
    V3_DIST = 2
    V3_REDIST = 3


KVM_DEV_ARM_VGIC_CTRL_INIT = 0

# ONE_REG ids (<linux/kvm.h> and arm64's <asm/kvm.h>): architecture, size, register group, then
# the register's offset in struct kvm_regs in 32-bit words.
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT

# PSTATE bits (arm64 <asm/ptrace.h>): EL1 using SP_EL1, debug, SError, IRQ and FIQ masked.
PSR_MODE_EL1H = 0x5
PSR_F_BIT = 0x40
PSR_I_BIT = 0x80
PSR_A_BIT = 0x100
PSR_D_BIT = 0x200
BOOT_PSTATE = PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT | PSR_MODE_EL1H


def core_reg_id(*field: str | int) -> int:
    """The ONE_REG id of a 64-bit core register, named by its place in struct kvm_regs:
    `core_reg_id("regs", "regs", 0)` is x0, `core_reg_id("regs", "pc")` the PC."""
    offset: int = ffi.offsetof("struct kvm_regs", *field)
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offset // 4


def x_reg(n: int) -> int:
    """The ONE_REG id of general-purpose register x<n>."""
    return core_reg_id("regs", "regs", n)


PC = core_reg_id("regs", "pc")
PSTATE = core_reg_id("regs", "pstate")


def sys_reg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The ONE_REG id of a 64-bit system register, by its encoding (as MRS names it)."""
    encoding = op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | encoding


MPIDR_EL1 = sys_reg_id(3, 0, 0, 0, 5)
MPIDR_AFFINITY_MASK = 0xFF_00FF_FFFF  # Aff3 and Aff2-Aff0


# --- vCPUs -------------------------------------------------------------------------------------


def preferred_target(vm: Vm) -> Any:
    """KVM_ARM_PREFERRED_TARGET: a `struct kvm_vcpu_init *` for this host's CPU type."""
    init: Any = ffi.new("struct kvm_vcpu_init *")
    ioctl(vm.fd, Aarch64Ioctl.KVM_ARM_PREFERRED_TARGET, init)
    return init


def vcpu_features(primary: bool) -> list[int]:
    """kvm_vcpu_init.features words: PSCI 0.2 for all, and every vCPU but the first starts
    powered off until the guest turns it on (PSCI CPU_ON)."""
    bits = 1 << VcpuFeature.PSCI_0_2
    if not primary:
        bits |= 1 << VcpuFeature.POWER_OFF
    return [bits, 0, 0, 0, 0, 0, 0]


def init_vcpu(vcpu: Vcpu, target: Any, primary: bool) -> None:
    """KVM_ARM_VCPU_INIT with the preferred target and `vcpu_features`."""
    init: Any = ffi.new("struct kvm_vcpu_init *")
    init.target = target.target
    for i, word in enumerate(vcpu_features(primary)):
        init.features[i] = target.features[i] | word
    ioctl(vcpu.fd, Aarch64Ioctl.KVM_ARM_VCPU_INIT, init)


def boot_registers(entry: int, fdt_addr: int) -> dict[int, int]:
    """The first vCPU's registers at the kernel's entry (booting.rst): x0 = the device tree's
    address, x1-x3 zero, PC the start of the Image, EL1h with D, A, I and F masked."""
    return {
        x_reg(0): fdt_addr,
        x_reg(1): 0,
        x_reg(2): 0,
        x_reg(3): 0,
        PC: entry,
        PSTATE: BOOT_PSTATE,
    }


def set_boot_registers(vcpu: Vcpu, entry: int, fdt_addr: int) -> None:
    for reg, value in boot_registers(entry, fdt_addr).items():
        vcpu.set_one_reg(reg, 8, value)


# --- the vGIC ----------------------------------------------------------------------------------


def create_vgic(vm: Vm, dist: int, redist: int, cpu_if: int, nr_irqs: int) -> KvmDevice:
    """The in-kernel GIC: a GICv3 (distributor at `dist`, redistributors from `redist`) where KVM
    has one, else a GICv2 (CPU interface at `cpu_if`); `nr_irqs` interrupts in all, the 32
    private ones included. Its `type` says which. Its init (`init_vgic`) waits for the vCPUs."""
    v3 = device_type_exists(vm, DeviceType.ARM_VGIC_V3)
    device = KvmDevice(vm, DeviceType.ARM_VGIC_V3 if v3 else DeviceType.ARM_VGIC_V2)
    try:
        if v3:
            device.set_attr(VgicGroup.ADDR, VgicAddr.V3_DIST, dist)
            device.set_attr(VgicGroup.ADDR, VgicAddr.V3_REDIST, redist)
        else:
            device.set_attr(VgicGroup.ADDR, VgicAddr.V2_DIST, dist)
            device.set_attr(VgicGroup.ADDR, VgicAddr.V2_CPU, cpu_if)
        device.set_attr(VgicGroup.NR_IRQS, 0, nr_irqs, size=4)
    except BaseException:
        device.close()
        raise
    return device


def init_vgic(device: KvmDevice) -> None:
    """KVM_DEV_ARM_VGIC_CTRL_INIT: after every vCPU is created and initialised."""
    device.set_attr(VgicGroup.CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT)
