"""The worker that runs one virtio device's queues: ioeventfds in, interrupts out.

It waits on each queue's ioeventfd (signalled by KVM when the guest writes the queue's notify
address, without a VM exit to userspace), on the device's own event sources (a TAP, a socket), on
the interrupt's resample eventfd (INTx acknowledged) and on its own control eventfd (stop, pause).
A device's source may ask to rest (a TAP with nowhere to put frames): it is not watched again until
a queue notification has been processed, so a full queue never spins the worker. Per notification
it lets the device take at most one queue's worth of chains, signals the queue's interrupt if the
driver wants one, and looks at its control flags before the next round: a guest that keeps a queue
busy for ever cannot keep the worker from stopping or parking. It knows nothing of the VMM: only
fds, guest memory, the device and its interrupt, so the same loop can later run in a jailed child
process. A device that fails is marked as needing a reset and the reason logged; the VM goes on.

Every wait on a worker is bounded: `stop` and `pause` give up after a timeout and say so, and a
worker that never stops is abandoned (a daemon thread) so that the VM can still exit.
"""

from __future__ import annotations

import logging
import os
import select
import threading

from pyvmm.devices.virtio.device import DeviceError, DeviceInterrupt, EventHandler, VirtioDevice
from pyvmm.devices.virtio.queue import QueueError, SplitQueue

log = logging.getLogger(__name__)

# How long stop() and pause() wait for the worker by default.
STOP_TIMEOUT_S = 5.0
PAUSE_TIMEOUT_S = 5.0


class QueueWorker:
    """One thread per activated device."""

    def __init__(
        self,
        device: VirtioDevice,
        queues: dict[int, tuple[SplitQueue, int | None]],
        interrupt: DeviceInterrupt,
        control: int,
    ) -> None:
        """`queues` maps queue index -> (queue, ioeventfd, or None for a queue the device's
        kernel backend watches itself) of an activated `device`; its
        `interrupt` is signalled for used buffers, and told once if the device breaks.
        `control` is an eventfd the worker is woken by (to stop or pause); the caller owns it
        and may give it to the next worker, so that a jailed device process, which can open no
        new fd, can be activated again."""
        self.device = device
        self.queues = queues
        self._interrupt = interrupt
        self._control = control
        self._stopping = False
        self._pause_requested = False
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"virtio-{device.name}", daemon=True)

    @property
    def name(self) -> str:
        return f"virtio {self.device.name}"

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop processing (a request in progress finishes first) and wait up to `timeout`
        seconds for the thread. False if it did not end: it is then abandoned, with a warning,
        and must not be given the device again."""
        self._stopping = True
        self._yield_now()
        self._resume.set()
        if threading.current_thread() is self._thread:
            return True
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: the worker did not stop within %g s; abandoned", self.name, timeout)
            return False  # its control fd must stay open: the thread may still poll it
        return True

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> bool:
        """Park the worker between requests; True once it waits, False if it did not park
        within `timeout` seconds (it then parks when it can, until `resume`)."""
        if not self._thread.is_alive():
            return True
        self._resume.clear()
        self._pause_requested = True
        self._yield_now()
        return self._paused.wait(timeout)

    def resume(self) -> None:
        self._pause_requested = False
        self._paused.clear()
        self._resume.set()

    def _yield_now(self) -> None:
        """Make the device return from the queue it is draining after its current request, and
        wake the thread if it waits for notifications."""
        for queue, _ in self.queues.values():
            queue.budget = 0
        os.eventfd_write(self._control, 1)

    def _run(self) -> None:
        poller = select.poll()
        handlers: dict[int, EventHandler] = {
            self._control: self._drain_control,
            self._interrupt.resample_fd: self._resample,
        }
        handlers.update(self.device.event_sources())
        notify = {fd: index for index, (_, fd) in self.queues.items() if fd is not None}
        for fd in (*handlers, *notify):
            poller.register(fd, select.POLLIN)
        resting: set[int] = set()  # sources whose handler asked to be left alone for now
        # Anything the driver queued before DRIVER_OK (or before a resume) is handled at once.
        watched = set(notify.values())
        pending = set(watched)
        try:
            while not self._stopping:
                if self._pause_requested:
                    self._park()
                    pending.update(watched)
                    continue
                more = {index for index in sorted(pending) if self._process(index)}
                if pending and resting:
                    for fd in resting:
                        poller.register(fd, select.POLLIN)
                    resting.clear()
                # With work left, only look for control and new notifications (no wait).
                ready = poller.poll(0 if more else None)
                pending = more
                for fd, _ in ready:
                    if fd in notify:
                        if _take(fd):
                            pending.add(notify[fd])
                    elif not handlers[fd]():
                        poller.unregister(fd)
                        resting.add(fd)
        except (DeviceError, QueueError) as e:
            # The guest's doing, and it may do it again after every reset: rate-limited.
            self.device.guest_log.warning("device failed", "%s; the device needs a reset", e)
            self._interrupt.set_needs_reset()
        except Exception as e:
            log.exception("%s: worker failed", self.name)
            self.device.guest_log.warning("device failed", "%s; the device needs a reset", e)
            self._interrupt.set_needs_reset()
        finally:
            self._paused.set()

    def _drain_control(self) -> bool:
        _take(self._control)
        return True

    def _resample(self) -> bool:
        self._interrupt.resample()
        return True

    def _park(self) -> None:
        self.device.park()
        self._paused.set()
        self._resume.wait()
        self._paused.clear()
        self.device.unpark()

    def _process(self, index: int) -> bool:
        """One round on a queue: at most a queue's worth of chains, taken with guest
        notifications off; then notifications back on, and the interrupt if one is due.
        Whether chains are still waiting (looked at after notifications are on, so a chain the
        driver adds in between is never left without a kick)."""
        queue, _ = self.queues[index]
        queue.budget = queue.size
        queue.disable_notification()
        self.device.process_queue(index, queue)
        queue.enable_notification()
        if queue.needs_interrupt():
            self._interrupt.signal_used(index)
        return self.device.has_work(index, queue) and not self._stopping


def _take(eventfd: int) -> bool:
    """Read (reset) a non-blocking eventfd; whether it had been signalled."""
    try:
        os.eventfd_read(eventfd)
    except BlockingIOError:
        return False
    return True
