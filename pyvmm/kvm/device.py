"""In-kernel devices made with KVM_CREATE_DEVICE (arm64's vGIC; later a VFIO bridge or an ITS),
set up through their attributes (KVM_SET_DEVICE_ATTR)."""

from __future__ import annotations

import errno
import os
from typing import Any

from pyvmm.kvm.abi import KVM_CREATE_DEVICE_TEST, Ioctl, ffi
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.ioctl import ioctl
from pyvmm.kvm.vm import Vm


def device_type_exists(vm: Vm, device_type: int) -> bool:
    """Whether KVM can make a device of `device_type` in this VM (KVM_CREATE_DEVICE_TEST)."""
    create: Any = ffi.new("struct kvm_create_device *")
    create.type = device_type
    create.flags = KVM_CREATE_DEVICE_TEST
    try:
        ioctl(vm.fd, Ioctl.KVM_CREATE_DEVICE, create)
    except KvmError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO, errno.EINVAL):
            return False
        raise
    return True


class KvmDevice:
    """A device fd of one VM."""

    def __init__(self, vm: Vm, device_type: int) -> None:
        create: Any = ffi.new("struct kvm_create_device *")
        create.type = device_type
        ioctl(vm.fd, Ioctl.KVM_CREATE_DEVICE, create)
        self.type = device_type
        self.fd: int = create.fd

    def _attr(self, group: int, attr: int, value: Any) -> Any:
        a: Any = ffi.new("struct kvm_device_attr *")
        a.group = group
        a.attr = attr
        a.addr = 0 if value is None else int(ffi.cast("uintptr_t", value))
        return a

    def set_attr(self, group: int, attr: int, value: int | None = None, size: int = 8) -> None:
        """KVM_SET_DEVICE_ATTR: `value` (a `size`-byte integer) for attribute (group, attr);
        None for the attributes that take no value (a control such as an init)."""
        data = None if value is None else ffi.new(f"uint{size * 8}_t *", value)
        ioctl(self.fd, Ioctl.KVM_SET_DEVICE_ATTR, self._attr(group, attr, data))

    def has_attr(self, group: int, attr: int) -> bool:
        try:
            ioctl(self.fd, Ioctl.KVM_HAS_DEVICE_ATTR, self._attr(group, attr, None))
        except KvmError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
