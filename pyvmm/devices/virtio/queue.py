"""Split virtqueues (virtio 1.2, section 2.7), device side, hardened against hostile drivers.

A `SplitQueue` is driven by one device worker thread. `pop` walks the next available descriptor
chain and hands back its buffers as zero-copy memoryviews of guest RAM (for `os.preadv` /
`os.pwritev`); `add_used` returns a chain to the driver. The walk and the used ring's writes are
compiled (pyvmm/native/virtq.c, the one walker of chains, which the net device's frame loops use
too); the queue's state lives in the `struct pyvmm_vq` both sides share. Every guest-supplied
address and length is checked against `GuestMemory`'s regions; anything a driver writes into
the rings or descriptor tables ends in a `QueueError` subclass at worst, after a bounded amount
of work.

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
order against the rest of the rings comes from C11 fences: in virtq.c for the walk and the used
ring, from `pyvmm.native.fences` at each place below. The layouts are the cffi declarations
below, which tests/unit/devices/virtio/test_headers.py checks against <linux/virtio_ring.h> (and
tests/unit/native/test_virtq.py checks virtq.c's against these).
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Any

from pyvmm.cdecl import declare, field_index, field_type, int_format
from pyvmm.memory import GuestMemory, GuestMemoryError
from pyvmm.native import fences, virtq

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
_AVAIL_ENTRY_SIZE: int = ffi.sizeof(_AVAIL_ENTRY)
_EVENT_SIZE = _AVAIL_ENTRY_SIZE  # used_event and avail_event are u16s, as ring entries are

# The avail ring is read as u16s; the used ring's flags and avail_event are written as u16s (its
# elements and idx by virtq.c). Where each field is in those views:
_U16 = int_format(ffi, _AVAIL_ENTRY)
_AVAIL_FLAGS = field_index(ffi, "struct vring_avail", "flags")
_AVAIL_IDX = field_index(ffi, "struct vring_avail", "idx")
_AVAIL_RING = field_index(ffi, "struct vring_avail", "ring")
_USED_FLAGS = field_index(ffi, "struct vring_used", "flags")


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table of a queue of `size` entries."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the avail ring of a queue of `size` entries, used_event included."""
    return _AVAIL_RING_AT + _AVAIL_ENTRY_SIZE * size + _EVENT_SIZE


def used_ring_size(size: int) -> int:
    """Bytes of the used ring of a queue of `size` entries, avail_event included."""
    return _USED_RING_AT + USED_ELEM_SIZE * size + _EVENT_SIZE


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
        # u16 views: flags, idx, ring entries and used_event (ring entry `size`).
        self._avail16 = avail.cast(_U16)
        # u16 views of the used ring: flags, idx and avail_event.
        self._used16 = used.cast(_U16)
        self._used_event_at = _AVAIL_RING + size
        self._avail_event_at = (_USED_RING_AT + USED_ELEM_SIZE * size) // _EVENT_SIZE
        # The compiled side's view of the queue (pyvmm/native/virtq.c): where the rings are, and
        # the indexes, which both sides keep here. The pins keep the rings mapped meanwhile.
        self._views = [desc, avail, used]
        self._pins = [virtq.ffi.from_buffer(view) for view in self._views]
        self._vq: Any = virtq.ffi.new("struct pyvmm_vq *")
        desc_pin, avail_pin, used_pin = self._pins
        self._vq.desc = virtq.ffi.cast("const uint8_t *", desc_pin)
        self._vq.avail = virtq.ffi.cast("uint16_t *", avail_pin)
        self._vq.used = virtq.ffi.cast("uint8_t *", used_pin)
        self._vq.size = size
        self._vq.next_avail = next_avail & IDX_MASK
        self._vq.next_used = next_used & IDX_MASK
        self._signalled_used = next_used & IDX_MASK
        self._walked = virtq.ChainBuffer(size)
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
        return int(self._vq.next_avail)

    @property
    def next_used(self) -> int:
        """The (wrapping 16-bit) used index the next `add_used` will publish."""
        return int(self._vq.next_used)

    @property
    def native(self) -> Any:
        """The compiled side's `struct pyvmm_vq` (for the loops of pyvmm.native.virtq)."""
        return self._vq

    @property
    def walked(self) -> virtq.ChainBuffer:
        """Where the compiled walker puts the chain it walked last."""
        return self._walked

    def reset(self) -> None:
        """Back to the state of a freshly enabled queue; guest memory is not touched."""
        self._vq.next_avail = 0
        self._vq.next_used = 0
        self._vq.unsignalled = 0
        self._signalled_used = 0

    def release(self) -> None:
        """Drop this queue's views of guest RAM (so the memory can be unmapped); ends its use."""
        for pin in self._pins:
            virtq.ffi.release(pin)
        self._vq.desc = self._vq.avail = self._vq.used = virtq.ffi.NULL
        self._vq.size = 0
        for view in (self._used16, self._avail16, *self._views):
            view.release()

    def has_pending(self) -> bool:
        """Whether the driver has made chains available that `pop` has not taken yet."""
        return bool(self._avail16[_AVAIL_IDX] != self._vq.next_avail)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; raises `BadAvailIndex` or an `InvalidChain`."""
        memory = self._mem.native  # held for the walk: it keeps the regions mapped
        got = virtq.lib.pyvmm_vq_pop(self._vq, memory.c, self._walked.chain)
        if got == virtq.POP_NONE:
            return None
        if got == virtq.POP_BAD_AVAIL:
            walked = self._walked.chain
            raise BadAvailIndex(walked.error_index, self._vq.next_avail, self._size)
        return self.walked_chain(memory.views)

    def walked_chain(self, views: list[memoryview]) -> DescriptorChain:
        """The chain the compiled walker put in `walked`, with its buffers as views of guest
        memory (`views`: the regions' views of the table it walked with); its error raised as
        the `InvalidChain` it is."""
        walked = self._walked
        head, readable, writable, readable_len, writable_len, error = (
            virtq.CHAIN_SUMMARY.unpack_from(walked.summary, virtq.CHAIN_SUMMARY_AT)
        )
        if error:
            raise _chain_error(walked.chain, self._size)
        iov, regions, offsets = walked.iov_words, walked.regions, walked.offsets
        buffers = []
        at_len = virtq.IOV_LEN
        for i in range(readable + writable):
            at = offsets[i]
            buffers.append(views[regions[i]][at : at + iov[at_len]])
            at_len += virtq.ChainBuffer.IOV_WORDS
        return DescriptorChain(
            head, buffers[:readable], buffers[readable:], readable_len, writable_len
        )

    def undo_pop(self, count: int) -> None:
        """Give back the last `count` chains `pop` took and nothing has used: the next `pop`
        takes them again (a device that took more buffers than the data needed, net RX)."""
        self._vq.next_avail = (self._vq.next_avail - count) & IDX_MASK

    def add_used(self, head: int, length: int) -> None:
        """Give chain `head` back to the driver with `length` bytes written into it.

        Raises ValueError (a device bug, not the driver's) for an impossible head or length.
        """
        if not 0 <= head < self._size:
            raise ValueError(f"used head {head} is not below the queue size {self._size}")
        if not 0 <= length <= MAX_USED_LEN:
            raise ValueError(f"used length {length} does not fit in 32 bits")
        virtq.lib.pyvmm_vq_add_used(self._vq, head, length)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what `add_used` published since last asked.

        False when nothing was published since the previous call.
        """
        unsignalled = self._vq.unsignalled
        if unsignalled == 0:
            return False
        # used.idx is visible before the driver's suppression fields are read: else a driver that
        # re-enabled interrupts and then saw the old used.idx waits for ever (virtio 1.2, 2.7.7.2;
        # the driver's side of it is 2.7.13.4.1).
        fences.full()
        old = self._signalled_used
        new = int(self._vq.next_used)
        many = bool(unsignalled > IDX_MASK)
        self._signalled_used = new
        self._vq.unsignalled = 0
        if self._event_idx:
            event = self._avail16[self._used_event_at]
            return many or ((new - event - 1) & IDX_MASK) < ((new - old) & IDX_MASK)
        return not self._avail16[_AVAIL_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> None:
        """Ask the driver to notify on new chains; re-check `has_pending` afterwards."""
        if self._event_idx:
            self._used16[self._avail_event_at] = self._vq.next_avail
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


def _chain_error(c: Any, size: int) -> InvalidChain:
    """The exception for a chain the compiled walker refused (its `struct pyvmm_chain`)."""
    head, error = int(c.head), c.error
    if error == virtq.CHAIN_BAD_HEAD:
        return BadHeadIndex(head, size)
    if error == virtq.CHAIN_OUT_OF_RANGE:
        return DescriptorOutOfRange(head, c.error_index, c.error_len)
    if error == virtq.CHAIN_TOO_LONG:
        return ChainTooLong(head, c.error_len)
    if error == virtq.CHAIN_TOO_LARGE:
        return ChainTooLarge(head)
    if error == virtq.CHAIN_NESTED_INDIRECT:
        return NestedIndirect(head)
    if error == virtq.CHAIN_INDIRECT_WITH_NEXT:
        return IndirectWithNext(head)
    if error == virtq.CHAIN_INDIRECT_INVALID:
        return IndirectTableInvalid(head, c.error_len, size)
    if error == virtq.CHAIN_READABLE_AFTER_WRITABLE:
        return ReadableAfterWritable(head)
    if error == virtq.CHAIN_OUTSIDE_RAM:
        return DescriptorOutsideRam(head, c.error_addr, c.error_len)
    if error == virtq.CHAIN_READ_ONLY:
        return DescriptorReadOnly(head, c.error_addr, c.error_len)
    raise AssertionError(f"unknown chain error {error} from the compiled walker")
