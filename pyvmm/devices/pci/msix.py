"""MSI-X: the capability, the vector table and the pending-bit array of one PCI function.

Each vector has a GSI whose KVM route carries the address and data the guest programmed, and an
eventfd registered as that GSI's irqfd (an `EventFdIrq`, like every other interrupt line):
`notify(vector)` is one eventfd write and no exit. A masked vector (or a masked or disabled
function) records the interrupt in the PBA instead and fires it when unmasked, as the
specification requires. The capability and table entry layouts are declared below with the
offsets <linux/pci_regs.h> gives them (tests/unit/devices/pci/test_headers.py checks them).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.cdecl import declare, field_type
from pyvmm.devices.irq import EventFdIrq
from pyvmm.devices.pci.config import CAP_HEADER_SIZE, CapabilityId, PciConfigSpace

# pci_regs.h has offsets, not structs: these are named after its PCI_MSIX_* macros.
ffi: Any = declare(
    "pci_msix",
    """
    struct msix_cap {
        uint8_t  cap_id;
        uint8_t  cap_next;
        uint16_t flags;
        uint32_t table;
        uint32_t pba;
    };
    struct msix_table_entry {
        uint32_t lower_addr;
        uint32_t upper_addr;
        uint32_t data;
        uint32_t vector_ctrl;
    };
    """,
)

TABLE_ENTRY_SIZE = ffi.sizeof("struct msix_table_entry")
MAX_VECTORS = 2048
NO_VECTOR = 0xFFFF
BIR_MASK = 0x7  # the BAR index in the low bits of the table and PBA offsets


class MessageControl(enum.IntFlag):
    TABLE_SIZE_MASK = 0x7FF
    FUNCTION_MASK = 1 << 14
    ENABLE = 1 << 15


class CapReg(enum.IntEnum):
    """The MSI-X capability's registers, by offset from the capability."""

    MESSAGE_CONTROL = ffi.offsetof("struct msix_cap", "flags")
    TABLE = ffi.offsetof("struct msix_cap", "table")
    PBA = ffi.offsetof("struct msix_cap", "pba")


class EntryField(enum.IntEnum):
    """The fields of a table entry, by offset from the entry."""

    ADDRESS_LO = ffi.offsetof("struct msix_table_entry", "lower_addr")
    ADDRESS_HI = ffi.offsetof("struct msix_table_entry", "upper_addr")
    DATA = ffi.offsetof("struct msix_table_entry", "data")
    VECTOR_CONTROL = ffi.offsetof("struct msix_table_entry", "vector_ctrl")


VECTOR_MASKED = 1
CONTROL_SIZE = ffi.sizeof(field_type(ffi, "struct msix_cap", "flags"))


class MsixError(Exception):
    """A vector count or table placement the capability cannot describe."""


class Msix:
    """MSI-X state for one function, with its capability added to `config`."""

    def __init__(
        self,
        config: PciConfigSpace,
        num_vectors: int,
        bar: int,
        table_offset: int,
        pba_offset: int,
        allocate_gsi: Callable[[], int],
        set_route: Callable[[int, int, int], None],
        register_irqfd: Callable[[int, int], None],
    ) -> None:
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise MsixError(f"{num_vectors} MSI-X vectors; 1 to {MAX_VECTORS} are possible")
        if table_offset & BIR_MASK or pba_offset & BIR_MASK:
            raise MsixError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.num_vectors = num_vectors
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table_size = num_vectors * TABLE_ENTRY_SIZE
        self.pba_size = ((num_vectors + 63) // 64) * 8
        self._config = config
        self._set_route = set_route
        self._lock = threading.Lock()
        self._entries: Any = ffi.new("struct msix_table_entry[]", num_vectors)
        for entry in self._entries:
            entry.vector_ctrl = VECTOR_MASKED
        self._table = ffi.buffer(self._entries)  # the entries as the guest reads and writes them
        self._pending = [False] * num_vectors
        # Called after the driver changed what can be delivered (a mask, the enable bit, an
        # entry): whoever hands a vector's irqfd to another signaller looks again.
        self._watchers: list[Callable[[], None]] = []
        self.vectors = [EventFdIrq(allocate_gsi()) for _ in range(num_vectors)]
        for vector in self.vectors:
            register_irqfd(vector.fd, vector.gsi)
        cap: Any = ffi.new("struct msix_cap *")
        cap.flags = num_vectors - 1
        cap.table = table_offset | bar
        cap.pba = pba_offset | bar
        mask: Any = ffi.new("struct msix_cap *")
        mask.flags = MessageControl.ENABLE | MessageControl.FUNCTION_MASK
        self.cap_offset = config.add_capability(
            CapabilityId.MSIX,
            ffi.buffer(cap)[CAP_HEADER_SIZE:],
            ffi.buffer(mask)[CAP_HEADER_SIZE:],
        )
        # Read on every interrupt: worked out once (an enum member costs a lookup each time).
        self._control_at = self.cap_offset + int(CapReg.MESSAGE_CONTROL)

    @property
    def gsis(self) -> list[int]:
        return [v.gsi for v in self.vectors]

    @property
    def eventfds(self) -> list[int]:
        return [v.fd for v in self.vectors]

    def close(self) -> None:
        for vector in self.vectors:
            vector.close()
        self.vectors = []

    def _control(self) -> MessageControl:
        return MessageControl(self._config.get(self._control_at, CONTROL_SIZE))

    @property
    def enabled(self) -> bool:
        return MessageControl.ENABLE in self._control()

    def _deliverable(self, vector: int) -> bool:
        control = self._control()
        if MessageControl.ENABLE not in control or MessageControl.FUNCTION_MASK in control:
            return False
        return not self._entries[vector].vector_ctrl & VECTOR_MASKED

    def notify(self, vector: int) -> None:
        """Raise `vector` now, or mark it pending if it is masked. Out-of-range is ignored."""
        if not 0 <= vector < self.num_vectors:
            return
        with self._lock:
            if self._deliverable(vector):
                self._fire(vector)
            else:
                self._pending[vector] = True

    def _fire(self, vector: int) -> None:
        self.vectors[vector].trigger()

    def direct_fd(self, vector: int) -> int | None:
        """The irqfd of `vector` while it can be delivered (MSI-X on, nothing masked): a
        signaller that writes it raises the interrupt without this object (vhost). None while
        the vector is masked or out of range: signals must come through `notify` then, which
        keeps them pending."""
        if not 0 <= vector < self.num_vectors:
            return None
        with self._lock:
            return self.vectors[vector].fd if self._deliverable(vector) else None

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` (not under this object's lock) whenever `direct_fd` may change."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    def control_written(self) -> None:
        """Call after a config write that may have touched the message control."""
        with self._lock:
            self._flush_pending()
        self._changed()

    def _flush_pending(self) -> None:
        for vector, pending in enumerate(self._pending):
            if pending and self._deliverable(vector):
                self._pending[vector] = False
                self._fire(vector)

    def table_read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            end = offset + len(data)
            if offset < 0 or end > self.table_size:
                data[:] = b"\xff" * len(data)
                return
            data[:] = self._table[offset:end]

    def table_write(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if offset < 0 or end > self.table_size or len(data) not in (4, 8):
            return  # the spec allows only dword and qword accesses
        with self._lock:
            self._table[offset:end] = data
            first = offset // TABLE_ENTRY_SIZE
            last = (end - 1) // TABLE_ENTRY_SIZE
            for vector in range(first, last + 1):
                entry = self._entries[vector]
                address = entry.lower_addr | (entry.upper_addr << 32)
                self._set_route(self.gsis[vector], address, entry.data)
            self._flush_pending()
        self._changed()

    def pba_read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            bits = sum(1 << v for v, pending in enumerate(self._pending) if pending)
            pba = bits.to_bytes(self.pba_size, "little")
            end = offset + len(data)
            if offset < 0 or end > self.pba_size:
                data[:] = b"\xff" * len(data)
                return
            data[:] = pba[offset:end]
