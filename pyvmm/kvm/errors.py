"""Errors raised by the KVM layer; each says which device, ioctl or capability is at fault."""

from __future__ import annotations

import os


class KvmError(Exception):
    """A KVM ioctl failed."""

    def __init__(self, what: str, errno: int) -> None:
        super().__init__(f"{what}: {os.strerror(errno)}")
        self.errno = errno


class KvmUnavailableError(Exception):
    """/dev/kvm is missing, not accessible, or speaks another API version."""


class MissingCapabilityError(Exception):
    """The host's KVM lacks a capability pyvmm needs."""
