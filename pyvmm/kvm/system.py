"""The KVM system object: /dev/kvm, its API version, capabilities and supported CPUID."""

from __future__ import annotations

import errno
import os
from typing import Any

from pyvmm.kvm.abi import KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, Cap, Ioctl, ffi
from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.kvm.errors import KvmError, KvmUnavailableError, MissingCapabilityError
from pyvmm.kvm.ioctl import ioctl

DEFAULT_KVM_PATH = "/dev/kvm"

# What every pyvmm VM relies on: in-kernel irqchip and PIT, irqfd/ioeventfd data paths (level
# PCI interrupts through resampling irqfds), memory slots from user memory, CPUID2 and the
# ability to kick vCPUs out of KVM_RUN.
REQUIRED_CAPS = (
    Cap.KVM_CAP_IRQCHIP,
    Cap.KVM_CAP_HLT,
    Cap.KVM_CAP_USER_MEMORY,
    Cap.KVM_CAP_EXT_CPUID,
    Cap.KVM_CAP_PIT2,
    Cap.KVM_CAP_IRQFD,
    Cap.KVM_CAP_IRQFD_RESAMPLE,
    Cap.KVM_CAP_IOEVENTFD,
    Cap.KVM_CAP_IMMEDIATE_EXIT,
)


class Kvm:
    """An open /dev/kvm with its API version and required capabilities checked."""

    def __init__(self, path: str = DEFAULT_KVM_PATH) -> None:
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
        for cap in REQUIRED_CAPS:
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

    def max_vcpus(self) -> int:
        return self.check_extension(Cap.KVM_CAP_MAX_VCPUS) or self.check_extension(
            Cap.KVM_CAP_NR_VCPUS
        )

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID as a list of plain entries the arch code may edit."""
        cpuid: Any = ffi.new("struct kvm_cpuid2 *", {"entries": KVM_MAX_CPUID_ENTRIES})
        cpuid.nent = KVM_MAX_CPUID_ENTRIES
        try:
            ioctl(self.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, cpuid)
        except KvmError as e:
            if e.errno == errno.E2BIG:
                raise MissingCapabilityError(
                    f"{self.path}: more than {KVM_MAX_CPUID_ENTRIES} CPUID entries"
                ) from None
            raise
        return [CpuidEntry.from_c(cpuid.entries[i]) for i in range(cpuid.nent)]

    def create_vm_fd(self) -> int:
        return ioctl(self.fd, Ioctl.KVM_CREATE_VM, 0)
