"""One allocator for what devices take from the machine: MMIO ranges, GSIs, memory slots.

The architecture decides the pools (where MMIO may go, which GSIs are free for MSI, how many
KVM memory slots there are); devices and the VMM take from them here and nowhere else, so two
users can never be handed the same range or number.
"""

from __future__ import annotations

import threading


class AllocationError(Exception):
    """A pool is used up; the message says which and what asked."""


class SystemAllocator:
    """MMIO addresses in [mmio_start, mmio_end), GSIs in [first_gsi, gsi_end), and memory slot
    numbers below `slots`."""

    def __init__(
        self, mmio_start: int, mmio_end: int, first_gsi: int, gsi_end: int, slots: int
    ) -> None:
        self._lock = threading.Lock()
        self._next_mmio = mmio_start
        self._mmio_end = mmio_end
        self._next_gsi = first_gsi
        self._gsi_end = gsi_end
        self._next_slot = 0
        self._slots = slots

    def allocate_mmio(self, size: int, what: str) -> int:
        """A `size`-byte range aligned to its size (a power of two, as BARs are)."""
        if size <= 0 or size & (size - 1):
            raise ValueError(f"{what}: MMIO size {size:#x} is not a power of two")
        with self._lock:
            address = (self._next_mmio + size - 1) & ~(size - 1)
            if address + size > self._mmio_end:
                raise AllocationError(
                    f"{what}: no room for {size:#x} bytes of MMIO below {self._mmio_end:#x}"
                )
            self._next_mmio = address + size
            return address

    def allocate_gsi(self, what: str) -> int:
        with self._lock:
            if self._next_gsi >= self._gsi_end:
                raise AllocationError(f"{what}: all GSIs below {self._gsi_end} are in use")
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def allocate_slot(self, what: str) -> int:
        """A KVM memory slot number."""
        with self._lock:
            if self._next_slot >= self._slots:
                raise AllocationError(f"{what}: all {self._slots} memory slots are in use")
            slot = self._next_slot
            self._next_slot += 1
            return slot
