"""Split virtqueues against a test-side driver: round trips, notifications, hostile rings."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    BadAvailIndex,
    BadHeadIndex,
    ChainTooLarge,
    ChainTooLong,
    DescriptorChain,
    DescriptorOutOfRange,
    DescriptorOutsideRam,
    DescriptorReadOnly,
    IndirectTableInvalid,
    IndirectWithNext,
    InvalidChain,
    InvalidQueueSize,
    MisalignedRing,
    NestedIndirect,
    QueueError,
    ReadableAfterWritable,
    RingOutsideRam,
    RingsOverlap,
    SplitQueue,
    VirtqFlags,
    check_rings_apart,
)
from pyvmm.memory import GuestMemory
from tests.unit.devices.virtio import rings
from tests.unit.devices.virtio.rings import DESC_SIZE

MiB = 1 << 20
HIGH = 1 << 32  # a second RAM region, not adjacent to the first
RAM_END = MiB

DESC = 0x1000
AVAIL = 0x20000
USED = 0x30000
DATA = 0x40000  # buffers and indirect tables from here

NEXT = VirtqFlags.NEXT
WRITE = VirtqFlags.WRITE
INDIRECT = VirtqFlags.INDIRECT

Buf = tuple[int, int, bool]  # guest address, length, device-writable


@pytest.fixture(scope="module")
def module_mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB), (HIGH, 64 * 1024)])
    yield m
    m.close()


@pytest.fixture
def mem(module_mem: GuestMemory) -> GuestMemory:
    module_mem.fill(0, MiB)
    module_mem.fill(HIGH, 64 * 1024)
    return module_mem


class Driver:
    """Just enough of a virtio driver to lay out rings the way a guest would."""

    def __init__(self, mem: GuestMemory, size: int = 16, start: int = 0) -> None:
        self.mem = mem
        self.size = size
        self.avail_idx = start & 0xFFFF
        self.free = 0
        mem.write_u16(AVAIL + rings.AVAIL_IDX, self.avail_idx)
        mem.write_u16(USED + rings.USED_IDX, self.avail_idx)

    def queue(self, event_idx: bool = False, start: int = 0) -> SplitQueue:
        return SplitQueue(
            self.mem,
            self.size,
            DESC,
            AVAIL,
            USED,
            event_idx,
            next_avail=start,
            next_used=start,
        )

    def desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC
    ) -> None:
        self.mem.write(table + DESC_SIZE * i, rings.descriptor(addr, length, flags, nxt))

    def alloc(self) -> int:
        i = self.free
        self.free = (self.free + 1) % self.size
        return i

    def chain(self, bufs: list[Buf]) -> int:
        """Direct descriptors for `bufs`, linked in order; returns the head."""
        idxs = [self.alloc() for _ in bufs]
        for n, (i, (addr, length, wr)) in enumerate(zip(idxs, bufs, strict=True)):
            last = n == len(bufs) - 1
            flags = (WRITE if wr else 0) | (0 if last else NEXT)
            self.desc(i, addr, length, flags, 0 if last else idxs[n + 1])
        return idxs[0]

    def indirect(self, table: int, bufs: list[Buf], flags: int = 0) -> int:
        """An indirect table at `table` for `bufs` and one descriptor naming it; returns it."""
        for n, (addr, length, wr) in enumerate(bufs):
            last = n == len(bufs) - 1
            f = (WRITE if wr else 0) | (0 if last else NEXT)
            self.desc(n, addr, length, f, 0 if last else n + 1, table=table)
        head = self.alloc()
        self.desc(head, table, DESC_SIZE * len(bufs), INDIRECT | flags)
        return head

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.mem.write_u16(AVAIL + rings.avail_entry(self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(AVAIL + rings.AVAIL_IDX, self.avail_idx)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(USED + rings.USED_IDX)

    def used_elem(self, n: int) -> tuple[int, int]:
        at = USED + rings.used_elem(n % self.size)
        return rings.used_element(self.mem.read(at, rings.USED_ELEM_SIZE))

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(USED + rings.USED_FLAGS)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(USED + rings.used_elem(self.size))

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(AVAIL + rings.avail_entry(self.size), value)

    def set_avail_flags(self, value: int) -> None:
        self.mem.write_u16(AVAIL + rings.AVAIL_FLAGS, value)


def pop_one(q: SplitQueue) -> DescriptorChain:
    chain = q.pop()
    assert chain is not None
    return chain


# --- the normal path ---------------------------------------------------------------------------


def test_simple_chain_round_trip(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    mem.write(DATA, b"request!")
    head = d.chain([(DATA, 8, False), (DATA + 0x100, 4, True), (HIGH + 0x10, 16, True)])
    d.publish(head)
    assert q.has_pending()

    chain = pop_one(q)
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"request!"]
    assert [len(v) for v in chain.writable] == [4, 16]
    assert (chain.readable_len, chain.writable_len) == (8, 20)
    chain.writable[0][:] = b"resp"  # written in place: the guest sees it with no copy
    chain.writable[1][:4] = b"high"
    assert mem.read(DATA + 0x100, 4) == b"resp"
    assert mem.read(HIGH + 0x10, 4) == b"high"
    assert q.pop() is None
    assert not q.has_pending()

    q.add_used(chain.head, 4)
    assert d.used_idx == 1
    assert d.used_elem(0) == (head, 4)
    assert (q.next_avail, q.next_used) == (1, 1)


def test_chains_come_out_in_avail_order_and_descriptors_may_be_out_of_order(
    mem: GuestMemory,
) -> None:
    d = Driver(mem)
    q = d.queue()
    d.desc(5, DATA, 1, NEXT, 2)
    d.desc(2, DATA + 1, 2, NEXT | WRITE, 9)
    d.desc(9, DATA + 3, 3, WRITE)
    single = 7
    d.desc(single, DATA + 8, 8)
    d.publish(single, 5)
    assert pop_one(q).head == single
    chain = pop_one(q)
    assert (chain.head, chain.readable_len, chain.writable_len) == (5, 1, 5)
    assert q.pop() is None


def test_used_index_wraps_past_65535(mem: GuestMemory) -> None:
    d = Driver(mem, size=4, start=65533)
    q = d.queue(start=65533)
    for n in range(6):
        head = d.chain([(DATA + n, 1, True)])
        d.publish(head)
        chain = pop_one(q)
        q.add_used(chain.head, n)
        assert d.used_idx == (65534 + n) & 0xFFFF
        assert d.used_elem(65533 + n) == (head, n)
    assert q.next_used == q.next_avail == 3


def test_indexes_wrap_in_a_long_run(mem: GuestMemory) -> None:
    d = Driver(mem, size=2)
    q = d.queue()
    d.desc(0, DATA, 1)
    d.desc(1, DATA, 1, WRITE)
    for n in range(65536 + 3):
        d.publish(n & 1)
        chain = pop_one(q)
        q.add_used(chain.head, n & 0xFF)
    assert q.next_avail == q.next_used == d.used_idx == 3
    assert d.used_elem(2) == (0, 2)


def test_indirect_chain(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    mem.write(DATA + 0x100, b"abc")
    table = DATA + 0x1000
    # The WRITE flag on the descriptor that names the table is ignored, as the spec says.
    head = d.indirect(
        table, [(DATA + 0x100, 3, False), (DATA + 0x200, 5, True), (HIGH, 7, True)], WRITE
    )
    d.publish(head)
    chain = pop_one(q)
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"abc"]
    assert [len(v) for v in chain.writable] == [5, 7]


def test_direct_descriptors_then_one_indirect_make_one_chain(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    table = DATA + 0x1000
    d.desc(0, DATA, 2, 0, table=table)
    d.desc(1, DATA + 2, 3, NEXT, 2)
    d.desc(2, table, DESC_SIZE, INDIRECT)
    d.publish(1)
    chain = pop_one(q)
    assert (chain.head, [len(v) for v in chain.readable], chain.writable) == (1, [3, 2], [])


def test_indirect_table_up_to_the_queue_size(mem: GuestMemory) -> None:
    d = Driver(mem, size=8)
    q = d.queue()
    head = d.indirect(DATA + 0x1000, [(DATA + i, 1, i >= 4) for i in range(8)])
    d.publish(head)
    chain = pop_one(q)
    assert (len(chain.readable), len(chain.writable)) == (4, 4)


def test_indirect_table_longer_than_the_queue_size_is_refused(mem: GuestMemory) -> None:
    """No chain may be longer than the queue size, indirect ones included (virtio 1.2,
    2.7.5.3.1): without that bound one chain could make the device walk 32768 descriptors."""
    d = Driver(mem, size=8)
    q = d.queue()
    head = d.indirect(DATA + 0x1000, [(DATA + i, 1, False) for i in range(9)])
    d.publish(head)
    with pytest.raises(IndirectTableInvalid, match="at most 8 entries"):
        q.pop()


def test_zero_length_descriptors_are_dropped_unchecked(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    # A zero-length buffer at a non-RAM address, and a zero-length "readable" among writables.
    head = d.chain(
        [(DATA, 1, False), (1 << 60, 0, True), (DATA + 1, 2, True), (0xDEAD0000, 0, False)]
    )
    d.publish(head)
    chain = pop_one(q)
    assert [len(v) for v in chain.readable] == [1]
    assert [len(v) for v in chain.writable] == [2]


def test_a_chain_with_every_descriptor_of_the_queue(mem: GuestMemory) -> None:
    d = Driver(mem, size=8)
    q = d.queue()
    head = d.chain([(DATA + i, 1, False) for i in range(8)])
    d.publish(head)
    assert len(pop_one(q).readable) == 8


def test_add_used_rejects_device_bugs(mem: GuestMemory) -> None:
    q = Driver(mem).queue()
    with pytest.raises(ValueError):
        q.add_used(16, 0)
    with pytest.raises(ValueError):
        q.add_used(0, 1 << 32)
    assert q.next_used == 0


def test_reset_returns_to_index_zero(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    d.publish(d.chain([(DATA, 1, True)]))
    q.add_used(pop_one(q).head, 1)
    q.reset()
    assert (q.next_avail, q.next_used) == (0, 0)


# --- interrupts and notifications ----------------------------------------------------------------


def complete(d: Driver, q: SplitQueue, n: int = 1) -> None:
    for _ in range(n):
        d.publish(d.chain([(DATA, 1, True)]))
        q.add_used(pop_one(q).head, 1)


def test_without_event_idx_no_interrupt_flag_decides(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    assert not q.needs_interrupt()  # nothing published yet
    complete(d, q)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()  # nothing new since
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    complete(d, q)
    assert not q.needs_interrupt()


def test_event_idx_interrupts_when_used_event_is_crossed(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue(event_idx=True)
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    d.set_used_event(0)
    complete(d, q)  # used 0 -> 1 crosses 0
    assert q.needs_interrupt()
    d.set_used_event(3)
    complete(d, q, 2)  # 1 -> 3: element 3 not used yet
    assert not q.needs_interrupt()
    complete(d, q)  # 3 -> 4 publishes element 3
    assert q.needs_interrupt()
    d.set_used_event(1)  # already passed: no interrupt until the index comes round again
    complete(d, q)
    assert not q.needs_interrupt()


def test_event_idx_arithmetic_wraps(mem: GuestMemory) -> None:
    d = Driver(mem, size=4, start=65534)
    q = d.queue(event_idx=True, start=65534)
    d.set_used_event(65535)
    complete(d, q)  # 65534 -> 65535
    assert not q.needs_interrupt()
    complete(d, q, 2)  # 65535 -> 1 across the wrap
    assert q.needs_interrupt()


def test_notification_flag_without_event_idx(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    q.disable_notification()
    assert d.used_flags == VIRTQ_USED_F_NO_NOTIFY
    q.enable_notification()
    assert d.used_flags == 0


def test_notification_with_event_idx_publishes_next_avail(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue(event_idx=True)
    q.disable_notification()
    d.publish(d.chain([(DATA, 1, True)]), d.chain([(DATA, 1, True)]))
    # The worker's dance: disable, drain, enable, re-check.
    while (chain := q.pop()) is not None:
        q.add_used(chain.head, 0)
    q.enable_notification()
    assert d.avail_event == 2
    assert d.used_flags == 0
    assert not q.has_pending()
    d.publish(d.chain([(DATA, 1, True)]))
    assert q.has_pending()
    q.disable_notification()
    assert d.avail_event == 2


# --- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 24, MAX_QUEUE_SIZE * 2, -1])
def test_bad_queue_size(mem: GuestMemory, size: int) -> None:
    with pytest.raises(InvalidQueueSize):
        SplitQueue(mem, size, DESC, AVAIL, USED, False)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "other"),
    [
        (DESC, AVAIL, AVAIL + 4, "available ring"),  # the used flags over avail.idx
        (DESC, AVAIL, AVAIL - 0x40, "available ring"),  # its tail over the avail ring
        (DESC, AVAIL, DESC + 0x40, "descriptor table"),
    ],
)
def test_a_used_ring_over_another_ring_is_refused(
    mem: GuestMemory, desc: int, avail: int, used: int, other: str
) -> None:
    """The device's own used-ring writes would change what it reads: with the used flags over
    avail.idx, each notification toggle made a new chain appear, for ever."""
    with pytest.raises(RingsOverlap, match=f"used ring overlaps {other}"):
        SplitQueue(mem, 16, desc, avail, used, False)


def test_driver_areas_may_overlap_each_other(mem: GuestMemory) -> None:
    SplitQueue(mem, 16, DESC, DESC + 0x80, USED, False).release()


def test_rings_of_two_queues_are_checked_together(mem: GuestMemory) -> None:
    q0 = SplitQueue(mem, 16, DESC, AVAIL, USED, False)
    q1 = SplitQueue(mem, 16, DESC + 0x1000, AVAIL + 0x1000, AVAIL, False)  # over q0's avail
    with pytest.raises(RingsOverlap, match="queue 1 used ring overlaps queue 0 available ring"):
        check_rings_apart(
            [a.renamed(f"queue {i} ") for i, q in enumerate((q0, q1)) for a in q.areas]
        )
    q0.release()
    q1.release()


def test_size_one_and_the_maximum_are_fine(mem: GuestMemory) -> None:
    SplitQueue(mem, 1, DESC, AVAIL, USED, True).release()
    big = SplitQueue(mem, MAX_QUEUE_SIZE, 0x80000, 0x60000, 0x10000, True)
    big.release()


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED), (DESC, AVAIL, USED + 2)],
)
def test_misaligned_rings(mem: GuestMemory, desc: int, avail: int, used: int) -> None:
    with pytest.raises(MisalignedRing):
        SplitQueue(mem, 16, desc, avail, used, False)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (RAM_END - DESC_SIZE * 8, AVAIL, USED),  # a 16-entry table runs off the end of RAM
        (DESC, RAM_END - rings.avail_entry(16), USED),  # only its used_event is outside RAM
        (DESC, AVAIL, HIGH - 8),  # straddles the hole between regions
        (DESC, AVAIL, 1 << 64),
    ],
)
def test_rings_outside_ram(mem: GuestMemory, desc: int, avail: int, used: int) -> None:
    with pytest.raises(RingOutsideRam):
        SplitQueue(mem, 16, desc, avail, used, False)


def test_rings_in_the_high_region(mem: GuestMemory) -> None:
    q = SplitQueue(mem, 16, HIGH, HIGH + 0x1000, HIGH + 0x2000, False)
    mem.write(HIGH, rings.descriptor(DATA, 4, WRITE))
    mem.write_u16(HIGH + 0x1000 + rings.AVAIL_IDX, 1)
    assert pop_one(q).writable_len == 4
    q.release()


# --- hostile chains ------------------------------------------------------------------------------

# Each builder lays out one bad chain and returns (its head, the error it must raise).
Hostile = Callable[[Driver], tuple[int, type[InvalidChain]]]


def next_out_of_range(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, DATA, 1, NEXT, d.size)
    return 0, DescriptorOutOfRange


def two_descriptor_loop(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, DATA, 1, NEXT, 1)
    d.desc(1, DATA, 1, NEXT, 0)
    return 0, ChainTooLong


def self_loop_of_zero_length(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(3, 0, 0, NEXT | WRITE, 3)
    return 3, ChainTooLong


def loop_inside_indirect_table(d: Driver) -> tuple[int, type[InvalidChain]]:
    table = DATA + 0x1000
    d.desc(0, DATA, 1, NEXT, 1, table=table)
    d.desc(1, DATA, 1, NEXT, 0, table=table)
    d.desc(0, table, 32, INDIRECT)
    return 0, ChainTooLong


def indirect_next_out_of_table(d: Driver) -> tuple[int, type[InvalidChain]]:
    table = DATA + 0x1000
    d.desc(0, DATA, 1, NEXT, 2, table=table)  # a 2-entry table: index 2 is past it
    d.desc(0, table, 2 * DESC_SIZE, INDIRECT)
    return 0, DescriptorOutOfRange


def nested_indirect(d: Driver) -> tuple[int, type[InvalidChain]]:
    table = DATA + 0x1000
    d.desc(0, table, DESC_SIZE, INDIRECT, table=table)
    d.desc(0, table, DESC_SIZE, INDIRECT)
    return 0, NestedIndirect


def indirect_with_next(d: Driver) -> tuple[int, type[InvalidChain]]:
    table = DATA + 0x1000
    d.desc(0, DATA, 1, 0, table=table)
    d.desc(0, table, DESC_SIZE, INDIRECT | NEXT, 1)
    d.desc(1, DATA, 1)
    return 0, IndirectWithNext


def indirect_table_empty(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, DATA, 0, INDIRECT)
    return 0, IndirectTableInvalid


def indirect_table_ragged(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, DATA, DESC_SIZE + DESC_SIZE // 2, INDIRECT)
    return 0, IndirectTableInvalid


def indirect_table_too_big(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, 0, DESC_SIZE * (MAX_QUEUE_SIZE + 1), INDIRECT)
    return 0, IndirectTableInvalid


def indirect_table_outside_ram(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, RAM_END - DESC_SIZE, 2 * DESC_SIZE, INDIRECT)
    return 0, DescriptorOutsideRam


def buffer_outside_ram(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, DATA, 1, NEXT, 1)
    d.desc(1, (1 << 64) - 1, 2, WRITE)
    return 0, DescriptorOutsideRam


def buffer_straddles_end_of_ram(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, RAM_END - 4, 8, WRITE)
    return 0, DescriptorOutsideRam


def buffer_in_the_hole(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, 0x8000_0000, 0xFFFF_FFFF)
    return 0, DescriptorOutsideRam


def readable_after_writable(d: Driver) -> tuple[int, type[InvalidChain]]:
    d.desc(0, DATA, 1, WRITE | NEXT, 1)
    d.desc(1, DATA, 1, 0)
    return 0, ReadableAfterWritable


def readable_after_writable_across_indirect(d: Driver) -> tuple[int, type[InvalidChain]]:
    table = DATA + 0x1000
    d.desc(0, DATA, 1, 0, table=table)
    d.desc(0, DATA, 1, WRITE | NEXT, 1)
    d.desc(1, table, DESC_SIZE, INDIRECT)
    return 0, ReadableAfterWritable


def chain_over_4_gib(d: Driver) -> tuple[int, type[InvalidChain]]:
    # A real 1 MiB buffer, then a 4 GiB - 1 one: together one byte more than a chain may hold.
    # The sizes are added up before any view is made, so the second needs no RAM behind it.
    table = DATA + 0x1000
    entries = rings.descriptor(0, MiB, WRITE | NEXT, 1)
    entries += rings.descriptor(1 << 40, (1 << 32) - 1, WRITE)
    d.mem.write(table, entries)
    d.desc(0, table, len(entries), INDIRECT)
    return 0, ChainTooLarge


HOSTILE: list[Hostile] = [
    next_out_of_range,
    two_descriptor_loop,
    self_loop_of_zero_length,
    loop_inside_indirect_table,
    indirect_next_out_of_table,
    nested_indirect,
    indirect_with_next,
    indirect_table_empty,
    indirect_table_ragged,
    indirect_table_too_big,
    indirect_table_outside_ram,
    buffer_outside_ram,
    buffer_straddles_end_of_ram,
    buffer_in_the_hole,
    readable_after_writable,
    readable_after_writable_across_indirect,
    chain_over_4_gib,
]


@pytest.mark.parametrize("build", HOSTILE, ids=lambda f: f.__name__)
def test_hostile_chain_is_consumed_and_the_queue_goes_on(mem: GuestMemory, build: Hostile) -> None:
    d = Driver(mem, size=8)
    q = d.queue()
    head, error = build(d)
    d.free = 4  # the good chain uses descriptors the bad ones left alone
    good = d.chain([(DATA + 0x10, 2, False), (DATA + 0x20, 3, True)])
    d.publish(head, good)

    with pytest.raises(error) as info:
        q.pop()
    assert info.value.head == head
    assert q.next_avail == 1
    q.add_used(head, 0)

    chain = pop_one(q)
    assert (chain.head, chain.readable_len, chain.writable_len) == (good, 2, 3)
    q.add_used(chain.head, 3)
    assert d.used_idx == 2
    assert [d.used_elem(0), d.used_elem(1)] == [(head, 0), (good, 3)]


def test_bad_head_index_is_consumed_without_a_head(mem: GuestMemory) -> None:
    d = Driver(mem, size=8)
    q = d.queue()
    good = d.chain([(DATA, 1, True)])
    d.publish(8, 0xFFFF, good)
    for index in (8, 0xFFFF):
        with pytest.raises(BadHeadIndex) as info:
            q.pop()
        assert info.value.head is None
        assert info.value.index == index
    assert pop_one(q).head == good


@pytest.mark.parametrize("ahead", [9, 0x8000, 0xFFFF])
def test_bad_avail_index_consumes_nothing(mem: GuestMemory, ahead: int) -> None:
    d = Driver(mem, size=8)
    q = d.queue()
    mem.write_u16(AVAIL + rings.AVAIL_IDX, ahead)
    with pytest.raises(BadAvailIndex):
        q.pop()
    with pytest.raises(BadAvailIndex):
        q.pop()
    assert q.next_avail == 0
    d.publish(d.chain([(DATA, 1, True)]))  # the driver recovers
    assert pop_one(q).head == 0


def test_every_error_is_a_queue_error() -> None:
    for cls in (InvalidQueueSize, MisalignedRing, RingOutsideRam, BadAvailIndex, BadHeadIndex):
        assert issubclass(cls, QueueError)
    assert issubclass(InvalidChain, QueueError)


# --- properties ----------------------------------------------------------------------------------

HYPOTHESIS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Mostly structurally plausible values, so that chains get deep enough to go wrong in every way;
# some wholly random ones too.
in_ram = st.integers(DATA, DATA + 0x8000)
addresses = st.one_of(
    in_ram,
    in_ram,
    st.just(DATA + 0x10000),  # the fuzzed indirect table
    st.sampled_from([0, RAM_END - 16, RAM_END, HIGH, HIGH + 0xFFF0, 0x8000_0000, (1 << 64) - 16]),
    st.integers(0, (1 << 64) - 1),
)
small_len = st.integers(0, 0x100)
lengths = st.one_of(
    small_len,
    small_len,
    st.sampled_from([DESC_SIZE * n for n in (1, 2, 3, 64, 65)] + [MiB, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
flag_bits = st.sampled_from([0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7])  # NEXT-heavy, to get long chains
small_index = st.integers(0, 17)
descriptors = st.tuples(
    addresses,
    lengths,
    st.one_of(flag_bits, flag_bits, flag_bits, st.integers(0, 0xFFFF)),
    st.one_of(small_index, small_index, small_index, st.integers(0, 0xFFFF)),
)
near = st.integers(0, 0xFF)  # ring heads and avail.idx: taken modulo just over the queue size


def plausible(raw: int, size: int, slack: int) -> int:
    return raw % (size + slack) if raw <= 0xFF else raw


@settings(HYPOTHESIS, max_examples=200)
@given(
    size_log2=st.integers(0, 4),
    table=st.lists(descriptors, min_size=16, max_size=16),
    indirect=st.lists(descriptors, min_size=64, max_size=64),
    ring=st.lists(st.one_of(near, near, near, st.integers(0, 0xFFFF)), min_size=16, max_size=16),
    avail_idx=st.one_of(near, near, near, st.integers(0, 0xFFFF)),
    used_event=st.integers(0, 0xFFFF),
    event_idx=st.booleans(),
)
def test_random_rings_only_raise_queue_errors(
    mem: GuestMemory,
    size_log2: int,
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    used_event: int,
    event_idx: bool,
) -> None:
    size = 1 << size_log2
    d = Driver(mem, size)
    for i, entry in enumerate(table[:size]):
        d.desc(i, *entry)
    for i, entry in enumerate(indirect):
        d.desc(i, *entry, table=DATA + 0x10000)
    for i, head in enumerate(ring[:size]):
        mem.write_u16(AVAIL + rings.avail_entry(i), plausible(head, size, 1))
    avail_idx = plausible(avail_idx, size, 2)
    mem.write_u16(AVAIL + rings.AVAIL_IDX, avail_idx)
    d.set_used_event(used_event)
    q = d.queue(event_idx)

    started = time.monotonic()
    for _ in range(size + 2):
        before = q.next_avail
        try:
            chain = q.pop()
        except BadAvailIndex:
            assert q.next_avail == before
            break
        except InvalidChain as e:
            assert q.next_avail == (before + 1) & 0xFFFF
            if e.head is not None:
                q.add_used(e.head, 0)
            continue
        if chain is None:
            assert q.next_avail == avail_idx
            break
        assert chain.readable_len + chain.writable_len < 1 << 32
        q.add_used(chain.head, min(chain.writable_len, 0xFFFF_FFFF))
    q.needs_interrupt()
    q.enable_notification()
    q.has_pending()
    q.release()
    assert time.monotonic() - started < 2.0


@HYPOTHESIS
@given(
    links=st.lists(st.tuples(st.booleans(), st.integers(0, 15)), min_size=16, max_size=16),
    head=st.integers(0, 15),
    indirect=st.booleans(),
)
def test_random_links_end_or_are_loops(
    mem: GuestMemory, links: list[tuple[bool, int]], head: int, indirect: bool
) -> None:
    """Every descriptor a 1-byte buffer; NEXT links at random: a chain or ChainTooLong, no more."""
    d = Driver(mem, size=16)
    q = d.queue()
    mem.write(DATA, bytes(range(1, 17)))
    table = DATA + 0x10000 if indirect else DESC
    for i, (has_next, nxt) in enumerate(links):
        d.desc(i, DATA + i, 1, NEXT if has_next else 0, nxt, table=table)
    if indirect:
        d.desc(0, table, DESC_SIZE * 16, INDIRECT)
        start = 0
        d.publish(0)
    else:
        start = head
        d.publish(head)
    visited = [start]
    while links[visited[-1]][0] and len(visited) <= 16:
        visited.append(links[visited[-1]][1])
    if len(visited) > 16:
        with pytest.raises(ChainTooLong):
            q.pop()
    else:
        chain = pop_one(q)
        assert [bytes(v) for v in chain.readable] == [mem.read(DATA + i, 1) for i in visited]
    q.release()


chain_specs = st.lists(st.tuples(st.integers(0, 64), st.booleans()), min_size=1, max_size=12).map(
    lambda bufs: sorted(bufs, key=lambda b: b[1])
)  # readable ones first


@HYPOTHESIS
@given(chains=st.lists(st.tuples(chain_specs, st.booleans()), min_size=1, max_size=4))
def test_valid_chains_come_back_exactly(
    mem: GuestMemory, chains: list[tuple[list[tuple[int, bool]], bool]]
) -> None:
    d = Driver(mem, size=64)
    q = d.queue()
    expected = []
    addr = DATA
    for n, (spec, use_indirect) in enumerate(chains):
        bufs: list[Buf] = []
        for length, wr in spec:
            mem.write(addr, bytes([n + 1 + wr]) * length)
            bufs.append((addr, length, wr))
            addr += length
        head = d.indirect(DATA + 0x10000 + 0x1000 * n, bufs) if use_indirect else d.chain(bufs)
        d.publish(head)
        expected.append((head, bufs))
    for head, bufs in expected:
        chain = pop_one(q)
        assert chain.head == head
        want_r = [mem.read(a, n) for a, n, wr in bufs if n and not wr]
        want_w = [mem.read(a, n) for a, n, wr in bufs if n and wr]
        assert [bytes(v) for v in chain.readable] == want_r
        assert [bytes(v) for v in chain.writable] == want_w
        q.add_used(chain.head, chain.writable_len)
    assert q.pop() is None
    q.release()


def test_a_writable_buffer_in_read_only_memory_is_refused(tmp_path: Path) -> None:
    """A read-only file region (pmem) is guest memory the device may read but never write."""
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(MiB))
    m = GuestMemory([(0, MiB)])
    fd = os.open(image, os.O_RDONLY)
    try:
        m.add_file_region(HIGH, fd, MiB, readonly=True)
        d = Driver(m)
        q = d.queue()
        readable = d.chain([(HIGH, 16, False)])
        writable = d.chain([(DATA, 16, False), (HIGH + 64, 16, True)])
        d.publish(readable, writable)
        assert pop_one(q).readable[0].readonly
        with pytest.raises(DescriptorReadOnly):
            q.pop()
        q.release()
    finally:
        m.close()
        os.close(fd)


def test_a_released_queue_takes_nothing_and_publishes_nothing(mem: GuestMemory) -> None:
    d = Driver(mem)
    q = d.queue()
    d.publish(d.chain([(DATA, 8, True)]))
    q.release()
    assert q.pop() is None
    q.add_used(0, 8)
    assert d.used_idx == 0


def test_after_the_memory_is_closed_no_buffer_is_guest_memory() -> None:
    """A queue that outlives its GuestMemory (a worker left behind) still reads its own rings,
    which it keeps mapped, but finds no buffer anywhere: nothing points at unmapped memory."""
    m = GuestMemory([(0, MiB)])
    d = Driver(m)
    q = d.queue()
    d.publish(d.chain([(DATA, 8, True)]))
    m.close()
    with pytest.raises(DescriptorOutsideRam):
        q.pop()
    q.release()
