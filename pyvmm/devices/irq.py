"""Interrupt lines that devices raise: an eventfd the kernel turns into an interrupt (irqfd)."""

from __future__ import annotations

import contextlib
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
        # A saturated counter means an interrupt is already pending, which is all we need.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
