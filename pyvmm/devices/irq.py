"""Interrupt lines that devices raise: eventfds the kernel turns into interrupts (irqfds).

An `EventFdIrq` is an edge: each write injects one interrupt (ISA lines, MSI-X vectors). A
`LevelIrq` is a level-triggered line as PCI INTx is: KVM holds the line asserted from the write
until the guest acknowledges it (EOI), then lowers it and signals the resample eventfd; the
line's owner then raises it again if it still has something pending. Several devices may share
one level line (one GSI), each with its own pair of eventfds: none can lose another's interrupt.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol


class IrqLine(Protocol):
    """An interrupt a device can raise."""

    def trigger(self) -> None: ...


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _signal(fd: int) -> None:
    # A saturated counter means an interrupt is already pending, which is all we need.
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)


class EventFdIrq:
    """An eventfd registered as an irqfd for `gsi`: `trigger()` injects an edge, no exit taken."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = _eventfd()

    def trigger(self) -> None:
        _signal(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LevelIrq:
    """A level-triggered line on `gsi`: `fd` is registered as a resampling irqfd whose resample
    eventfd is `resample_fd` (KVM_IRQFD_FLAG_RESAMPLE)."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = _eventfd()
        self.resample_fd = _eventfd()

    @classmethod
    def from_fds(cls, gsi: int, fd: int, resample_fd: int) -> LevelIrq:
        """The line whose eventfds another process made and registered (a device process's
        view of its INTx line); the object owns the fds from now on."""
        line = cls.__new__(cls)
        line.gsi, line.fd, line.resample_fd = gsi, fd, resample_fd
        return line

    def trigger(self) -> None:
        """Assert the line (until the guest's EOI)."""
        _signal(self.fd)

    def take_resample(self) -> bool:
        """Whether the guest has acknowledged the line since the last call (the line is low)."""
        try:
            os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        for name in ("fd", "resample_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
