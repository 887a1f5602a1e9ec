"""virtio-net against a test-side driver, with a SOCK_SEQPACKET socket standing in for the TAP
(one frame per read and write, as a TAP gives them): frames go out and come in with their
virtio-net headers in place, mergeable buffers are counted and the unused ones given back, a
receive queue with no room makes the device rest the TAP, and broken chains come back empty."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator

import pytest

from pyvmm.devices.virtio.net import HEADER_SIZE, RX, TX, Net, NetFeature
from pyvmm.devices.virtio.queue import SplitQueue, VirtqFlags
from pyvmm.memory import GuestMemory
from pyvmm.net.tap import Offload, Tap
from tests.unit.devices.virtio import rings
from tests.unit.devices.virtio.rings import Interrupts, QueueDriver

MiB = 1 << 20
SIZE = 16
MAC = bytes.fromhex("525400123456")
VERSION_1 = 1 << 32


class FakeTap(Tap):
    """One end of a socketpair; the ioctls are recorded instead of made."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "tap-test", created=False)
        self.vnet_hdr_size = 0
        self.offload = Offload(0)

    def set_vnet_hdr_size(self, size: int) -> None:
        self.vnet_hdr_size = size

    def set_offload(self, offload: Offload) -> None:
        self.offload = offload

    def supports_offload(self, offload: Offload) -> bool:
        return True


def header(num_buffers: int = 0, flags: int = 0) -> bytes:
    return bytes([flags]) + bytes(HEADER_SIZE - 3) + struct.pack("<H", num_buffers)[:2]


class Rig:
    def __init__(self, mem: GuestMemory, features: int, mac: bytes | None = MAC) -> None:
        self.host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        guest_end.setblocking(False)
        self.tap = FakeTap(guest_end.detach())
        self.net = Net(self.tap, "eth0", mac)
        mem.fill(0, MiB)
        self.rx = QueueDriver(mem, 0x1000, 0x20000)
        self.tx = QueueDriver(mem, 0x4000, 0x80000)
        self.irq = Interrupts()
        self.queues = {RX: self.rx.queue(), TX: self.tx.queue()}
        self.net.activate(mem, self.irq, self.queues, VERSION_1 | features)
        self.mem = mem

    def tap_readable(self) -> bool:
        (handler,) = self.net.event_sources().values()
        return handler()

    def process(self, index: int) -> None:
        queue = self.queues[index]
        queue.budget = queue.size
        self.net.process_queue(index, queue)

    def close(self) -> None:
        for q in self.queues.values():
            q.release()
        self.net.close()
        self.host.close()


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB)])
    yield m
    m.close()


@pytest.fixture
def rig(mem: GuestMemory) -> Iterator[Rig]:
    r = Rig(mem, NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.MRG_RXBUF)
    yield r
    r.close()


@pytest.fixture
def plain(mem: GuestMemory) -> Iterator[Rig]:
    r = Rig(mem, 0)
    yield r
    r.close()


def test_config_space_has_the_mac_and_link_up(mem: GuestMemory) -> None:
    r = Rig(mem, 0)
    try:
        data = bytearray(8)
        r.net.config_read(0, memoryview(data))
        assert bytes(data) == MAC + struct.pack("<H", 1)
        assert r.net.device_features & NetFeature.MAC
    finally:
        r.close()
    r = Rig(mem, 0, mac=None)
    try:
        assert not r.net.device_features & NetFeature.MAC
    finally:
        r.close()


def test_the_offloads_the_driver_takes_go_to_the_tap(rig: Rig, plain: Rig) -> None:
    assert rig.tap.vnet_hdr_size == HEADER_SIZE == 12
    assert rig.tap.offload == Offload.CSUM | Offload.TSO4
    assert plain.tap.offload == Offload(0)


def test_a_frame_goes_out_with_its_header_whatever_the_split(rig: Rig) -> None:
    frame = bytes(range(200))
    hdr = header(flags=1)  # NEEDS_CSUM: the TAP does the checksum
    head = rig.tx.add(
        [
            (rig.tx.buffer(hdr[:5]), 5, False),
            (rig.tx.buffer(hdr[5:] + frame[:50]), len(hdr) - 5 + 50, False),
            (rig.tx.buffer(frame[50:]), 150, False),
        ]
    )
    rig.process(TX)
    assert rig.host.recv(4096) == hdr + frame
    assert rig.tx.used() == [(head, 0)]


def test_a_tx_chain_with_a_writable_buffer_is_returned_unsent(rig: Rig) -> None:
    head = rig.tx.add(
        [(rig.tx.buffer(header() + b"x" * 60), 72, False), (rig.tx.buffer(8), 8, True)]
    )
    rig.process(TX)
    assert rig.tx.used() == [(head, 0)]
    with pytest.raises(BlockingIOError):
        rig.host.recv(4096)


def test_a_frame_comes_in_one_buffer_without_mergeable_buffers(plain: Rig) -> None:
    frame = b"\x52\x54" + bytes(range(98))
    at = plain.rx.buffer(2048)
    head = plain.rx.add([(at, 2048, True)])
    plain.host.send(header() + frame)
    assert plain.tap_readable() is False  # the one buffer is used: rest until there are more
    assert plain.rx.used() == [(head, HEADER_SIZE + len(frame))]
    got = plain.mem.read(at, HEADER_SIZE + len(frame))
    assert got == header(num_buffers=1) + frame
    assert plain.irq.used == [RX]


def test_frames_merge_buffers_as_they_need_and_leave_the_rest(rig: Rig) -> None:
    bufs = [rig.rx.buffer(4096) for _ in range(12)]
    heads = [rig.rx.add([(at, 4096, True)]) for at in bufs]
    big = bytes(i & 0xFF for i in range(20000))  # a GSO frame, bigger than any before it
    small = b"small frame"
    for frame in (small, big, small):
        rig.host.send(header() + frame)
    assert rig.tap_readable()  # frames stop before buffers do: keep watching
    first = HEADER_SIZE + len(big)
    assert rig.rx.used() == [
        (heads[0], HEADER_SIZE + len(small)),
        (heads[1], 4096),
        (heads[2], 4096),
        (heads[3], 4096),
        (heads[4], 4096),
        (heads[5], first - 4 * 4096),
        # Recent frames were large: the device takes room for one as big, uses what it needs.
        (heads[6], HEADER_SIZE + len(small)),
    ]
    assert rig.mem.read(bufs[0], HEADER_SIZE + len(small)) == header(num_buffers=1) + small
    data = b"".join(rig.mem.read(at, 4096) for at in bufs[1:6])[:first]
    assert data == header(num_buffers=5) + big
    assert rig.mem.read(bufs[6], HEADER_SIZE + len(small)) == header(num_buffers=1) + small
    assert rig.queues[RX].has_pending()  # the rest stay posted


def test_a_frame_larger_than_the_room_waits_for_more_buffers(rig: Rig) -> None:
    bufs = [rig.rx.buffer(4096) for _ in range(2)]
    heads = [rig.rx.add([(at, 4096, True)]) for at in bufs]
    big = bytes(i & 0xFF for i in range(10000))
    rig.host.send(header() + big)
    assert rig.tap_readable() is False  # read, held, the TAP rests
    assert rig.rx.used() == []
    bufs.append(rig.rx.buffer(4096))
    heads.append(rig.rx.add([(bufs[-1], 4096, True)]))
    rig.process(RX)
    length = HEADER_SIZE + len(big)
    assert rig.rx.used() == [(heads[0], 4096), (heads[1], 4096), (heads[2], length - 8192)]
    assert b"".join(rig.mem.read(at, 4096) for at in bufs)[:length] == header(3) + big


def test_no_room_rests_the_tap_until_the_driver_adds_buffers(plain: Rig) -> None:
    plain.host.send(header() + b"waiting frame")
    assert plain.tap_readable() is False  # nothing to read into: stop watching, keep the frame
    at = plain.rx.buffer(2048)
    head = plain.rx.add([(at, 2048, True)])
    plain.process(RX)  # the driver's notification: the frame comes in now
    assert plain.rx.used() == [(head, HEADER_SIZE + 13)]
    assert plain.mem.read(at + HEADER_SIZE, 13) == b"waiting frame"
    assert not plain.net.has_work(RX, plain.queues[RX])


def test_an_empty_tap_keeps_the_buffers_posted(plain: Rig) -> None:
    plain.rx.add([(plain.rx.buffer(2048), 2048, True)])
    assert plain.tap_readable() is True
    assert plain.rx.used() == []
    assert plain.queues[RX].has_pending()


def test_a_frame_too_big_for_a_plain_buffer_is_dropped_and_the_buffer_reused(plain: Rig) -> None:
    at = plain.rx.buffer(256)
    head = plain.rx.add([(at, 256, True)])
    plain.host.send(header() + bytes(1000))
    plain.host.send(header() + b"fits")
    plain.tap_readable()
    assert plain.rx.used() == [(head, HEADER_SIZE + 4)]


def test_a_readable_rx_buffer_is_returned_empty(plain: Rig) -> None:
    bad = plain.rx.add([(plain.rx.buffer(64), 64, False), (plain.rx.buffer(2048), 2048, True)])
    good_at = plain.rx.buffer(2048)
    good = plain.rx.add([(good_at, 2048, True)])
    plain.host.send(header() + b"frame")
    plain.tap_readable()
    assert plain.rx.used() == [(bad, 0), (good, HEADER_SIZE + 5)]


def test_frames_the_tap_refuses_are_dropped_counted_and_returned(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.host.close()  # the TAP's other end is gone: every write fails, as on a link that is down
    heads = [rig.tx.add([(rig.tx.buffer(header() + b"x" * 60), 72, False)]) for _ in range(3)]
    with caplog.at_level(logging.INFO):
        rig.process(TX)
    assert rig.tx.used() == [(head, 0) for head in heads]
    assert "refused 3 frames" in caplog.text


def test_a_tx_chain_of_more_buffers_than_writev_takes_is_returned_unsent(mem: GuestMemory) -> None:
    r = Rig(mem, 0)
    try:
        # A chain of 1,100 buffers (writev takes at most 1,024) in a queue long enough for it.
        big = 2048
        r.queues[TX] = SplitQueue(mem, big, 0x90000, 0xA0000, 0xA8000, False)
        r.net.activate(mem, r.irq, r.queues, VERSION_1)
        for i in range(1100):
            mem.write(0x90000 + rings.DESC_SIZE * i,
                      rings.descriptor(0xB0000 + i, 1, VirtqFlags.NEXT, i + 1))  # fmt: skip
        mem.write(0x90000 + rings.DESC_SIZE * 1099, rings.descriptor(0xB0000, 13, 0, 0))
        mem.write_u16(0xA0000 + rings.avail_entry(0), 0)
        mem.write_u16(0xA0000 + rings.AVAIL_IDX, 1)
        r.process(TX)
        assert mem.read_u16(0xA8000 + rings.USED_IDX) == 1
        with pytest.raises(BlockingIOError):
            r.host.recv(4096)
    finally:
        r.close()
