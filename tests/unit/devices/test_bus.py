"""Bus routing: base-relative offsets, overlap detection, unclaimed addresses."""

from __future__ import annotations

import threading

import pytest

from pyvmm import ratelimit
from pyvmm.devices.bus import Bus, BusOverlapError, BusRange


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([offset]) * len(data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.writes.append((offset, bytes(data)))


def test_devices_see_offsets_relative_to_their_base() -> None:
    bus = Bus("io")
    a, b = Recorder(), Recorder()
    bus.insert(a, 0x3F8, 8, "serial")
    bus.insert(b, 0x60, 5, "i8042")
    assert bus.write(0x3FB, b"\x80")
    assert bus.write(0x64, b"\xfe")
    assert a.writes == [(3, b"\x80")]
    assert b.writes == [(4, b"\xfe")]
    buf = bytearray(2)
    assert bus.read(0x3FE, memoryview(buf))
    assert buf == b"\x06\x06"


def test_unclaimed_and_straddling_accesses_are_not_routed() -> None:
    bus = Bus("io")
    bus.insert(Recorder(), 0x70, 2, "cmos")
    buf = bytearray(b"\xaa")
    assert not bus.read(0x72, memoryview(buf))
    assert buf == b"\xaa"
    assert not bus.write(0x71, b"\x00\x00")  # runs past the device's end
    assert not bus.write(0x6F, b"\x00")


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlaps_are_refused_naming_both_devices(base: int, length: int) -> None:
    bus = Bus("port I/O bus")
    bus.insert(Recorder(), 0x3F8, 8, "serial")
    with pytest.raises(BusOverlapError, match=r"other .* overlaps serial at 0x3f8-0x3ff"):
        bus.insert(Recorder(), base, length, "other")


def test_adjacent_ranges_are_fine() -> None:
    bus = Bus("io")
    bus.insert(Recorder(), 0x3F8, 8, "a")
    bus.insert(Recorder(), 0x400, 8, "b")
    bus.insert(Recorder(), 0x3F0, 8, "c")
    assert bus.device_at(0x3F7) is not bus.device_at(0x3F8)


class Broken:
    """A device model with a bug: every access raises."""

    def read(self, offset: int, data: memoryview) -> None:
        data[0] = 0x105  # what the CMOS model once tried: not a byte

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise KeyError(offset)


def test_a_device_that_raises_completes_the_access_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = Bus("io")
    bus.insert(Broken(), 0x70, 2, "cmos")
    with caplog.at_level("ERROR"):
        for _ in range(100):
            buf = bytearray(b"\x00\x00")
            assert bus.read(0x70, memoryview(buf))
            assert buf == b"\xff\xff"  # as a floating bus reads
            assert bus.write(0x71, b"\x01")
        ratelimit.flush_all()
    messages = [r.getMessage() for r in caplog.records if r.name == "pyvmm.devices.bus"]
    assert messages[0].startswith("cmos: read at 0x70 failed (ValueError:")
    assert len(messages) <= 3  # the first of each kind, then one count
    assert "199 more device error messages were not logged" in messages[-1]


def test_a_move_is_one_change_that_no_lookup_sees_half_done() -> None:
    """A BAR moving between two overlapping ranges: an address in both is always the device's,
    never unclaimed while it moves (the map is copy-on-write; removing and then inserting left
    a moment with nothing there)."""
    bus = Bus("mmio")
    dev = Recorder()
    old, new, probe = 0x1000, 0x1080, 0x10C0  # probe lies in [old, old+0x100) and [new, ...)
    bus.insert(dev, old, 0x100, "bar")
    stop = threading.Event()
    lookups = missing = 0

    def look() -> None:
        nonlocal lookups, missing
        while not stop.is_set():
            lookups += 1
            if bus.device_at(probe) is not dev:
                missing += 1

    reader = threading.Thread(target=look)
    reader.start()
    try:
        here, there = old, new
        for _ in range(20_000):
            skipped, removed = bus.update(remove=[here], insert=[BusRange(dev, there, 0x100)])
            assert (skipped, removed) == ([], [dev])
            here, there = there, here
    finally:
        stop.set()
        reader.join()
    assert lookups > 0 and missing == 0


def test_update_leaves_out_only_the_ranges_that_overlap() -> None:
    bus = Bus("mmio")
    a, b, c = Recorder(), Recorder(), Recorder()
    bus.insert(a, 0x1000, 0x1000, "a")
    skipped, removed = bus.update(
        insert=[BusRange(b, 0x1800, 0x1000, "b"), BusRange(c, 0x4000, 0x1000, "c")]
    )
    assert removed == []
    assert [(r.name, str(e)) for r, e in skipped] == [
        ("b", "mmio: b at 0x1800-0x27ff overlaps a at 0x1000-0x1fff")
    ]
    assert bus.device_at(0x4000) is c and bus.device_at(0x2000) is None
    with pytest.raises(KeyError):
        bus.update(remove=[0x1000, 0x7000])
    assert bus.device_at(0x1000) is a  # a failed update changes nothing
