"""virtio-vsock with its packets moved by the host kernel (vhost-vsock), as crosvm does where
/dev/vhost-vsock exists: host programs then reach the guest with AF_VSOCK sockets to its CID,
and the guest reaches theirs. The receive and transmit queues are vhost's; the event queue
stays here, for the TRANSPORT_RESET sent when the VM resumes after a suspend.

The VMM opens /dev/vhost-vsock and claims the guest's CID at start-up (so a CID another VM holds
is an error before the guest runs); the process that runs the device becomes vhost's owner when
the driver first starts the device, and stops vhost (SET_RUNNING 0) while the VM is suspended.
"""

from __future__ import annotations

from pyvmm.devices.virtio.device import DeviceType, EventHandler, VirtioDevice
from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.devices.virtio.vhost_rings import VhostRings
from pyvmm.devices.virtio.vsock import EVENTS, QUEUE_SIZE, RX, TX, post_transport_reset
from pyvmm.vhost import Vhost, VhostError
from pyvmm.vsock.packet import CONFIG


class VhostVsock(VirtioDevice):
    """The guest's vsock device with context ID `cid`, its streams run by vhost-vsock (whose
    fd has the CID set already)."""

    device_type = DeviceType.VSOCK

    def __init__(self, cid: int, vhost: Vhost, name: str = "vsock") -> None:
        self.name = name
        self.cid = cid
        self.vhost = vhost
        self._rings = VhostRings(vhost, (RX, TX), self._warn)
        self._config = CONFIG.pack(cid)
        self._reset_event_due = False

    @property
    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]

    @property
    def device_features(self) -> int:
        return 0  # streams only, as the userspace device

    def config_read(self, offset: int, data: memoryview) -> None:
        chunk = self._config[offset : offset + len(data)]
        data[:] = chunk + b"\x00" * (len(data) - len(chunk))

    def take_notifications(self, notify: dict[int, int]) -> set[int]:
        """vhost takes the receive and transmit queues' notifications; the worker keeps the
        event queue's."""
        try:
            self._rings.start(self.mem, self.queues, self.features, notify, self.interrupt)
            self.vhost.set_running(True)
        except VhostError as e:
            self.guest_log.warning("vhost", "%s; the device needs a reset", e)
            self._stop()
            self.interrupt.set_needs_reset()
        return {RX, TX}

    def _stop(self) -> None:
        if self._rings.running:
            try:
                self.vhost.set_running(False)
            except VhostError as e:
                self.guest_log.warning("vhost", "%s", e)
        self._rings.stop()

    def _warn(self, why: str) -> None:
        self.guest_log.warning("vhost", "%s", why)

    def event_sources(self) -> dict[int, EventHandler]:
        return self._rings.used_handlers(self.interrupt)

    def has_work(self, index: int, queue: SplitQueue) -> bool:
        return False

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        if index == EVENTS:
            self._send_reset_event(queue)

    def park(self) -> None:
        if self._rings.running:
            self.vhost.set_running(False)

    def unpark(self) -> None:
        if self._rings.running:
            self.vhost.set_running(True)
        self._reset_event_due = True

    def reset(self) -> None:
        self._stop()
        self._reset_event_due = False

    def keep_fds(self) -> list[int]:
        return self._rings.keep_fds()

    def close(self) -> None:
        """Idempotent: the device process closes its device when told to and on its way out."""
        if not self._rings.calls:
            return
        self._stop()
        self._rings.close()

    def _send_reset_event(self, events: SplitQueue) -> None:
        if self._reset_event_due:
            self._reset_event_due = not post_transport_reset(events, self.guest_log)
