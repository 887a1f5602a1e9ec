"""Where a split virtqueue fences: each ordering the spec needs, between the right ring accesses.

The queue's ring views are swapped for ones that log each field they touch, and its fences for
ones that log themselves, into one log: removing or moving a fence changes the log. Taking a chain
and publishing a used element are compiled (pyvmm/native/virtq.c, with its own fences at the
same two places, 2.7.13.3.1 and 2.7.8.2): Python must not touch those ring fields itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvmm.devices.virtio import queue
from pyvmm.devices.virtio.queue import SplitQueue, VirtqFlags
from pyvmm.memory import GuestMemory
from pyvmm.native import fences
from tests.unit.devices.virtio import rings

SIZE = 8
DESC = 0x1000
AVAIL = 0x2000
USED = 0x3000
DATA = 0x4000


class RecordedView:
    """A ring view that logs which field each access reads or writes."""

    def __init__(self, view: memoryview, log: list[str], field: Callable[[int], str]) -> None:
        self._view = view
        self._log = log
        self._field = field

    def __getitem__(self, i: int) -> Any:
        self._log.append(f"read {self._field(i)}")
        return self._view[i]

    def __setitem__(self, i: int, value: int) -> None:
        self._log.append(f"write {self._field(i)}")
        self._view[i] = value

    def release(self) -> None:
        self._view.release()


class RecordedFences:
    def __init__(self, log: list[str]) -> None:
        self.acquire = lambda: log.append("acquire")
        self.release = lambda: log.append("release")
        self.full = lambda: log.append("full")


U16 = queue.ffi.sizeof("uint16_t")  # the unit of the u16 ring views


def avail_field(i: int) -> str:
    fields = {
        rings.AVAIL_FLAGS // U16: "avail.flags",
        rings.AVAIL_IDX // U16: "avail.idx",
        rings.avail_entry(SIZE) // U16: "used_event",
    }
    return fields.get(i, "avail.ring")


def used_field(i: int) -> str:
    fields = {
        rings.USED_FLAGS // U16: "used.flags",
        rings.USED_IDX // U16: "used.idx",
        rings.used_elem(SIZE) // U16: "avail_event",
    }
    return fields.get(i, "used.ring")


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, 0x10000)])
    yield m
    m.close()


def recorded_queue(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch, event_idx: bool
) -> tuple[SplitQueue, list[str]]:
    """A queue with one chain available (its one descriptor, ring entry and avail.idx)."""
    mem.write(DESC, rings.descriptor(DATA, 16, VirtqFlags.WRITE))
    mem.write_u16(AVAIL + rings.avail_entry(0), 0)
    mem.write_u16(AVAIL + rings.AVAIL_IDX, 1)
    q = SplitQueue(mem, SIZE, DESC, AVAIL, USED, event_idx)
    log: list[str] = []
    monkeypatch.setattr(queue, "fences", RecordedFences(log))
    monkeypatch.setattr(q, "_avail16", RecordedView(q._avail16, log, avail_field))
    monkeypatch.setattr(q, "_used16", RecordedView(q._used16, log, used_field))
    return q, log


def test_the_queue_uses_the_compiled_fences() -> None:
    assert queue.fences is fences


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_each_ring_access_is_ordered_as_the_spec_needs(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch, event_idx: bool
) -> None:
    q, log = recorded_queue(mem, monkeypatch, event_idx)

    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 16)
    assert log == []  # the walk and the used element: virtq.c's
    assert q.next_used == 1

    log.clear()
    q.needs_interrupt()
    # used.idx visible before the driver's suppression field is read (2.7.7.2).
    suppression = "used_event" if event_idx else "avail.flags"
    assert log == ["full", f"read {suppression}"]

    log.clear()
    q.enable_notification()
    q.has_pending()
    # Our request visible before avail.idx is read again (2.7.10).
    request = "avail_event" if event_idx else "used.flags"
    assert log == [f"write {request}", "full", "read avail.idx"]
