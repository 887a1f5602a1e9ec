"""virtio-net with its queues run by the host kernel (vhost-net), as crosvm does where
/dev/vhost-net exists: the same device as `net.Net` to the driver (config space, features, the
TAP's offloads), but frames move between the TAP and guest memory inside the kernel, and the
guest's notifications go straight to it (the queues' ioeventfds become vhost's kick fds).

vhost signals used buffers on a call eventfd per queue, which the worker turns into interrupts
(vhost_rings.py, shared with vhost-vsock). Suspending the VM detaches the TAP
from vhost (nothing moves) and attaches it again on resume; a driver reset stops the rings.
The vhost fd, like every fd, is opened by the VMM and handed over; the process that runs the
device becomes its owner when the driver first starts the device.
"""

from __future__ import annotations

from pyvmm.devices.virtio.device import EventHandler
from pyvmm.devices.virtio.net import RX, TX, Net, NetFeature
from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.devices.virtio.vhost_rings import VhostRings
from pyvmm.net.tap import Tap
from pyvmm.vhost import VHOST_FILE_UNBIND, Vhost, VhostError


class VhostNet(Net):
    """One NIC on one TAP, its queues run by vhost-net."""

    def __init__(self, tap: Tap, vhost: Vhost, name: str, mac: bytes | None) -> None:
        super().__init__(tap, name, mac)
        self.vhost = vhost
        self._rings = VhostRings(vhost, (RX, TX), self._warn)

    @property
    def device_features(self) -> int:
        features = super().device_features
        if not self._rings.features & NetFeature.MRG_RXBUF:
            features &= ~NetFeature.MRG_RXBUF
        return features

    def take_notifications(self, notify: dict[int, int]) -> set[int]:
        try:
            self._rings.start(self.mem, self.queues, self.features, notify, self.interrupt)
            for index in self._rings.running:
                self.vhost.set_backend(index, self.tap.fd)
        except VhostError as e:
            self.guest_log.warning("vhost", "%s; the device needs a reset", e)
            self._stop()
            self.interrupt.set_needs_reset()
        return {RX, TX}

    def _stop(self) -> None:
        for index in self._rings.running:
            try:
                self.vhost.set_backend(index, VHOST_FILE_UNBIND)
            except VhostError as e:
                self.guest_log.warning("vhost", "detaching the TAP from queue %d: %s", index, e)
        self._rings.stop()

    def _warn(self, why: str) -> None:
        self.guest_log.warning("vhost", "%s", why)

    def event_sources(self) -> dict[int, EventHandler]:
        return self._rings.used_handlers(self.interrupt)

    def has_work(self, index: int, queue: SplitQueue) -> bool:
        return False

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Never called: vhost takes the notifications."""

    def park(self) -> None:
        for index in self._rings.running:
            self.vhost.set_backend(index, VHOST_FILE_UNBIND)

    def unpark(self) -> None:
        for index in self._rings.running:
            self.vhost.set_backend(index, self.tap.fd)

    def reset(self) -> None:
        self._stop()
        super().reset()

    def keep_fds(self) -> list[int]:
        return [self.tap.fd, *self._rings.keep_fds()]

    def close(self) -> None:
        self._stop()
        self._rings.close()
        super().close()
