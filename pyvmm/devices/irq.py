"""Interrupt lines that devices raise: an eventfd the kernel turns into an interrupt (irqfd)."""

from __future__ import annotations

import os
from typing import Protocol


class IrqLine(Protocol):
    """An edge-triggered interrupt a device can raise."""

    def trigger(self) -> None: ...


class EventFdIrq:
    """An eventfd registered as an irqfd for `gsi`: `trigger()` injects an edge, no exit taken."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            # The counter is saturated: an interrupt is already pending, which is all we need.
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
