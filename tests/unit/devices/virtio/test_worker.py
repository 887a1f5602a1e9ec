"""The queue worker: it parks and stops between requests even when a guest never lets the queue
run dry, and every wait on it is bounded."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyvmm.devices.virtio.device import DeviceError, DeviceType, VirtioDevice, available_chains
from pyvmm.devices.virtio.queue import SplitQueue, VirtqFlags
from pyvmm.devices.virtio.worker import QueueWorker
from pyvmm.memory import GuestMemory
from tests.unit.devices.virtio import rings

MiB = 1 << 20
SIZE = 8
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x4000


class Endless(VirtioDevice):
    """Completes each chain and, as a guest could, makes the same chain available again: the
    queue is never empty."""

    device_type = DeviceType.RNG
    name = "endless"

    def __init__(self, mem: GuestMemory) -> None:
        self.mem_ = mem
        self.done = 0

    @property
    def queue_max_sizes(self) -> list[int]:
        return [SIZE]

    @property
    def device_features(self) -> int:
        return 0

    def config_read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        for chain in available_chains(queue, self.guest_log):
            queue.add_used(chain.head, 0)
            self.done += 1
            idx = self.mem_.read_u16(AVAIL + rings.AVAIL_IDX)
            self.mem_.write_u16(AVAIL + rings.avail_entry(idx % SIZE), 0)
            self.mem_.write_u16(AVAIL + rings.AVAIL_IDX, (idx + 1) & 0xFFFF)


class Stuck(Endless):
    """A request that never finishes (a disk that hangs)."""

    def __init__(self, mem: GuestMemory) -> None:
        super().__init__(mem)
        self.release = threading.Event()

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        self.release.wait()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB)])
    m.write(DESC, rings.descriptor(BUF, 16, VirtqFlags.WRITE))
    m.write_u16(AVAIL + rings.avail_entry(0), 0)
    m.write_u16(AVAIL + rings.AVAIL_IDX, 1)
    yield m
    m.close()


class RecordingInterrupt:
    """A DeviceInterrupt that records what the worker signals."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.needs_reset = threading.Event()
        self.resample_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.resamples = 0

    def signal_used(self, queue: int) -> None:
        self.used.append(queue)

    def signal_config_changed(self) -> None:
        pass

    def set_needs_reset(self) -> None:
        self.needs_reset.set()

    def resample(self) -> None:
        os.eventfd_read(self.resample_fd)
        self.resamples += 1


def _worker(
    device: VirtioDevice, mem: GuestMemory, interrupt: RecordingInterrupt | None = None
) -> tuple[QueueWorker, int]:
    queue = SplitQueue(mem, SIZE, DESC, AVAIL, USED, False)
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    control = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    worker = QueueWorker(device, {0: (queue, notify)}, interrupt or RecordingInterrupt(), control)
    worker.start()
    return worker, notify


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_a_queue_that_never_runs_dry_still_pauses_resumes_and_stops(mem: GuestMemory) -> None:
    device = Endless(mem)
    worker, notify = _worker(device, mem)
    try:
        _wait_for(lambda: device.done > 3 * SIZE)
        assert worker.pause(timeout=5)
        parked = device.done
        time.sleep(0.2)
        assert device.done == parked, "the worker went on while parked"
        worker.resume()
        _wait_for(lambda: device.done > parked + SIZE)
        assert worker.stop(timeout=5)
    finally:
        os.close(notify)


@pytest.mark.timeout(60)
def test_a_worker_stuck_in_a_request_is_reported_and_abandoned(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    device = Stuck(mem)
    worker, notify = _worker(device, mem)
    try:
        assert not worker.pause(timeout=0.2)
        assert not worker.stop(timeout=0.2)
        assert "virtio endless: the worker did not stop within 0.2 s; abandoned" in caplog.text
    finally:
        device.release.set()
        worker._thread.join(5)  # it wakes once released: then its fds may go
        os.close(notify)


class Failing(Endless):
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        raise DeviceError("the driver broke a rule")


@pytest.mark.timeout(60)
def test_a_failing_device_is_marked_as_needing_a_reset(mem: GuestMemory) -> None:
    interrupt = RecordingInterrupt()
    worker, notify = _worker(Failing(mem), mem, interrupt)
    try:
        assert interrupt.needs_reset.wait(10)
        assert worker.stop(timeout=5)
    finally:
        os.close(notify)


class WithSource(Endless):
    """A device with an event source of its own (as a TAP or a socket would be)."""

    def __init__(self, mem: GuestMemory) -> None:
        super().__init__(mem)
        self.source = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.events = 0

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        for chain in available_chains(queue, self.guest_log):
            queue.add_used(chain.head, 0)

    def event_sources(self) -> dict[int, Callable[[], bool]]:
        return {self.source: self._on_source}

    def _on_source(self) -> bool:
        os.eventfd_read(self.source)
        self.events += 1
        return True


class Resting(WithSource):
    """A source that stays readable and asks to rest, as a TAP with frames does while the
    receive queue has no buffers."""

    def _on_source(self) -> bool:
        self.events += 1
        return False


@pytest.mark.timeout(60)
def test_event_sources_resample_and_used_interrupts_reach_their_handlers(
    mem: GuestMemory,
) -> None:
    device = WithSource(mem)
    interrupt = RecordingInterrupt()
    worker, notify = _worker(device, mem, interrupt)
    try:
        _wait_for(lambda: interrupt.used == [0])  # the chain made available before start
        os.eventfd_write(device.source, 1)
        _wait_for(lambda: device.events == 1)
        os.eventfd_write(interrupt.resample_fd, 1)
        _wait_for(lambda: interrupt.resamples == 1)
        assert worker.stop(timeout=5)
    finally:
        os.close(notify)
        os.close(device.source)


@pytest.mark.timeout(60)
def test_a_resting_source_waits_for_the_next_queue_notification(mem: GuestMemory) -> None:
    device = Resting(mem)
    worker, notify = _worker(device, mem)
    try:
        os.eventfd_write(device.source, 1)  # readable from now on: never drained
        _wait_for(lambda: device.events == 1)
        time.sleep(0.2)
        assert device.events == 1  # not polled again while it rests
        os.eventfd_write(notify, 1)  # the driver added buffers
        _wait_for(lambda: device.events == 2)
        time.sleep(0.2)
        assert device.events == 2
        assert worker.stop(timeout=5)
    finally:
        os.close(notify)
        os.close(device.source)
