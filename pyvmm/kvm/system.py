"""The KVM system object: /dev/kvm, its API version and capabilities."""

from __future__ import annotations

import os
from collections.abc import Sequence

from pyvmm.kvm.abi import KVM_API_VERSION, Cap, Ioctl
from pyvmm.kvm.errors import KvmError, KvmUnavailableError, MissingCapabilityError
from pyvmm.kvm.ioctl import ioctl

DEFAULT_KVM_PATH = "/dev/kvm"

# What every pyvmm VM relies on, whatever the architecture: an in-kernel irqchip, irqfd and
# ioeventfd data paths (level PCI interrupts through resampling irqfds), memory slots from user
# memory, GSI routing for MSIs and the ability to kick vCPUs out of KVM_RUN. Each architecture
# adds its own (`pyvmm.kvm.x86_64.REQUIRED_CAPS`).
REQUIRED_CAPS = (
    Cap.KVM_CAP_IRQCHIP,
    Cap.KVM_CAP_USER_MEMORY,
    Cap.KVM_CAP_IRQ_ROUTING,
    Cap.KVM_CAP_IRQFD,
    Cap.KVM_CAP_IRQFD_RESAMPLE,
    Cap.KVM_CAP_IOEVENTFD,
    Cap.KVM_CAP_IMMEDIATE_EXIT,
)


class Kvm:
    """An open /dev/kvm with its API version and required capabilities checked."""

    def __init__(self, path: str = DEFAULT_KVM_PATH, arch_caps: Sequence[Cap] = ()) -> None:
        """Open `path` and check it offers REQUIRED_CAPS and the architecture's `arch_caps`."""
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path}: not found (is the kvm module loaded and is this a KVM host?)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path}: permission denied (add your user to the 'kvm' group or run as root)"
            ) from None
        except OSError as e:
            raise KvmUnavailableError(f"{path}: {e.strerror}") from None
        try:
            version = ioctl(self.fd, Ioctl.KVM_GET_API_VERSION)
        except KvmError as e:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path}: not a KVM device ({e})") from None
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path}: KVM API version {version}, pyvmm needs {KVM_API_VERSION}"
            )
        for cap in (*REQUIRED_CAPS, *arch_caps):
            if not self.check_extension(cap):
                os.close(self.fd)
                raise MissingCapabilityError(f"{path}: KVM lacks {cap.name}, which pyvmm needs")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: Cap) -> int:
        return ioctl(self.fd, Ioctl.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm_fd(self) -> int:
        return ioctl(self.fd, Ioctl.KVM_CREATE_VM, 0)
