"""virtio-vsock on vhost-vsock, against a recording stand-in for /dev/vhost-vsock: the driver's
activation hands vhost the receive and transmit rings and starts it, the event queue stays with
the worker; vhost's used signals become interrupts; suspend stops vhost and resume starts it
and sends TRANSPORT_RESET; a reset stops the rings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvmm.devices.virtio.device import Feature
from pyvmm.devices.virtio.vhost_vsock import EVENTS, RX, TX, VhostVsock
from pyvmm.memory import GuestMemory
from pyvmm.vsock.packet import CONFIG, EVENT, EVENT_TRANSPORT_RESET
from tests.unit.devices.virtio.rings import Interrupts, QueueDriver
from tests.unit.devices.virtio.test_vhost_net import FakeVhost

MiB = 1 << 20
CID = 42


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB)])
    yield m
    m.close()


def test_vhost_runs_rx_and_tx_and_the_event_queue_stays_here(mem: GuestMemory) -> None:
    vhost = FakeVhost()
    dev = VhostVsock(CID, vhost)
    config = memoryview(bytearray(CONFIG.size))
    dev.config_read(0, config)
    assert CONFIG.unpack(config) == (CID,)
    drivers = {
        RX: QueueDriver(mem, 0x1000, 0x20000),
        TX: QueueDriver(mem, 0x4000, 0x40000),
        EVENTS: QueueDriver(mem, 0x8000, 0x60000),
    }
    queues = {index: d.queue() for index, d in drivers.items()}
    irq = Interrupts()
    dev.activate(mem, irq, queues, int(Feature.VERSION_1))
    kicks = {index: os.eventfd(0) for index in queues}
    try:
        assert dev.take_notifications(kicks) == {RX, TX}  # the worker keeps the event queue's
        kicked = {c[1] for c in vhost.calls if c[0] == "kick"}
        assert kicked == {RX, TX}
        assert vhost.calls[-1] == ("running", True)
        call_fds = {c[1]: c[2] for c in vhost.calls if c[0] == "call"}
        os.eventfd_write(call_fds[RX], 1)
        assert dev.event_sources()[call_fds[RX]]() is True
        assert irq.used == [RX]

        ev = drivers[EVENTS]
        at = ev.buffer(EVENT.size)
        head = ev.add([(at, EVENT.size, True)])
        dev.process_queue(EVENTS, queues[EVENTS])
        assert ev.used() == []  # nothing to say until a resume
        del vhost.calls[:]
        dev.park()
        dev.unpark()
        assert vhost.calls == [("running", False), ("running", True)]
        dev.process_queue(EVENTS, queues[EVENTS])
        assert ev.used() == [(head, EVENT.size)]
        assert EVENT.unpack(mem.read(at, EVENT.size)) == (EVENT_TRANSPORT_RESET,)

        del vhost.calls[:]
        dev.reset()
        assert vhost.calls == [("running", False), ("stop", RX), ("stop", TX)]
    finally:
        for q in queues.values():
            q.release()
        for fd in kicks.values():
            os.close(fd)
        dev.close()
