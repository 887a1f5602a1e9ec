"""The virtio-balloon device on its rings: the target and `actual` in its configuration space,
inflated pages given back to the host (they read as zero and the memfd holds less), frame numbers
outside RAM refused and logged once, statistics held and given back on request, free page
reporting, and queue numbering over the negotiated queues."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio import balloon
from pyvmm.devices.virtio.balloon import (
    CONFIG,
    STAT,
    Balloon,
    BalloonFeature,
    Stat,
)
from pyvmm.devices.virtio.device import DeviceType, Feature
from pyvmm.memory import PAGE_SIZE, GuestMemory
from tests.cheaders import layout_facts, mismatches
from tests.unit.devices.virtio.rings import Interrupts, QueueDriver

MiB = 1 << 20
RAM = 8 * MiB
POOL = 4 * MiB  # guest pages the tests balloon: 4 MiB .. 8 MiB
POOL_PFN = POOL // PAGE_SIZE


class ConfigInterrupts(Interrupts):
    def __init__(self) -> None:
        super().__init__()
        self.config_changes = 0

    def signal_config_changed(self) -> None:
        self.config_changes += 1


class Rig:
    def __init__(self, mem: GuestMemory, features: int, reporting: bool = True) -> None:
        self.balloon = Balloon(page_reporting=reporting)
        self.mem = mem
        mem.fill(0, POOL)
        self.drivers = [
            QueueDriver(mem, 0x10000 * (i + 1), 0x100000 + i * 0x40000) for i in range(4)
        ]
        self.irq = ConfigInterrupts()
        count = (
            2 + bool(features & BalloonFeature.STATS_VQ) + bool(features & BalloonFeature.REPORTING)
        )
        self.queues = {i: self.drivers[i].queue() for i in range(count)}
        self.balloon.activate(mem, self.irq, self.queues, int(Feature.VERSION_1) | features)

    def process(self, index: int) -> None:
        queue = self.queues[index]
        queue.budget = queue.size
        self.balloon.process_queue(index, queue)

    def send_pfns(self, index: int, pfns: list[int]) -> int:
        data = struct.pack(f"<{len(pfns)}I", *pfns)
        driver = self.drivers[index]
        head = driver.add([(driver.buffer(data), len(data), False)])
        self.process(index)
        return head

    def wake(self) -> None:
        handler = self.balloon.event_sources()[self.balloon.keep_fds()[0]]
        assert handler()

    def close(self) -> None:
        for q in self.queues.values():
            q.release()
        self.balloon.close()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, RAM)])
    yield m
    m.close()


ALL = BalloonFeature.STATS_VQ | BalloonFeature.REPORTING


@pytest.fixture
def rig(mem: GuestMemory) -> Iterator[Rig]:
    r = Rig(mem, ALL)
    yield r
    r.close()


def _allocated(mem: GuestMemory) -> int:
    return os.fstat(mem.memfd).st_blocks * 512


def _config(balloon: Balloon) -> tuple[int, int]:
    data = memoryview(bytearray(CONFIG.size))
    balloon.config_read(0, data)
    num_pages, actual = CONFIG.unpack(data)
    return num_pages, actual


HEADERS = ["linux/virtio_balloon.h"]


def test_structs_and_constants_match_linux_headers(tmp_path: Path) -> None:
    facts = layout_facts(balloon.ffi, ["virtio_balloon_config", "virtio_balloon_stat"])
    facts += [(f"VIRTIO_BALLOON_F_{f.name}", f.bit_length() - 1) for f in BalloonFeature]
    facts += [("VIRTIO_BALLOON_PFN_SHIFT", balloon.PFN_SHIFT), ("VIRTIO_ID_BALLOON", 5)]
    header_names = ["SWAP_IN", "SWAP_OUT", "MAJFLT", "MINFLT", "MEMFREE", "MEMTOT", "AVAIL",
                    "CACHES", "HTLB_PGALLOC", "HTLB_PGFAIL"]  # fmt: skip
    facts += [(f"VIRTIO_BALLOON_S_{n}", int(s)) for n, s in zip(header_names, Stat, strict=True)]
    facts += [("VIRTIO_BALLOON_S_NR", len(Stat))]
    assert not mismatches(tmp_path, HEADERS, facts)


def test_features_and_queues_follow_the_reporting_option() -> None:
    plain, reporting = Balloon(), Balloon(page_reporting=True)
    assert plain.device_type is DeviceType.BALLOON
    assert plain.device_features == BalloonFeature.STATS_VQ | BalloonFeature.DEFLATE_ON_OOM
    assert reporting.device_features & BalloonFeature.REPORTING
    assert (len(plain.queue_max_sizes), len(reporting.queue_max_sizes)) == (3, 4)
    plain.close()
    reporting.close()


def test_the_target_is_in_the_config_and_the_driver_is_told(rig: Rig) -> None:
    rig.balloon.command({"op": "set_target", "pages": 300})
    assert _config(rig.balloon) == (300, 0)
    assert rig.irq.config_changes == 1
    rig.balloon.command({"op": "set_target", "pages": 300})
    assert rig.irq.config_changes == 1, "the same target again is no change"


def test_only_actual_is_the_drivers_to_write(rig: Rig) -> None:
    rig.balloon.command({"op": "set_target", "pages": 7})
    rig.balloon.config_write(0, struct.pack("<II", 99, 5))  # num_pages is the device's
    assert _config(rig.balloon) == (7, 5)
    rig.balloon.config_write(5, b"\x01")  # one byte of actual, as a driver may write
    assert _config(rig.balloon) == (7, 5 + 256)
    status = rig.balloon.command({"op": "status"})
    assert (status["target_pages"], status["actual_pages"]) == (7, 261)


@pytest.mark.parametrize("pages", [-1, 1 << 32, "12", None])
def test_a_bad_target_is_refused(rig: Rig, pages: object) -> None:
    with pytest.raises(ValueError, match="not a page count"):
        rig.balloon.command({"op": "set_target", "pages": pages})


def test_an_unknown_command_is_refused(rig: Rig) -> None:
    with pytest.raises(ValueError, match="no command 'grow'"):
        rig.balloon.command({"op": "grow"})


def test_inflated_pages_go_back_to_the_host_and_read_zero(rig: Rig, mem: GuestMemory) -> None:
    mem.fill(POOL, POOL, 0xA5)
    before = _allocated(mem)
    pfns = list(range(POOL_PFN, POOL_PFN + 256))  # 1 MiB, in Linux's 256-frame buffers
    head = rig.send_pfns(0, pfns[::-1])  # any order
    assert rig.drivers[0].used() == [(head, 0)]
    # The rings and buffers took a few pages meanwhile. (Measured first: a read of a page
    # given back allocates it again, with zeros.)
    assert MiB - 4 * PAGE_SIZE <= before - _allocated(mem) <= MiB
    assert mem.read(POOL, MiB) == bytes(MiB)
    assert mem.read(POOL + MiB, 16) == b"\xa5" * 16, "only the pages sent"
    assert rig.balloon.command({"op": "status"})["discarded_pages"] == 256


def test_deflated_pages_are_usable_again(rig: Rig, mem: GuestMemory) -> None:
    mem.fill(POOL, PAGE_SIZE, 0x11)
    rig.send_pfns(0, [POOL_PFN])
    head = rig.send_pfns(1, [POOL_PFN])
    assert rig.drivers[1].used() == [(head, 0)]
    assert mem.read(POOL, PAGE_SIZE) == bytes(PAGE_SIZE)
    mem.fill(POOL, PAGE_SIZE, 0x22)
    assert mem.read(POOL, 4) == b"\x22" * 4


@pytest.mark.parametrize(
    "pfns",
    [
        [RAM // PAGE_SIZE],  # just past the end of RAM
        [0xE0000],  # the PCI hole's first page
        [0xFFFFFFFF],
        [RAM // PAGE_SIZE - 1, RAM // PAGE_SIZE],  # a run that leaves RAM
    ],
)
def test_frames_outside_ram_are_refused_and_logged_once(
    rig: Rig, mem: GuestMemory, pfns: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    mem.fill(RAM - PAGE_SIZE, PAGE_SIZE, 0x33)
    with caplog.at_level(logging.WARNING, logger="pyvmm.devices.virtio.balloon"):
        for _ in range(100):
            head = rig.send_pfns(0, pfns)
            assert rig.drivers[0].used() == [(head, 0)], "the buffer comes back"
    lines = [r.getMessage() for r in caplog.records if "not guest RAM" in r.getMessage()]
    assert len(lines) == 1, lines
    inside = RAM // PAGE_SIZE - 1 in pfns
    assert mem.read(RAM - PAGE_SIZE, 1) == (b"\x00" if inside else b"\x33")


@pytest.mark.parametrize(
    "pfns",
    [
        [POOL_PFN, RAM // PAGE_SIZE],  # good, then past the end of RAM
        [0xE0000, POOL_PFN],  # the PCI hole, then good
        [POOL_PFN, 0xFFFFFFFF],
    ],
)
def test_deflated_frames_outside_ram_are_refused_and_logged_once(
    rig: Rig, mem: GuestMemory, pfns: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pyvmm.devices.virtio.balloon"):
        for _ in range(10):
            head = rig.send_pfns(1, pfns)
            assert rig.drivers[1].used() == [(head, 0)], "the buffer comes back"
        head = rig.send_pfns(1, [POOL_PFN, POOL_PFN + 7])  # all RAM: nothing said
        assert rig.drivers[1].used() == [(head, 0)]
    lines = [r.getMessage() for r in caplog.records if "not guest RAM" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("virtio balloon: deflate"), lines


def test_a_buffer_that_is_not_frame_numbers_comes_back(rig: Rig, mem: GuestMemory) -> None:
    mem.fill(POOL, PAGE_SIZE, 0x44)
    driver = rig.drivers[0]
    data = struct.pack("<I", POOL_PFN) + b"\x01"  # five bytes
    head = driver.add([(driver.buffer(data), len(data), False)])
    rig.process(0)
    assert driver.used() == [(head, 0)]
    assert mem.read(POOL, 1) == b"\x44", "nothing of a malformed buffer is acted on"


def _stats_buffer(rig: Rig, values: dict[int, int]) -> tuple[int, int]:
    data = b"".join(STAT.pack(tag, value) for tag, value in values.items())
    driver = rig.drivers[2]
    at = driver.buffer(data)
    return driver.add([(at, len(data), False)]), at


def test_statistics_are_held_and_given_back_when_asked_for(rig: Rig, mem: GuestMemory) -> None:
    head, at = _stats_buffer(rig, {Stat.free_memory: 5 * MiB, Stat.total_memory: RAM})
    rig.process(2)
    assert rig.drivers[2].used() == [], "the device holds the driver's buffer"
    status = rig.balloon.command({"op": "status"})
    assert status["stats"] == {"free_memory": 5 * MiB, "total_memory": RAM}
    assert status["stats_replies"] == 0

    rig.balloon.command({"op": "request_stats"})
    rig.wake()
    assert rig.drivers[2].used() == [(head, 0)]
    assert 2 in rig.irq.used
    # The driver refreshes its numbers and sends the buffer again.
    mem.write(at, STAT.pack(Stat.free_memory, 3 * MiB) + STAT.pack(Stat.total_memory, RAM))
    rig.drivers[2].add([(at, 2 * STAT.size, False)])
    rig.process(2)
    status = rig.balloon.command({"op": "status"})
    assert status["stats"]["free_memory"] == 3 * MiB
    assert status["stats_replies"] == 1


def test_a_request_before_the_driver_sent_its_buffer_is_answered_when_it_does(rig: Rig) -> None:
    rig.balloon.command({"op": "request_stats"})
    rig.wake()
    head, _ = _stats_buffer(rig, {Stat.swap_in: 1, 99: 7})  # an unknown tag is skipped
    rig.process(2)
    assert rig.drivers[2].used() == [(head, 0)], "given back at once for fresh numbers"
    assert rig.balloon.command({"op": "status"})["stats"] == {"swap_in": 1}


def test_reported_free_pages_go_back_to_the_host(rig: Rig, mem: GuestMemory) -> None:
    mem.fill(POOL, 2 * MiB, 0x55)
    driver = rig.drivers[3]
    head = driver.add([(POOL, MiB, True), (POOL + MiB + 100, MiB - 100, True)])
    rig.process(3)
    assert driver.used() == [(head, 0)]
    assert mem.read(POOL, MiB) == bytes(MiB)
    # Only whole pages of a range go: the partial page at its start keeps its bytes.
    assert mem.read(POOL + MiB, 4) == b"\x55" * 4
    assert mem.read(POOL + MiB + PAGE_SIZE, MiB - PAGE_SIZE) == bytes(MiB - PAGE_SIZE)


def test_queues_are_numbered_over_the_negotiated_ones(mem: GuestMemory) -> None:
    """A driver that takes reporting but not statistics has its reporting queue at 2."""
    rig = Rig(mem, BalloonFeature.REPORTING)
    try:
        mem.fill(POOL, MiB, 0x66)
        driver = rig.drivers[2]
        head = driver.add([(POOL, MiB, True)])
        rig.process(2)
        assert driver.used() == [(head, 0)]
        assert mem.read(POOL, MiB) == bytes(MiB)
    finally:
        rig.close()


def test_reset_forgets_what_the_driver_said(rig: Rig) -> None:
    rig.balloon.command({"op": "set_target", "pages": 9})
    rig.balloon.config_write(4, struct.pack("<I", 9))
    rig.balloon.reset()
    assert _config(rig.balloon) == (9, 0), "the target stays; the driver's count goes"
    assert rig.balloon.command({"op": "status"})["driver"] is False


def test_a_second_stats_buffer_sends_the_first_back(rig: Rig) -> None:
    first, _ = _stats_buffer(rig, {Stat.swap_in: 1})
    rig.process(2)
    _stats_buffer(rig, {Stat.swap_in: 2})
    rig.process(2)
    assert rig.drivers[2].used() == [(first, 0)], "the device holds one buffer, the latest"
    assert rig.balloon.command({"op": "status"})["stats"] == {"swap_in": 2}
