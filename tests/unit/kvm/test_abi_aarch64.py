"""The arm64 KVM declarations match arm64's own kernel headers (linux-libc-dev-arm64-cross),
checked on any host: the layouts are those of an LP64 little-endian ABI, as on x86_64."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm import vcpu_threads
from pyvmm.kvm import aarch64
from pyvmm.kvm.aarch64 import Aarch64Ioctl, DeviceType, VcpuFeature, VgicAddr, VgicGroup, ffi
from tests.cheaders import layout_facts, mismatches

ARM64_INCLUDE = Path("/usr/aarch64-linux-gnu/include")
HEADERS = ["linux/kvm.h", "asm/ptrace.h"]

pytestmark = pytest.mark.skipif(
    not (ARM64_INCLUDE / "asm" / "kvm.h").exists(),
    reason="arm64 kernel headers missing: apt-get install linux-libc-dev-arm64-cross",
)


def _check(tmp_path: Path, facts: list[tuple[str, int]]) -> list[str]:
    return mismatches(tmp_path, HEADERS, facts, [str(ARM64_INCLUDE)])


def test_vcpu_init_and_core_registers_are_laid_out_as_in_the_header(tmp_path: Path) -> None:
    facts = layout_facts(ffi, ["kvm_vcpu_init", "user_pt_regs"])
    # kvm_regs goes on with the floating-point registers pyvmm never sets: offsets only.
    facts += [
        (f"offsetof(struct kvm_regs, {f})", ffi.offsetof("struct kvm_regs", f))
        for f in ("regs", "sp_el1", "elr_el1", "spsr")
    ]
    assert not _check(tmp_path, facts)


def test_arm64_ioctl_numbers_match_the_header(tmp_path: Path) -> None:
    assert not _check(tmp_path, [(i.name, i.value) for i in Aarch64Ioctl])


def test_one_reg_ids_of_the_boot_registers_and_mpidr_match_the_header(tmp_path: Path) -> None:
    def core(name: str) -> str:
        return f"KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({name})"

    facts = [(core(f"regs.regs[{n}]"), aarch64.x_reg(n)) for n in range(4)]
    facts += [(core("regs.pc"), aarch64.PC), (core("regs.pstate"), aarch64.PSTATE)]
    facts.append(("ARM64_SYS_REG(3, 0, 0, 0, 5)", aarch64.MPIDR_EL1))
    assert not _check(tmp_path, facts)


def test_constants_match_the_header(tmp_path: Path) -> None:
    facts = [
        *((f"KVM_ARM_VCPU_{f.name}", f.value) for f in VcpuFeature),
        *((f"KVM_DEV_TYPE_{t.name}", t.value) for t in DeviceType),
        *((f"KVM_DEV_ARM_VGIC_GRP_{g.name}", g.value) for g in VgicGroup),
        *((f"KVM_VGIC_{a.name[:2]}_ADDR_TYPE_{a.name[3:]}", a.value) for a in VgicAddr),
        ("KVM_DEV_ARM_VGIC_CTRL_INIT", aarch64.KVM_DEV_ARM_VGIC_CTRL_INIT),
        ("KVM_REG_ARM64", aarch64.KVM_REG_ARM64),
        ("KVM_REG_SIZE_U64", aarch64.KVM_REG_SIZE_U64),
        ("KVM_REG_ARM_CORE", aarch64.KVM_REG_ARM_CORE),
        ("KVM_REG_ARM64_SYSREG", aarch64.KVM_REG_ARM64_SYSREG),
        ("PSR_MODE_EL1h", aarch64.PSR_MODE_EL1H),
        ("PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT | PSR_MODE_EL1h", aarch64.BOOT_PSTATE),
        ("KVM_SYSTEM_EVENT_SHUTDOWN", vcpu_threads.SYSTEM_EVENT_SHUTDOWN),
        ("KVM_SYSTEM_EVENT_RESET", vcpu_threads.SYSTEM_EVENT_RESET),
    ]
    assert not _check(tmp_path, facts)


def test_boot_registers_hand_the_kernel_the_device_tree() -> None:
    regs = aarch64.boot_registers(0x8000_0000, 0x9FE0_0000)
    assert regs[aarch64.x_reg(0)] == 0x9FE0_0000
    assert [regs[aarch64.x_reg(n)] for n in (1, 2, 3)] == [0, 0, 0]
    assert regs[aarch64.PC] == 0x8000_0000
    assert regs[aarch64.PSTATE] == 0x3C5


def test_only_the_first_vcpu_starts_powered_on() -> None:
    psci = 1 << VcpuFeature.PSCI_0_2
    assert aarch64.vcpu_features(primary=True)[0] == psci
    assert aarch64.vcpu_features(primary=False)[0] == psci | 1 << VcpuFeature.POWER_OFF
