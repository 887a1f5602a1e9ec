"""KVM_CREATE_DEVICE and device attributes as the vGIC uses them, with the ioctls recorded
(no arm64 KVM here): which attributes, in which order, with what values behind `addr`."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from pyvmm.kvm import aarch64 as kvm_arm
from pyvmm.kvm import device as device_module
from pyvmm.kvm.abi import KVM_CREATE_DEVICE_TEST, Ioctl, ffi
from pyvmm.kvm.errors import KvmError

Call = tuple[str, int, int, int | None]  # (ioctl, group or type, attr or flags, value)
NO_V3: Call = ("no_v3", 0, 0, None)  # put in the calls: this KVM has no GICv3


class FakeVm:
    fd = 100


@pytest.fixture
def kvm(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Record each ioctl; asking for a GICv3 fails once NO_V3 is in the list."""
    calls: list[Call] = []

    def ioctl(fd: int, request: Ioctl, arg: Any = 0) -> int:
        if request == Ioctl.KVM_CREATE_DEVICE:
            testing = arg.flags & KVM_CREATE_DEVICE_TEST
            if testing and arg.type == kvm_arm.DeviceType.ARM_VGIC_V3 and NO_V3 in calls:
                raise KvmError("KVM_CREATE_DEVICE", errno.ENODEV)
            calls.append(("create", arg.type, arg.flags, None))
            arg.fd = 200
            return 0
        size = {kvm_arm.VgicGroup.NR_IRQS: 4}.get(arg.group, 8)
        value = None
        if arg.addr:
            ptr = ffi.cast(f"uint{size * 8}_t *", arg.addr)
            value = int(ptr[0])
        calls.append((request.name, arg.group, arg.attr, value))
        return 0

    monkeypatch.setattr(device_module, "ioctl", ioctl)
    monkeypatch.setattr(device_module.os, "close", lambda fd: None)
    return calls


def test_a_gicv3_gets_its_distributor_redistributors_and_interrupt_count(
    kvm: list[Call],
) -> None:
    gic = kvm_arm.create_vgic(FakeVm(), 0x3FFF_0000, 0x3C00_0000, 0x3FFD_0000, 128)  # type: ignore[arg-type]
    kvm_arm.init_vgic(gic)
    v3 = kvm_arm.DeviceType.ARM_VGIC_V3
    assert gic.type == v3 and gic.fd == 200
    assert kvm == [
        ("create", v3, KVM_CREATE_DEVICE_TEST, None),
        ("create", v3, 0, None),
        ("KVM_SET_DEVICE_ATTR", 0, kvm_arm.VgicAddr.V3_DIST, 0x3FFF_0000),
        ("KVM_SET_DEVICE_ATTR", 0, kvm_arm.VgicAddr.V3_REDIST, 0x3C00_0000),
        ("KVM_SET_DEVICE_ATTR", 3, 0, 128),
        ("KVM_SET_DEVICE_ATTR", 4, kvm_arm.KVM_DEV_ARM_VGIC_CTRL_INIT, None),
    ]


def test_without_a_gicv3_the_vm_gets_a_gicv2_with_its_cpu_interface(kvm: list[Call]) -> None:
    kvm.append(NO_V3)
    gic = kvm_arm.create_vgic(FakeVm(), 0x3FFF_0000, 0x3C00_0000, 0x3FFD_0000, 128)  # type: ignore[arg-type]
    v2 = kvm_arm.DeviceType.ARM_VGIC_V2
    assert gic.type == v2
    assert kvm[1:] == [
        ("create", v2, 0, None),
        ("KVM_SET_DEVICE_ATTR", 0, kvm_arm.VgicAddr.V2_DIST, 0x3FFF_0000),
        ("KVM_SET_DEVICE_ATTR", 0, kvm_arm.VgicAddr.V2_CPU, 0x3FFD_0000),
        ("KVM_SET_DEVICE_ATTR", 3, 0, 128),
    ]
