"""The worker that runs one virtio device's queues: ioeventfds in, interrupts out.

It waits on each queue's ioeventfd (signalled by KVM when the guest writes the queue's notify
address, without a VM exit to userspace) and on its own control eventfd (stop, pause). Per
notification it lets the device drain the queue and raises the queue's interrupt if the driver
wants one. It knows nothing of the VMM: only fds, guest memory and the device, so the same loop
can later run in a jailed child process. A device that fails stops its queues and logs why; the
VM goes on.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from pyvmm.devices.virtio.device import DeviceError, VirtioDevice
from pyvmm.devices.virtio.queue import QueueError, SplitQueue

log = logging.getLogger(__name__)


class QueueWorker:
    """One thread per activated device."""

    def __init__(
        self,
        device: VirtioDevice,
        queues: dict[int, tuple[SplitQueue, int]],
        interrupt: Callable[[int], None],
        on_failure: Callable[[str], None],
    ) -> None:
        """`queues` maps queue index -> (queue, ioeventfd); `interrupt(index)` raises that
        queue's interrupt; `on_failure(why)` is called once if the device breaks."""
        self.device = device
        self.queues = queues
        self._interrupt = interrupt
        self._on_failure = on_failure
        self._control = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._paused = threading.Event()
        self._pause_requested = False
        self._resume = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"virtio-{device.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop processing and wait for the thread (in-flight requests finish first)."""
        self._stopping = True
        self._resume.set()
        os.eventfd_write(self._control, 1)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        os.close(self._control)

    def pause(self) -> None:
        """Return once the worker has finished its current batch and waits."""
        if not self._thread.is_alive():
            return
        self._resume.clear()
        self._pause_requested = True
        os.eventfd_write(self._control, 1)
        self._paused.wait()

    def resume(self) -> None:
        self._pause_requested = False
        self._paused.clear()
        self._resume.set()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._control, select.POLLIN)
        by_fd = {fd: index for index, (_, fd) in self.queues.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        # Anything the driver queued before DRIVER_OK (or before a resume) is handled at once.
        pending = set(self.queues)
        try:
            while not self._stopping:
                for index in sorted(pending):
                    self._process(index)
                pending.clear()
                for fd, _ in poller.poll():
                    if fd == self._control:
                        os.eventfd_read(self._control)
                        if self._pause_requested:
                            self._paused.set()
                            self._resume.wait()
                            pending.update(self.queues)
                        continue
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    pending.add(by_fd[fd])
        except (DeviceError, QueueError) as e:
            log.warning("virtio %s: %s; the device needs a reset", self.device.name, e)
            self._on_failure(str(e))
        except Exception as e:
            log.exception("virtio %s: worker failed", self.device.name)
            self._on_failure(f"worker failed: {e}")
        finally:
            self._paused.set()

    def _process(self, index: int) -> None:
        """Drain the queue with guest notifications off, then turn them back on and look once
        more, so a chain the driver adds in between is never left without a kick."""
        queue, _ = self.queues[index]
        while True:
            queue.disable_notification()
            self.device.process_queue(index, queue)
            queue.enable_notification()
            if not queue.has_pending():
                break
        if queue.needs_interrupt():
            self._interrupt(index)
