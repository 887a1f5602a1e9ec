"""Port-I/O and MMIO buses: guest address ranges routed to `BusDevice`s.

A device sees offsets relative to the base it was inserted at, as in crosvm and Firecracker.
Each device is called under its own lock, so device code never runs concurrently with itself
even when several vCPU threads (or a device's input thread) reach it at once.

A device whose handler raises does not end the vCPU that reached it: the failure is logged
(rate-limited: the guest chooses the accesses) and the access completes, a read as all-ones.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

from pyvmm.ratelimit import GuestLog

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """A bus device: `read` fills `data`, `write` consumes it; offsets are base-relative."""

    def read(self, offset: int, data: memoryview) -> None: ...

    def write(self, offset: int, data: bytes | memoryview) -> None: ...


class BusOverlapError(Exception):
    """Two devices were given address ranges that overlap."""


@dataclass(order=True)
class _Entry:
    base: int
    length: int
    name: str = field(compare=False)
    device: BusDevice = field(compare=False)
    lock: threading.Lock = field(compare=False, default_factory=threading.Lock)
    guest_log: GuestLog = field(compare=False, init=False)

    def __post_init__(self) -> None:
        self.guest_log = GuestLog(log, self.name, burst=1)

    def failed(self, access: str, addr: int, exc: Exception) -> None:
        log.debug("%s: %s at %#x failed", self.name, access, addr, exc_info=exc)
        self.guest_log.error(
            "device error",
            "%s at %#x failed (%s: %s); it completes as a floating bus would",
            access,
            addr,
            type(exc).__name__,
            exc,
        )


class Bus:
    """A sorted, non-overlapping map of [base, base+length) ranges to devices."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: list[_Entry] = []
        self._bases: list[int] = []

    def insert(self, device: BusDevice, base: int, length: int, name: str = "") -> None:
        if length <= 0:
            raise ValueError(f"{self.name}: device {name!r} has an empty range at {base:#x}")
        name = name or type(device).__name__
        for e in self._entries:
            if base < e.base + e.length and e.base < base + length:
                raise BusOverlapError(
                    f"{self.name}: {name} at {base:#x}-{base + length - 1:#x} overlaps "
                    f"{e.name} at {e.base:#x}-{e.base + e.length - 1:#x}"
                )
        i = bisect.bisect(self._bases, base)
        self._entries.insert(i, _Entry(base, length, name, device))
        self._bases.insert(i, base)

    def remove(self, base: int) -> BusDevice:
        """Take out the device inserted at `base`."""
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise KeyError(f"{self.name}: no device at {base:#x}")
        del self._bases[i]
        return self._entries.pop(i).device

    def _find(self, addr: int, size: int) -> _Entry | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i < 0:
            return None
        e = self._entries[i]
        if addr + size <= e.base + e.length:
            return e
        return None

    def device_at(self, addr: int) -> BusDevice | None:
        e = self._find(addr, 1)
        return e.device if e else None

    def read(self, addr: int, data: memoryview) -> bool:
        """Let the device at `addr` fill `data`; False (data untouched) if nothing is there."""
        e = self._find(addr, len(data))
        if e is None:
            return False
        try:
            with e.lock:
                e.device.read(addr - e.base, data)
        except Exception as exc:
            e.failed("read", addr, exc)
            data[:] = b"\xff" * len(data)
        return True

    def write(self, addr: int, data: bytes | memoryview) -> bool:
        """Give `data` to the device at `addr`; False if nothing is there."""
        e = self._find(addr, len(data))
        if e is None:
            return False
        try:
            with e.lock:
                e.device.write(addr - e.base, data)
        except Exception as exc:
            e.failed("write", addr, exc)
        return True
