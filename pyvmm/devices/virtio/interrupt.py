"""How a virtio device tells its driver something happened, and the state that goes with it.

An `Interrupt` delivers used-buffer and configuration-change notifications through the MSI-X
vector the driver chose, or, with MSI-X off, by setting the ISR and raising the function's
level-triggered INTx line (virtio 1.2, 4.1.4.5). It also holds the device status and the
configuration generation, because they change together with the ISR: a device that fails sets
DEVICE_NEEDS_RESET, bumps the generation and raises a configuration interrupt in one step. All
of it changes under `lock`, which is never held while waiting for anything, so the worker and
the vCPU threads can both take it.

With INTx, the line stays asserted until the guest acknowledges it (EOI); KVM then lowers it and
signals the line's resample eventfd, and `resample()` raises it again while the ISR still has a
bit set, so an interrupt raised while the guest was in its handler is never lost.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.pci.msix import NO_VECTOR, Msix
from pyvmm.devices.virtio.device import DeviceStatus


class Isr(enum.IntFlag):
    """The ISR status bits (virtio 1.2, 4.1.4.5)."""

    QUEUE = 1
    CONFIG = 2


class Interrupt:
    """One virtio function's interrupts, ISR, device status and configuration generation."""

    def __init__(self, msix: Msix, intx: LevelIrq) -> None:
        self.lock = threading.Lock()
        self._msix = msix
        self._intx = intx
        self.isr = Isr(0)
        self.status = DeviceStatus(0)
        self.config_generation = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors: dict[int, int] = {}  # queue index -> MSI-X vector, set at activation
        self._delivery_watch: Callable[[], None] | None = None

    @property
    def resample_fd(self) -> int:
        """Readable when the guest has acknowledged INTx: then call `resample()`."""
        return self._intx.resample_fd

    def reset(self) -> None:
        """Back to a freshly reset device: status 0, nothing pending (the generation goes on
        counting, so a driver never sees an old value come back)."""
        with self.lock:
            self.isr = Isr(0)
            self.status = DeviceStatus(0)
            self.queue_vectors = {}

    def signal_used(self, queue: int) -> None:
        """The device put buffers in `queue`'s used ring and the driver wants to know."""
        if self._msix.enabled:
            self._msix.notify(self.queue_vectors.get(queue, NO_VECTOR))
            return
        with self.lock:
            self.isr |= Isr.QUEUE
            self._intx.trigger()

    def direct_fd(self, queue: int) -> int | None:
        """An eventfd that raises `queue`'s interrupt when written, for a signaller outside
        this process's code (vhost): its MSI-X vector's irqfd while that can be delivered.
        None with INTx (the ISR must be set) or a masked vector: use `signal_used` then."""
        if not self._msix.enabled:
            return None
        return self._msix.direct_fd(self.queue_vectors.get(queue, NO_VECTOR))

    def watch_delivery(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` whenever `direct_fd` may have changed (None: stop)."""
        if self._delivery_watch is not None:
            self._msix.unwatch(self._delivery_watch)
        self._delivery_watch = callback
        if callback is not None:
            self._msix.watch(callback)

    def signal_config_changed(self) -> None:
        """The device changed its configuration space: a new generation and an interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._signal_config_locked()

    def set_needs_reset(self) -> None:
        """The device cannot go on with this driver (virtio 1.2, 2.1.2): DEVICE_NEEDS_RESET,
        and if the driver is running, a configuration interrupt to tell it."""
        with self.lock:
            self.status |= DeviceStatus.DEVICE_NEEDS_RESET
            if DeviceStatus.DRIVER_OK in self.status:
                self.config_generation = (self.config_generation + 1) & 0xFF
                self._signal_config_locked()

    def _signal_config_locked(self) -> None:
        if self._msix.enabled:
            self._msix.notify(self.config_vector)
        else:
            self.isr |= Isr.CONFIG
            self._intx.trigger()

    def read_isr(self) -> Isr:
        """The ISR as the driver reads it: reading acknowledges (clears) it."""
        with self.lock:
            isr, self.isr = self.isr, Isr(0)
            return isr

    def resample(self) -> None:
        """The guest acknowledged INTx and KVM lowered the line: raise it again if anything is
        still pending."""
        if not self._intx.take_resample():
            return
        with self.lock:
            if self.isr:
                self._intx.trigger()
