"""The virtio-vsock device on its rings: the guest's packets from the transmit queue, packets for
the guest into receive buffers (a header split over descriptors included), TRANSPORT_RESET on
the event queue after a resume, and what it does with broken chains."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio.device import Feature
from pyvmm.devices.virtio.vsock import EVENTS, RX, TX, Vsock
from pyvmm.memory import GuestMemory
from pyvmm.vsock.dialer import Dialer, DialRequests
from pyvmm.vsock.packet import (
    CONFIG,
    EVENT,
    EVENT_TRANSPORT_RESET,
    HEADER_SIZE,
    HOST_CID,
    TYPE_STREAM,
    Header,
    Op,
)
from tests.unit.devices.virtio.rings import Interrupts, QueueDriver

MiB = 1 << 20
CID = 3


class Rig:
    def __init__(self, mem: GuestMemory, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.dialer = Dialer(path)
        self.dialer.start()
        self.path = path
        self.vsock = Vsock(CID, self.listener, DialRequests(self.dialer.device_end.dup()))
        mem.fill(0, MiB)
        self.rx = QueueDriver(mem, 0x1000, 0x20000)
        self.tx = QueueDriver(mem, 0x4000, 0x60000)
        self.ev = QueueDriver(mem, 0x8000, 0xA0000)
        self.irq = Interrupts()
        self.queues = {RX: self.rx.queue(), TX: self.tx.queue(), EVENTS: self.ev.queue()}
        self.vsock.activate(mem, self.irq, self.queues, int(Feature.VERSION_1))
        self.mem = mem

    def process(self, index: int) -> None:
        queue = self.queues[index]
        queue.budget = queue.size
        self.vsock.process_queue(index, queue)

    def host_events(self) -> bool:
        handler = self.vsock.event_sources()[self.vsock.muxer.fileno()]
        return handler()

    def send(self, op: Op, src_port: int, dst_port: int, payload: bytes = b"") -> int:
        hdr = Header(CID, HOST_CID, src_port, dst_port, len(payload), TYPE_STREAM, op, 0, 65536, 0)
        bufs = [(self.tx.buffer(hdr.pack()), HEADER_SIZE, False)]
        if payload:
            bufs.append((self.tx.buffer(payload), len(payload), False))
        head = self.tx.add(bufs)
        self.process(TX)
        return head

    def post_rx(self, count: int = 4) -> list[int]:
        """Receive buffers as Linux posts them: one 4 KiB buffer each (the first split in two,
        the header across both, as a driver may)."""
        addrs = []
        for i in range(count):
            if i == 0:
                a, b = self.rx.buffer(20), self.rx.buffer(4076)
                self.rx.add([(a, 20, True), (b, 4076, True)])
                addrs.append(a)
            else:
                at = self.rx.buffer(4096)
                self.rx.add([(at, 4096, True)])
                addrs.append(at)
        return addrs

    def received(self) -> list[tuple[Header, bytes]]:
        out = []
        for head, length in self.rx.used():
            data = self.rx.written(head, max(length, HEADER_SIZE))
            hdr = Header.unpack(data)
            out.append((hdr, data[HEADER_SIZE:length]))
        return out

    def close(self) -> None:
        for q in self.queues.values():
            q.release()
        self.vsock.close()
        self.dialer.close()
        self.listener.close()


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB)])
    yield m
    m.close()


@pytest.fixture
def rig(mem: GuestMemory, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(mem, str(tmp_path / "v.sock"))
    yield r
    r.close()


def test_config_space_has_the_cid(rig: Rig) -> None:
    data = memoryview(bytearray(CONFIG.size))
    rig.vsock.config_read(0, data)
    assert CONFIG.unpack(data) == (CID,)


def test_a_host_program_reaches_a_guest_listener(rig: Rig) -> None:
    rig.post_rx()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(rig.path)
    client.sendall(b"CONNECT 1234\n")
    assert rig.host_events()
    ((req, _),) = rig.received()
    assert (req.op, req.dst_cid, req.dst_port) == (Op.REQUEST, CID, 1234)
    assert rig.irq.used == [RX]
    head = rig.send(Op.RESPONSE, 1234, req.src_port)
    assert rig.tx.used() == [(head, 0)]
    client.settimeout(5)
    assert client.recv(64) == f"OK {req.src_port}\n".encode()
    client.sendall(b"ping")
    rig.host_events()
    ((rw, data),) = rig.received()  # through the split buffer's successor
    assert (rw.op, data) == (Op.RW, b"ping")
    rig.send(Op.RW, 1234, req.src_port, b"pong")
    assert client.recv(64) == b"pong"
    client.close()


def test_without_receive_buffers_the_device_rests(rig: Rig) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(rig.path)
    client.sendall(b"CONNECT 1234\n")
    assert rig.host_events() is False  # the REQUEST waits for a buffer
    rig.post_rx(1)
    rig.process(RX)  # the driver's notification
    assert [h.op for h, _ in rig.received()] == [Op.REQUEST]
    client.close()


def test_a_resume_resets_the_transport(rig: Rig) -> None:
    at = rig.ev.buffer(EVENT.size)
    head = rig.ev.add([(at, EVENT.size, True)])
    rig.process(EVENTS)
    assert rig.ev.used() == []  # nothing to say yet: the buffer waits
    rig.vsock.park()
    rig.vsock.unpark()
    rig.process(EVENTS)
    assert rig.ev.used() == [(head, EVENT.size)]
    assert EVENT.unpack(rig.mem.read(at, EVENT.size)) == (EVENT_TRANSPORT_RESET,)
    assert EVENTS in rig.irq.used


def test_a_packet_shorter_than_its_header_is_returned(rig: Rig) -> None:
    head = rig.tx.add([(rig.tx.buffer(20), 20, False)])
    rig.process(TX)
    assert rig.tx.used() == [(head, 0)]


def test_a_payload_longer_than_the_chain_is_refused(rig: Rig) -> None:
    hdr = Header(CID, HOST_CID, 5, 6, 1000, TYPE_STREAM, Op.RW, 0, 65536, 0)
    head = rig.tx.add([(rig.tx.buffer(hdr.pack()), HEADER_SIZE, False)])
    rig.process(TX)
    assert rig.tx.used() == [(head, 0)]
    rig.post_rx(1)
    rig.process(RX)
    assert rig.received() == []  # dropped: not even an RST for a malformed packet


def test_a_receive_buffer_too_small_for_a_header_is_returned_empty(rig: Rig) -> None:
    small = rig.rx.add([(rig.rx.buffer(16), 16, True)])
    rig.post_rx(1)
    rig.send(Op.REQUEST, 40000, 9)  # nobody listens at PATH_9: RST when the dialer answers
    used: list[tuple[int, int]] = []
    for _ in range(200):  # the dialer answers from its thread
        rig.host_events()
        used += rig.rx.used()
        if len(used) >= 2:
            break
        time.sleep(0.005)
    assert used[0] == (small, 0)
    hdr = Header.unpack(rig.rx.written(used[1][0], HEADER_SIZE))
    assert (hdr.op, hdr.dst_port) == (Op.RST, 40000)
