"""A KVM virtual machine on any architecture: memory slots, irqfds, ioeventfds, coalesced
zones, vCPUs. The architecture adds its own state (`pyvmm.kvm.x86_64.configure_vm`)."""

from __future__ import annotations

import os
from typing import Any

from pyvmm.kvm.abi import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_IRQFD_FLAG_RESAMPLE,
    KVM_MEM_READONLY,
    Ioctl,
    ffi,
)
from pyvmm.kvm.ioctl import ioctl
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu


class Vm:
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm_fd()
        self._vcpu_mmap_size = kvm.vcpu_mmap_size()

    def create_irqchip(self) -> None:
        """The architecture's default in-kernel interrupt controller (KVM_CREATE_IRQCHIP)."""
        ioctl(self.fd, Ioctl.KVM_CREATE_IRQCHIP)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, readonly: bool = False
    ) -> None:
        """Back guest-physical [guest_phys_addr, +size) with host memory at `host_addr`; a
        read-only slot makes guest writes exit as MMIO (KVM_MEM_READONLY)."""
        region: Any = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = KVM_MEM_READONLY if readonly else 0
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = size
        region.userspace_addr = host_addr
        ioctl(self.fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region)

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Writes to `eventfd` raise interrupt `gsi` in the kernel, no exit needed: an edge, or
        with `resample_fd` a level held until the guest's EOI, after which KVM lowers it and
        signals `resample_fd` (KVM_IRQFD_FLAG_RESAMPLE)."""
        irqfd: Any = ffi.new("struct kvm_irqfd *")
        irqfd.fd = eventfd
        irqfd.gsi = gsi
        if resample_fd is not None:
            irqfd.flags = KVM_IRQFD_FLAG_RESAMPLE
            irqfd.resamplefd = resample_fd
        ioctl(self.fd, Ioctl.KVM_IRQFD, irqfd)

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        irqfd: Any = ffi.new("struct kvm_irqfd *")
        irqfd.fd = eventfd
        irqfd.gsi = gsi
        irqfd.flags = KVM_IRQFD_FLAG_DEASSIGN
        ioctl(self.fd, Ioctl.KVM_IRQFD, irqfd)

    def _ioeventfd(
        self, eventfd: int, addr: int, length: int, datamatch: int | None, pio: bool, flags: int
    ) -> None:
        ioev: Any = ffi.new("struct kvm_ioeventfd *")
        ioev.addr = addr
        ioev.len = length
        ioev.fd = eventfd
        ioev.flags = flags | (KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            ioev.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
            ioev.datamatch = datamatch
        ioctl(self.fd, Ioctl.KVM_IOEVENTFD, ioev)

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int, datamatch: int | None = None, pio: bool = False
    ) -> None:
        """Guest writes of `length` bytes to `addr` signal `eventfd` without leaving the kernel."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, 0)

    def unregister_ioeventfd(
        self, eventfd: int, addr: int, length: int, datamatch: int | None = None, pio: bool = False
    ) -> None:
        self._ioeventfd(eventfd, addr, length, datamatch, pio, KVM_IOEVENTFD_FLAG_DEASSIGN)

    def register_coalesced_zone(self, addr: int, size: int, pio: bool) -> None:
        """Guest writes inside the zone are recorded in the coalesced ring, not exited on
        (see pyvmm/kvm/coalesced.py)."""
        zone: Any = ffi.new("struct kvm_coalesced_mmio_zone *")
        zone.addr = addr
        zone.size = size
        zone.pio = int(pio)
        ioctl(self.fd, Ioctl.KVM_REGISTER_COALESCED_MMIO, zone)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl(self.fd, Ioctl.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(vcpu_id, fd, self._vcpu_mmap_size)
