"""virtio-net with its queues run by the host kernel (vhost-net), as crosvm does where
/dev/vhost-net exists: the same device as `net.Net` to the driver (config space, features, the
TAP's offloads), but frames move between the TAP and guest memory inside the kernel, and the
guest's notifications go straight to it (the queues' ioeventfds become vhost's kick fds).

vhost signals used buffers on a call eventfd per queue; the worker watches those and raises the
queue's interrupt through the transport (MSI-X or INTx alike). Suspending the VM detaches the TAP
from vhost (nothing moves) and attaches it again on resume; a driver reset stops the rings.
The vhost fd, like every fd, is opened by the VMM and handed over; the process that runs the
device becomes its owner when the driver first starts the device.
"""

from __future__ import annotations

import os

from pyvmm.devices.virtio.device import EventHandler
from pyvmm.devices.virtio.net import RX, TX, Net, NetFeature
from pyvmm.devices.virtio.queue import (
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvmm.net.tap import Tap
from pyvmm.net.vhost import VHOST_FILE_UNBIND, Vhost, VhostError


class VhostNet(Net):
    """One NIC on one TAP, its queues run by vhost-net."""

    def __init__(self, tap: Tap, vhost: Vhost, name: str, mac: bytes | None) -> None:
        super().__init__(tap, name, mac)
        self.vhost = vhost
        self._vhost_features = vhost.features()
        # VHOST_SET_OWNER binds vhost to the calling process's memory: made at the first
        # activation, in the process that runs the device (a device process's jail forks it).
        self._owned = False
        # Made now, for every activation: a jailed process can open no new fd later.
        self._calls = {
            RX: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
            TX: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
        }
        self._running: list[int] = []  # the queues vhost runs now

    @property
    def device_features(self) -> int:
        features = super().device_features
        if not self._vhost_features & NetFeature.MRG_RXBUF:
            features &= ~NetFeature.MRG_RXBUF
        return features

    def take_notifications(self, notify: dict[int, int]) -> bool:
        try:
            self._start(notify)
        except VhostError as e:
            self.guest_log.warning("vhost", "%s; the device needs a reset", e)
            self._stop()
            self.interrupt.set_needs_reset()
        return True

    def _start(self, notify: dict[int, int]) -> None:
        vhost, mem = self.vhost, self.mem
        if not self._owned:
            vhost.set_owner()
            self._owned = True
        vhost.set_features(self.features & self._vhost_features)
        vhost.set_mem_table([(r.guest_addr, r.size, r.host_addr) for r in mem.ram_regions])
        for index, queue in sorted(self.queues.items()):
            vhost.set_vring_num(index, queue.size)
            vhost.set_vring_base(index, queue.next_avail)
            size = queue.size
            vhost.set_vring_addr(
                index,
                mem.host_address(queue.desc_table, desc_table_size(size)),
                mem.host_address(queue.used_ring, used_ring_size(size)),
                mem.host_address(queue.avail_ring, avail_ring_size(size)),
            )
            vhost.set_vring_kick(index, notify[index])
            vhost.set_vring_call(index, self._calls[index])
            vhost.set_backend(index, self.tap.fd)
            self._running.append(index)

    def _stop(self) -> None:
        for index in self._running:
            try:
                self.vhost.set_backend(index, VHOST_FILE_UNBIND)
                self.vhost.get_vring_base(index)  # stops the ring
            except VhostError as e:
                self.guest_log.warning("vhost", "stopping queue %d: %s", index, e)
        self._running = []

    def event_sources(self) -> dict[int, EventHandler]:
        return {fd: self._used_handler(index) for index, fd in self._calls.items()}

    def _used_handler(self, index: int) -> EventHandler:
        def used() -> bool:
            try:
                os.eventfd_read(self._calls[index])
            except BlockingIOError:
                return True
            self.interrupt.signal_used(index)
            return True

        return used

    def has_work(self, index: int, queue: SplitQueue) -> bool:
        return False

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Never called: vhost takes the notifications."""

    def park(self) -> None:
        for index in self._running:
            self.vhost.set_backend(index, VHOST_FILE_UNBIND)

    def unpark(self) -> None:
        for index in self._running:
            self.vhost.set_backend(index, self.tap.fd)

    def reset(self) -> None:
        self._stop()
        super().reset()

    def keep_fds(self) -> list[int]:
        return [self.tap.fd, self.vhost.fd]

    def close(self) -> None:
        self._stop()
        for fd in self._calls.values():
            os.close(fd)
        os.close(self.vhost.fd)
        super().close()
