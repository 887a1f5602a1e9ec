"""Coalesced writes: guest writes KVM records in a ring instead of exiting to the VMM.

A write into a registered zone (MMIO or port I/O) does not leave the kernel: KVM appends it to
a ring shared by the whole VM, mapped at a fixed page of every vCPU's kvm_run mapping, and the
VMM replays the ring before it handles the next exit of any vCPU. That suits registers whose
writes only matter to a later access that exits anyway: the PCI configuration address at 0xcf8,
written before every configuration read or write at 0xcfc, halves the exits of a PCI scan (QEMU
coalesces the same port).

The ring's indexes come from the kernel and are checked before use; an entry's address and
length are checked against the zones registered, so nothing in the ring can make the VMM read
outside the ring's page or dispatch a write nobody registered.
"""

from __future__ import annotations

import functools
import mmap
import threading
from collections.abc import Callable

from pyvmm.kvm.abi import ffi, struct_for

PAGE_SIZE = mmap.PAGESIZE
_RING_HEADER = ffi.sizeof("struct kvm_coalesced_mmio_ring")
_ENTRY_SIZE = ffi.sizeof("struct kvm_coalesced_mmio")
RING_ENTRIES = (PAGE_SIZE - _RING_HEADER) // _ENTRY_SIZE
_FIRST = ffi.offsetof("struct kvm_coalesced_mmio_ring", "first")
_INDEXES = struct_for("struct kvm_coalesced_mmio_ring", "first", "last")
_FIRST_FIELD = struct_for("struct kvm_coalesced_mmio_ring", "first")
_ENTRY = struct_for("struct kvm_coalesced_mmio", "phys_addr", "len", "pio", "data")

WriteHandler = Callable[[int, bytes], object]


class CoalescedRing:
    """The VM's ring of coalesced writes, read through one vCPU's kvm_run mapping."""

    def __init__(self, vcpu_mapping: mmap.mmap, page_offset: int) -> None:
        self._base = page_offset * PAGE_SIZE
        if page_offset <= 0 or self._base + PAGE_SIZE > len(vcpu_mapping):
            raise ValueError(
                f"coalesced ring page {page_offset} is outside the vCPU mapping "
                f"({len(vcpu_mapping)} bytes)"
            )
        self._page = memoryview(vcpu_mapping)[self._base : self._base + PAGE_SIZE]
        self._zones: list[tuple[int, int, int]] = []  # (pio, first address, end)
        self._lock = threading.Lock()
        self.dropped = 0  # entries that matched no zone (the kernel's bug, not the guest's)
        # ring.indexes() -> (first, last): what the vCPU loop compares after every exit.
        self.indexes = functools.partial(_INDEXES.unpack_from, self._page, _FIRST)

    def add_zone(self, addr: int, size: int, pio: bool) -> None:
        self._zones.append((int(pio), addr, addr + size))

    def pending(self) -> bool:
        first, last = self.indexes()
        return bool(first != last)

    def drain(self, write_pio: WriteHandler, write_mmio: WriteHandler) -> int:
        """Replay the recorded writes in order through the handlers; how many there were.
        Runs before every exit that follows a coalesced write, so it is kept tight."""
        page, zones, unpack_entry = self._page, self._zones, _ENTRY.unpack_from
        with self._lock:
            first, last = _INDEXES.unpack_from(page, _FIRST)
            if first >= RING_ENTRIES or last >= RING_ENTRIES:
                raise ValueError(f"coalesced ring indexes {first}/{last} out of range")
            done = 0
            while first != last:
                addr, length, pio, data = unpack_entry(page, _RING_HEADER + first * _ENTRY_SIZE)
                end = addr + length
                for zone_pio, start, zone_end in zones:
                    if zone_pio == pio and start <= addr and end <= zone_end and length:
                        (write_pio if pio else write_mmio)(addr, data[:length])
                        break
                else:
                    self.dropped += 1
                first = (first + 1) % RING_ENTRIES
                done += 1
            # Hand the slots back once their entries have been read out.
            _FIRST_FIELD.pack_into(page, _FIRST, first)
            return done

    def close(self) -> None:
        self._page.release()
