"""virtio-net on vhost-net, against a recording stand-in for /dev/vhost-net: the driver's
activation hands vhost the memory table, each ring (size, next index, addresses in this
process), the queue's notify eventfd and the TAP; vhost's used signals become interrupts;
suspend detaches the TAP and resume attaches it; a reset stops the rings."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from pyvmm.devices.virtio.net import RX, TX, NetFeature
from pyvmm.devices.virtio.vhost_net import VhostNet
from pyvmm.memory import GuestMemory
from pyvmm.vhost import VHOST_FILE_UNBIND, Vhost
from tests.unit.devices.virtio.rings import Interrupts, QueueDriver
from tests.unit.devices.virtio.test_net import MAC, VERSION_1, FakeTap

MiB = 1 << 20
VHOST_FEATURES = VERSION_1 | NetFeature.MRG_RXBUF | (1 << 29) | (1 << 28)


class FakeVhost(Vhost):
    def __init__(self) -> None:
        super().__init__(os.eventfd(0, os.EFD_CLOEXEC))
        self.calls: list[tuple[object, ...]] = []

    def set_owner(self) -> None:
        self.calls.append(("owner",))

    def features(self) -> int:
        return VHOST_FEATURES

    def set_features(self, features: int) -> None:
        self.calls.append(("features", features))

    def set_mem_table(self, regions: list[tuple[int, int, int]]) -> None:
        self.calls.append(("mem", regions))

    def set_vring_num(self, index: int, size: int) -> None:
        self.calls.append(("num", index, size))

    def set_vring_base(self, index: int, next_avail: int) -> None:
        self.calls.append(("base", index, next_avail))

    def get_vring_base(self, index: int) -> int:
        self.calls.append(("stop", index))
        return 0

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        self.calls.append(("addr", index, desc, used, avail))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.calls.append(("kick", index, fd))

    def set_vring_call(self, index: int, fd: int) -> None:
        self.calls.append(("call", index, fd))

    def set_backend(self, index: int, fd: int) -> None:
        self.calls.append(("backend", index, fd))

    def set_running(self, running: bool) -> None:
        self.calls.append(("running", running))


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB)])
    yield m
    m.close()


def test_activation_gives_vhost_the_rings_and_the_tap(mem: GuestMemory) -> None:
    host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap = FakeTap(guest_end.detach())
    vhost = FakeVhost()
    dev = VhostNet(tap, vhost, "net0", MAC)
    rx, tx = QueueDriver(mem, 0x1000, 0x20000), QueueDriver(mem, 0x4000, 0x80000)
    queues = {RX: rx.queue(), TX: tx.queue()}
    irq = Interrupts()
    features = VERSION_1 | NetFeature.MRG_RXBUF | NetFeature.GUEST_CSUM
    dev.activate(mem, irq, queues, features)
    kicks = {RX: os.eventfd(0), TX: os.eventfd(0)}
    try:
        assert dev.take_notifications(kicks) == {RX, TX}  # the worker leaves them to vhost
        base = mem.host_address(0, MiB)
        calls = vhost.calls
        assert calls[0] == ("owner",)  # at the first activation: the device's own process
        assert ("features", VERSION_1 | NetFeature.MRG_RXBUF) in calls  # vhost's part only
        assert ("mem", [(0, MiB, base)]) in calls
        for index, driver in ((RX, rx), (TX, tx)):
            assert ("num", index, 16) in calls
            assert ("base", index, 0) in calls
            assert ("addr", index, base + driver.desc_at, base + driver.used_at,
                    base + driver.avail_at) in calls  # fmt: skip
            assert ("kick", index, kicks[index]) in calls
            assert ("backend", index, tap.fd) in calls
        assert tap.offload and tap.vnet_hdr_size == 12
        call_fds = {c[1]: c[2] for c in calls if c[0] == "call"}
        # vhost signals used buffers: the worker's handler raises the queue's interrupt.
        os.eventfd_write(call_fds[TX], 1)
        assert dev.event_sources()[call_fds[TX]]() is True
        assert irq.used == [TX]
        del vhost.calls[:]
        dev.park()
        dev.unpark()
        assert vhost.calls == [
            ("backend", RX, VHOST_FILE_UNBIND),
            ("backend", TX, VHOST_FILE_UNBIND),
            ("backend", RX, tap.fd),
            ("backend", TX, tap.fd),
        ]
        del vhost.calls[:]
        dev.reset()
        assert vhost.calls == [  # the TAP off every ring, then the rings stopped
            ("backend", RX, VHOST_FILE_UNBIND),
            ("backend", TX, VHOST_FILE_UNBIND),
            ("stop", RX),
            ("stop", TX),
        ]
    finally:
        for q in queues.values():
            q.release()
        for fd in kicks.values():
            os.close(fd)
        dev.close()
        host.close()


def test_vhost_signals_an_unmasked_vector_directly_and_a_masked_one_through_the_worker(
    mem: GuestMemory,
) -> None:
    """While a queue's MSI-X vector can be delivered vhost writes its irqfd (no VMM wake-up);
    once the driver masks it, vhost's signals go to the device's eventfd (kept pending)."""
    host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    vhost = FakeVhost()
    dev = VhostNet(FakeTap(guest_end.detach()), vhost, "net0", MAC)
    rx, tx = QueueDriver(mem, 0x1000, 0x20000), QueueDriver(mem, 0x4000, 0x80000)
    queues = {RX: rx.queue(), TX: tx.queue()}
    irq = Interrupts()
    irqfds = {RX: 1000, TX: 1001}  # stand-ins: the fake vhost only records them
    irq.direct = dict(irqfds)
    dev.activate(mem, irq, queues, VERSION_1)
    kicks = {RX: os.eventfd(0), TX: os.eventfd(0)}
    try:
        dev.take_notifications(kicks)
        calls = [c for c in vhost.calls if c[0] == "call"]
        own = {index: fd for _, index, fd in calls[:2]}  # set up first with the device's own
        assert calls[2:] == [("call", RX, irqfds[RX]), ("call", TX, irqfds[TX])]
        del vhost.calls[:]
        irq.direct = {TX: irqfds[TX]}  # the driver masked RX's vector
        assert irq.watcher is not None
        irq.watcher()
        assert vhost.calls == [("call", RX, own[RX])]
        del vhost.calls[:]
        irq.watcher()  # nothing changed: nothing done
        assert vhost.calls == []
        dev.reset()
        assert irq.watcher is None  # no more re-routing once the rings stop
    finally:
        for q in queues.values():
            q.release()
        for fd in kicks.values():
            os.close(fd)
        dev.close()
        host.close()


def test_closing_twice_leaves_a_file_that_took_the_vhost_fds_number_alone() -> None:
    # A device process closes its device when the VMM says so and again on its way out.
    host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    vhost = FakeVhost()
    old_number = vhost.fd
    dev = VhostNet(FakeTap(guest_end.detach()), vhost, "net0", MAC)
    dev.close()
    other = os.eventfd(0)
    reused = os.dup2(other, old_number)  # a file opened since, under the freed number
    try:
        dev.close()
        os.fstat(reused)  # still open
    finally:
        for fd in (other, reused):
            os.close(fd)
        host.close()
