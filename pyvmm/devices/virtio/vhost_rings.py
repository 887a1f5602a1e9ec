"""Handing a virtio device's queues to a vhost backend in the host kernel, and taking them back:
what vhost-net and vhost-vsock devices share.

vhost signals used buffers on each queue's call eventfd. While the queue's MSI-X vector can be
delivered, that is the vector's KVM irqfd itself, so the interrupt reaches the guest without
waking the VMM (as QEMU and crosvm do); while the vector is masked, or with INTx, it is an
eventfd of the device's, which the worker turns into the interrupt through the transport (so a
masked vector's interrupt stays pending, and INTx sets the ISR). The MSI-X table tells the
rings when that changes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from pyvmm.devices.virtio.device import DeviceInterrupt, EventHandler
from pyvmm.devices.virtio.queue import (
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvmm.memory import GuestMemory
from pyvmm.vhost import Vhost, VhostError


class VhostRings:
    """The queues `indexes` of a device, run by `vhost` while started."""

    def __init__(self, vhost: Vhost, indexes: tuple[int, ...], warn: Callable[[str], None]) -> None:
        """`warn` says what failed where nobody waits for an answer (a re-route)."""
        self.vhost = vhost
        self._warn = warn
        self._lock = threading.Lock()  # re-routes come from the thread that wrote MSI-X
        self._interrupt: DeviceInterrupt | None = None
        self._routes: dict[int, int] = {}  # queue -> the call fd vhost has now
        self.features = vhost.features()
        # VHOST_SET_OWNER binds vhost to the calling process's memory: made at the first start,
        # in the process that runs the device (a device process's jail forks it).
        self._owned = False
        # Made now, for every start: a jailed process can open no new fd later.
        self.calls = {index: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for index in indexes}
        self.running: list[int] = []  # the queues vhost runs now

    def start(
        self,
        mem: GuestMemory,
        queues: dict[int, SplitQueue],
        features: int,
        notify: dict[int, int],
        interrupt: DeviceInterrupt,
    ) -> None:
        """Give vhost the memory and each of its queues the driver enabled (raises VhostError)."""
        vhost = self.vhost
        if not self._owned:
            vhost.set_owner()
            self._owned = True
        vhost.set_features(features & self.features)
        vhost.set_mem_table([(r.guest_addr, r.size, r.host_addr) for r in mem.ram_regions])
        for index, queue in sorted(queues.items()):
            if index not in self.calls:
                continue
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
            with self._lock:
                vhost.set_vring_call(index, self.calls[index])
                self._routes[index] = self.calls[index]
                self.running.append(index)
        self._interrupt = interrupt
        interrupt.watch_delivery(self._reroute)
        self._reroute()

    def _reroute(self) -> None:
        """Give each running queue's ring the call fd that suits its interrupt now."""
        interrupt = self._interrupt
        if interrupt is None:
            return
        with self._lock:
            for index in self.running:
                direct = interrupt.direct_fd(index)
                fd = self.calls[index] if direct is None else direct
                if self._routes.get(index) == fd:
                    continue
                try:
                    self.vhost.set_vring_call(index, fd)
                except VhostError as e:
                    self._warn(f"routing queue {index}'s interrupt: {e}")
                    continue
                self._routes[index] = fd

    def stop(self) -> None:
        """Stop every ring vhost runs."""
        if self._interrupt is not None:
            self._interrupt.watch_delivery(None)
            self._interrupt = None
        with self._lock:
            for index in self.running:
                try:
                    self.vhost.get_vring_base(index)  # stops the ring
                except VhostError as e:
                    self._warn(f"stopping queue {index}: {e}")
            self.running = []
            self._routes = {}

    def used_handlers(self, interrupt: DeviceInterrupt) -> dict[int, EventHandler]:
        """The worker's handlers for the call eventfds: each raises its queue's interrupt."""
        return {fd: self._used_handler(index, interrupt) for index, fd in self.calls.items()}

    def _used_handler(self, index: int, interrupt: DeviceInterrupt) -> EventHandler:
        def used() -> bool:
            try:
                os.eventfd_read(self.calls[index])
            except BlockingIOError:
                return True
            interrupt.signal_used(index)
            return True

        return used

    def keep_fds(self) -> list[int]:
        return [self.vhost.fd, *self.calls.values()]

    def close(self) -> None:
        for fd in self.calls.values():
            os.close(fd)
        self.calls = {}
        self.vhost.close()
