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
from collections.abc import Iterable
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

    @property
    def end(self) -> int:
        return self.base + self.length

    def overlaps(self, other: _Entry) -> bool:
        return self.base < other.end and other.base < self.end

    def __str__(self) -> str:
        return f"{self.name} at {self.base:#x}-{self.end - 1:#x}"

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


@dataclass(frozen=True)
class BusRange:
    """A device to place on a bus at [base, base+length)."""

    device: BusDevice
    base: int
    length: int
    name: str = ""


@dataclass(frozen=True)
class _Map:
    """One version of a bus's map; never changed once made."""

    bases: tuple[int, ...] = ()
    entries: tuple[_Entry, ...] = ()


class Bus:
    """A sorted, non-overlapping map of [base, base+length) ranges to devices.

    The map is copy-on-write: a change builds a new map and publishes it with one reference
    store, so a vCPU looking up an address sees the map from before a change or from after it,
    never half of one (a BAR moved away from its old range but not yet at its new one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._map = _Map()
        self._writer = threading.Lock()  # changes build on the map one at a time

    def insert(self, device: BusDevice, base: int, length: int, name: str = "") -> None:
        """Add one range; BusOverlapError if it overlaps one already there."""
        skipped, _ = self.update(insert=[BusRange(device, base, length, name)])
        if skipped:
            raise skipped[0][1]

    def remove(self, base: int) -> BusDevice:
        """Take out the device inserted at `base`."""
        return self.update(remove=[base])[1][0]

    def update(
        self, remove: Iterable[int] = (), insert: Iterable[BusRange] = ()
    ) -> tuple[list[tuple[BusRange, BusOverlapError]], list[BusDevice]]:
        """Remove the ranges at the `remove` bases, then add `insert`, all as one change. A
        range that would overlap another is left out; returns those with why, and the devices
        removed. KeyError (and no change) if nothing is at a base to remove."""
        with self._writer:
            entries = list(self._map.entries)
            removed: list[BusDevice] = []
            for base in remove:
                match = next((e for e in entries if e.base == base), None)
                if match is None:
                    raise KeyError(f"{self.name}: no device at {base:#x}")
                entries.remove(match)
                removed.append(match.device)
            skipped: list[tuple[BusRange, BusOverlapError]] = []
            for r in insert:
                entry = _Entry(r.base, r.length, r.name or type(r.device).__name__, r.device)
                if r.length <= 0:
                    raise ValueError(f"{self.name}: {entry.name} has an empty range at {r.base:#x}")
                clash = next((e for e in entries if e.overlaps(entry)), None)
                if clash is None:
                    entries.append(entry)
                else:
                    skipped.append((r, BusOverlapError(f"{self.name}: {entry} overlaps {clash}")))
            entries.sort()
            self._map = _Map(tuple(e.base for e in entries), tuple(entries))
        return skipped, removed

    def _find(self, addr: int, size: int) -> _Entry | None:
        """The entry holding all of [addr, addr+size), from one version of the map."""
        m = self._map
        i = bisect.bisect(m.bases, addr) - 1
        if i < 0:
            return None
        e = m.entries[i]
        if addr + size <= e.end:  # the start is in it by the bisect, the end must be too
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
