"""Split virtqueues (virtio 1.2, section 2.7), device side, hardened against hostile drivers.

A `SplitQueue` is driven by one device worker thread. `pop` walks the next available descriptor
chain and hands back its buffers as zero-copy memoryviews of guest RAM (for `os.preadv` /
`os.pwritev`); `add_used` returns a chain to the driver. Every guest-supplied address and length
is checked through `GuestMemory`; anything a driver writes into the rings or descriptor tables
ends in a `QueueError` subclass at worst, after a bounded amount of work.

Behaviour the device code relies on:
- A malformed chain raises an `InvalidChain` subclass *after* its avail ring slot is consumed;
  `err.head` is the head index to give back with `add_used(err.head, 0)`, or None when the head
  itself is out of range (then nothing can be returned for it).
- `BadAvailIndex` (avail.idx more than the queue size ahead) consumes nothing: the driver is
  broken and the device should set DEVICE_NEEDS_RESET.
- Zero-length descriptors are dropped: they yield no view, their address is not checked and
  their WRITE flag is ignored, but they still count towards the chain length and their NEXT
  link is followed.

The ring indexes are read and written as single 16-bit native loads and stores (a torn used.idx
would make the driver see a bogus index); hosts are little-endian, as virtio 1.x rings are. Their
order against the rest of the rings comes from `pyvmm.native.fences`, at each place below. The
layouts are the cffi declarations below, which tests/unit/devices/virtio/test_headers.py checks
against <linux/virtio_ring.h>.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Any

from pyvmm.cdecl import declare, field_index, field_type, int_format, struct_for
from pyvmm.memory import GuestMemory, GuestMemoryError
from pyvmm.native import fences

if sys.byteorder != "little":  # pragma: no cover - x86_64 and aarch64 hosts only
    raise ImportError("pyvmm virtqueues need a little-endian host")


# The header's names (vring_*) for what virtio 1.2 section 2.7 calls virtq_desc, virtq_avail,
# virtq_used_elem and virtq_used. Each ring is followed by an event field that C cannot declare:
# used_event is avail->ring[size] and avail_event a u16 where used->ring[size] would be (the
# header's vring_used_event and vring_avail_event).
ffi: Any = declare(
    "virtio_ring",
    """
    struct vring_desc {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
    };
    struct vring_avail {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[];
    };
    struct vring_used_elem {
        uint32_t id;
        uint32_t len;
    };
    struct vring_used {
        uint16_t flags;
        uint16_t idx;
        struct vring_used_elem ring[];
    };
    """,
)


class VirtqFlags(enum.IntFlag):
    """Descriptor flags."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
UNLIMITED = sys.maxsize
# The spec forbids chains of 2^32 bytes or more; the used length (u32) must fit too.
MAX_CHAIN_BYTES = (1 << 32) - 1
MAX_USED_LEN = (1 << 32) - 1

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
IDX_MASK = 0xFFFF

DESC_SIZE: int = ffi.sizeof("struct vring_desc")
USED_ELEM_SIZE: int = ffi.sizeof("struct vring_used_elem")
_AVAIL_RING_AT: int = ffi.offsetof("struct vring_avail", "ring")
_USED_RING_AT: int = ffi.offsetof("struct vring_used", "ring")
_AVAIL_ENTRY = field_type(ffi, "struct vring_avail", "ring").item
_USED_WORD = field_type(ffi, "struct vring_used_elem", "id")
_AVAIL_ENTRY_SIZE: int = ffi.sizeof(_AVAIL_ENTRY)
_EVENT_SIZE = _AVAIL_ENTRY_SIZE  # used_event and avail_event are u16s, as ring entries are

_DESC = struct_for(ffi, "struct vring_desc", "addr", "len", "flags", "next")

# The avail ring is read as u16s; the used ring's flags, idx and avail_event are written as u16s
# and its elements as u32s. Where each field is in those views:
_U16 = int_format(ffi, _AVAIL_ENTRY)
_U32 = int_format(ffi, _USED_WORD)
_AVAIL_FLAGS = field_index(ffi, "struct vring_avail", "flags")
_AVAIL_IDX = field_index(ffi, "struct vring_avail", "idx")
_AVAIL_RING = field_index(ffi, "struct vring_avail", "ring")
_USED_FLAGS = field_index(ffi, "struct vring_used", "flags")
_USED_IDX = field_index(ffi, "struct vring_used", "idx")
_USED_ID = field_index(ffi, "struct vring_used_elem", "id")
_USED_LEN = field_index(ffi, "struct vring_used_elem", "len")
_USED_ELEM_WORDS: int = USED_ELEM_SIZE // ffi.sizeof(_USED_WORD)


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table of a queue of `size` entries."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the avail ring of a queue of `size` entries, used_event included."""
    return _AVAIL_RING_AT + _AVAIL_ENTRY_SIZE * size + _EVENT_SIZE


def used_ring_size(size: int) -> int:
    """Bytes of the used ring of a queue of `size` entries, avail_event included."""
    return _USED_RING_AT + USED_ELEM_SIZE * size + _EVENT_SIZE


_NEXT = int(VirtqFlags.NEXT)
_WRITE = int(VirtqFlags.WRITE)
_INDIRECT = int(VirtqFlags.INDIRECT)


class QueueError(Exception):
    """Base of every error a queue raises because of what the driver wrote."""


class QueueConfigError(QueueError):
    """The queue's size or ring addresses as the driver configured them are unusable."""


class InvalidQueueSize(QueueConfigError):
    def __init__(self, size: int) -> None:
        super().__init__(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        self.size = size


class MisalignedRing(QueueConfigError):
    def __init__(self, area: str, addr: int, align: int) -> None:
        super().__init__(f"{area} at {addr:#x} is not {align}-byte aligned")
        self.area = area
        self.addr = addr
        self.align = align


class RingOutsideRam(QueueConfigError):
    def __init__(self, area: str, addr: int, length: int) -> None:
        super().__init__(f"{area} at {addr:#x}+{length:#x} is not wholly inside one RAM region")
        self.area = area
        self.addr = addr
        self.length = length


class RingsOverlap(QueueConfigError):
    """A used ring shares bytes with another ring area: the device's own writes to it would
    change what it reads (a used-ring flag that flips avail.idx, say), for ever."""

    def __init__(self, used: str, other: str) -> None:
        super().__init__(f"{used} overlaps {other}")
        self.used = used
        self.other = other


@dataclass(frozen=True)
class RingArea:
    """One ring area of a queue in guest-physical memory: [start, end)."""

    name: str
    start: int
    end: int
    device_writes: bool = False  # the used ring; the device only reads the other two

    def overlaps(self, other: RingArea) -> bool:
        return self.start < other.end and other.start < self.end

    def renamed(self, prefix: str) -> RingArea:
        return RingArea(f"{prefix}{self.name}", self.start, self.end, self.device_writes)


def check_rings_apart(areas: list[RingArea]) -> None:
    """Raise RingsOverlap if an area the device writes overlaps any other area (areas the
    driver alone writes may overlap one another: the device only reads them)."""
    for written in areas:
        if not written.device_writes:
            continue
        for other in areas:
            if other is not written and written.overlaps(other):
                raise RingsOverlap(written.name, other.name)


class BadAvailIndex(QueueError):
    """avail.idx is more than the queue size ahead of the next index to consume (not consumed)."""

    def __init__(self, avail_idx: int, next_avail: int, size: int) -> None:
        super().__init__(
            f"avail.idx {avail_idx} is {(avail_idx - next_avail) & IDX_MASK} entries ahead of "
            f"{next_avail}, more than the queue size {size}"
        )
        self.avail_idx = avail_idx
        self.next_avail = next_avail


class InvalidChain(QueueError):
    """A malformed descriptor chain, already consumed from the avail ring.

    `head` is the index to return with `add_used(head, 0)`, or None if the head is out of range.
    """

    def __init__(self, head: int | None, message: str) -> None:
        where = f"chain {head}" if head is not None else "chain"
        super().__init__(f"{where}: {message}")
        self.head = head


class BadHeadIndex(InvalidChain):
    def __init__(self, index: int, size: int) -> None:
        super().__init__(None, f"head index {index} is not below the queue size {size}")
        self.index = index


class DescriptorOutOfRange(InvalidChain):
    def __init__(self, head: int, index: int, limit: int) -> None:
        super().__init__(head, f"next index {index} is not below the table's {limit} entries")
        self.index = index


class ChainTooLong(InvalidChain):
    """More descriptors than the table holds: a loop."""

    def __init__(self, head: int, limit: int) -> None:
        super().__init__(head, f"more than {limit} descriptors in one table (a loop)")


class ChainTooLarge(InvalidChain):
    def __init__(self, head: int) -> None:
        super().__init__(head, f"buffers add up to more than {MAX_CHAIN_BYTES} bytes")


class NestedIndirect(InvalidChain):
    def __init__(self, head: int) -> None:
        super().__init__(head, "INDIRECT descriptor inside an indirect table")


class IndirectWithNext(InvalidChain):
    def __init__(self, head: int) -> None:
        super().__init__(head, "descriptor has both INDIRECT and NEXT")


class IndirectTableInvalid(InvalidChain):
    def __init__(self, head: int, length: int, limit: int) -> None:
        super().__init__(
            head,
            f"indirect table length {length} is not a non-zero multiple of {DESC_SIZE} "
            f"of at most {limit} entries (the queue size)",
        )
        self.length = length


class ReadableAfterWritable(InvalidChain):
    def __init__(self, head: int) -> None:
        super().__init__(head, "device-readable buffer after a device-writable one")


class DescriptorOutsideRam(InvalidChain):
    def __init__(self, head: int, addr: int, length: int) -> None:
        super().__init__(head, f"buffer {addr:#x}+{length:#x} is not wholly inside one RAM region")
        self.addr = addr
        self.length = length


class DescriptorReadOnly(InvalidChain):
    """A device-writable buffer in memory the guest may not write (a read-only pmem image)."""

    def __init__(self, head: int, addr: int, length: int) -> None:
        super().__init__(head, f"device-writable buffer {addr:#x}+{length:#x} is read-only memory")
        self.addr = addr
        self.length = length


@dataclass(slots=True)
class DescriptorChain:
    """One available chain: its head index and its buffers as views of guest RAM, in order,
    with their total lengths."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0


class SplitQueue:
    """The device side of one split virtqueue, used from a single worker thread."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_table: int,
        avail_ring: int,
        used_ring: int,
        event_idx: bool,
        *,
        next_avail: int = 0,
        next_used: int = 0,
    ) -> None:
        """Check the layout the driver configured; `next_*` restore saved indexes (default 0)."""
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise InvalidQueueSize(size)
        self._mem = mem
        self._size = size
        self._event_idx = event_idx
        desc_len = desc_table_size(size)
        avail_len = avail_ring_size(size)
        used_len = used_ring_size(size)
        self.areas = [
            RingArea("descriptor table", desc_table, desc_table + desc_len),
            RingArea("available ring", avail_ring, avail_ring + avail_len),
            RingArea("used ring", used_ring, used_ring + used_len, device_writes=True),
        ]
        """Where the rings lie, for checks across queues (`check_rings_apart`)."""
        check_rings_apart(self.areas)
        desc = self._area(mem, "descriptor table", desc_table, desc_len, DESC_ALIGN)
        avail = self._area(mem, "available ring", avail_ring, avail_len, AVAIL_ALIGN)
        used = self._area(mem, "used ring", used_ring, used_len, USED_ALIGN)
        self.desc_table = desc_table
        self.avail_ring = avail_ring
        self.used_ring = used_ring
        self._desc = desc
        # u16 views: flags, idx, ring entries and used_event (ring entry `size`).
        self._avail16 = avail.cast(_U16)
        # u16 views of the used ring: flags, idx and avail_event.
        self._used16 = used.cast(_U16)
        # u32 views of the used elements' ids and lens: element i's at [i] of each.
        elems = used[_USED_RING_AT : _USED_RING_AT + USED_ELEM_SIZE * size].cast(_U32)
        self._used_id = elems[_USED_ID::_USED_ELEM_WORDS]
        self._used_len = elems[_USED_LEN::_USED_ELEM_WORDS]
        self._used_event_at = _AVAIL_RING + size
        self._avail_event_at = (_USED_RING_AT + USED_ELEM_SIZE * size) // _EVENT_SIZE
        self._mask = size - 1
        self._next_avail = next_avail & IDX_MASK
        self._next_used = next_used & IDX_MASK
        self._unsignalled = 0  # used elements published since the last needs_interrupt
        self._signalled_used = self._next_used
        self.budget = UNLIMITED
        """How many more chains `available_chains` may hand out before the device must return
        from the queue: the worker's bound on one round (0 makes the device return at once)."""

    @staticmethod
    def _area(mem: GuestMemory, name: str, addr: int, length: int, align: int) -> memoryview:
        if addr % align:
            raise MisalignedRing(name, addr, align)
        try:
            return mem.view(addr, length)
        except GuestMemoryError as e:
            raise RingOutsideRam(name, addr, length) from e

    @property
    def size(self) -> int:
        return self._size

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @property
    def next_avail(self) -> int:
        """The (wrapping 16-bit) avail index of the next chain `pop` will take."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """The (wrapping 16-bit) used index the next `add_used` will publish."""
        return self._next_used

    def reset(self) -> None:
        """Back to the state of a freshly enabled queue; guest memory is not touched."""
        self._next_avail = 0
        self._next_used = 0
        self._unsignalled = 0
        self._signalled_used = 0

    def release(self) -> None:
        """Drop this queue's views of guest RAM (so the memory can be unmapped); ends its use."""
        for view in (self._used_id, self._used_len, self._used16, self._avail16, self._desc):
            view.release()

    def has_pending(self) -> bool:
        """Whether the driver has made chains available that `pop` has not taken yet."""
        return self._avail16[_AVAIL_IDX] != self._next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; raises `BadAvailIndex` or an `InvalidChain`."""
        avail_idx = self._avail16[_AVAIL_IDX]
        ahead = (avail_idx - self._next_avail) & IDX_MASK
        if ahead == 0:
            return None
        if ahead > self._size:
            raise BadAvailIndex(avail_idx, self._next_avail, self._size)
        # The driver wrote the ring entry and the chain before avail.idx (virtio 1.2, 2.7.13.3.1):
        # read them only after the index.
        fences.acquire()
        head = self._avail16[_AVAIL_RING + (self._next_avail & self._mask)]
        self._next_avail = (self._next_avail + 1) & IDX_MASK
        if head >= self._size:
            raise BadHeadIndex(head, self._size)
        return self._walk(head)

    def undo_pop(self, count: int) -> None:
        """Give back the last `count` chains `pop` took and nothing has used: the next `pop`
        takes them again (a device that took more buffers than the data needed, net RX)."""
        self._next_avail = (self._next_avail - count) & IDX_MASK

    def _walk(self, head: int) -> DescriptorChain:
        mem = self._mem
        table = self._desc
        limit = self._size  # entries in the current table; also the most a chain may visit in it
        budget = limit
        in_indirect = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        total = 0
        readable_len = 0
        index = head
        while True:
            if budget == 0:
                raise ChainTooLong(head, limit)
            budget -= 1
            addr, length, flags, nxt = _DESC.unpack_from(table, index * DESC_SIZE)
            if flags & _INDIRECT:
                if in_indirect:
                    raise NestedIndirect(head)
                if flags & _NEXT:
                    raise IndirectWithNext(head)
                entries, rest = divmod(length, DESC_SIZE)
                # No chain may be longer than the queue size (virtio 1.2, 2.7.5.3.1), indirect
                # tables included: that bounds the work of walking any one chain.
                if rest or not 0 < entries <= self._size:
                    raise IndirectTableInvalid(head, length, self._size)
                try:
                    table = mem.view(addr, length)
                except GuestMemoryError as e:
                    raise DescriptorOutsideRam(head, addr, length) from e
                in_indirect = True
                limit = budget = entries
                index = 0
                continue
            if length:
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise ChainTooLarge(head)
                try:
                    view = mem.view(addr, length)
                except GuestMemoryError as e:
                    raise DescriptorOutsideRam(head, addr, length) from e
                if flags & _WRITE:
                    if view.readonly:
                        raise DescriptorReadOnly(head, addr, length)
                    writable.append(view)
                elif writable:
                    raise ReadableAfterWritable(head)
                else:
                    readable.append(view)
                    readable_len += length
            if not flags & _NEXT:
                return DescriptorChain(head, readable, writable, readable_len, total - readable_len)
            if nxt >= limit:
                raise DescriptorOutOfRange(head, nxt, limit)
            index = nxt

    def add_used(self, head: int, length: int) -> None:
        """Give chain `head` back to the driver with `length` bytes written into it.

        Raises ValueError (a device bug, not the driver's) for an impossible head or length.
        """
        if not 0 <= head < self._size:
            raise ValueError(f"used head {head} is not below the queue size {self._size}")
        if not 0 <= length <= MAX_USED_LEN:
            raise ValueError(f"used length {length} does not fit in 32 bits")
        slot = self._next_used & self._mask
        self._used_id[slot] = head
        self._used_len[slot] = length
        # The element, and the data written into the chain's buffers, are visible before the
        # index that publishes them (virtio 1.2, 2.7.8.2).
        fences.release()
        self._next_used = (self._next_used + 1) & IDX_MASK
        self._used16[_USED_IDX] = self._next_used
        self._unsignalled += 1

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what `add_used` published since last asked.

        False when nothing was published since the previous call.
        """
        if self._unsignalled == 0:
            return False
        # used.idx is visible before the driver's suppression fields are read: else a driver that
        # re-enabled interrupts and then saw the old used.idx waits for ever (virtio 1.2, 2.7.7.2;
        # the driver's side of it is 2.7.13.4.1).
        fences.full()
        old = self._signalled_used
        new = self._next_used
        many = self._unsignalled > IDX_MASK
        self._signalled_used = new
        self._unsignalled = 0
        if self._event_idx:
            event = self._avail16[self._used_event_at]
            return many or ((new - event - 1) & IDX_MASK) < ((new - old) & IDX_MASK)
        return not self._avail16[_AVAIL_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> None:
        """Ask the driver to notify on new chains; re-check `has_pending` afterwards."""
        if self._event_idx:
            self._used16[self._avail_event_at] = self._next_avail
        else:
            self._used16[_USED_FLAGS] = 0
        # Our request is visible before the caller re-reads avail.idx: else a chain the driver
        # made available without notifying (it saw the old request) waits (virtio 1.2, 2.7.10;
        # the re-check of 2.7.14's note, from the device's side).
        fences.full()

    def disable_notification(self) -> None:
        """Tell the driver notifications are not needed (a hint; it may still notify)."""
        if not self._event_idx:
            self._used16[_USED_FLAGS] = VIRTQ_USED_F_NO_NOTIFY
        # With EVENT_IDX, leaving avail_event behind next_avail suppresses further notifies.
