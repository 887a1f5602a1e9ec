"""The generic vCPU interface: ONE_REG access goes to KVM (arm64 reads its registers this way;
x86 KVM refuses it, cleanly)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvmm.kvm import Kvm, KvmError, Vcpu, Vm

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no KVM")

# An arm64 core register id (X0): KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE.
ARM64_X0 = 0x6030_0000_0010_0000


@pytest.fixture
def vcpu() -> Iterator[Vcpu]:
    kvm = Kvm()
    vm = Vm(kvm)
    v = vm.create_vcpu(0)
    yield v
    v.close()
    vm.close()
    kvm.close()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 KVM has no ONE_REG")
def test_one_reg_reaches_kvm_and_its_refusal_is_a_kvm_error(vcpu: Vcpu) -> None:
    with pytest.raises(KvmError, match="KVM_GET_ONE_REG"):
        vcpu.get_one_reg(ARM64_X0, 8)
    with pytest.raises(KvmError, match="KVM_SET_ONE_REG"):
        vcpu.set_one_reg(ARM64_X0, 8, 5)
