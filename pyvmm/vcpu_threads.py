"""The vCPU threads: each runs KVM_RUN in a loop and routes its exits to the buses.

One thread per vCPU (the GIL is released inside the ioctl). Port I/O goes to the port-I/O bus,
MMIO to the MMIO bus, writes the kernel coalesced are replayed first; a read nothing answers
returns all ones, as a floating bus does. A thread parks between exits when the VM is suspended
and ends when it is stopped; a signal (KICK_SIGNAL) plus the vCPU's immediate_exit flag bring
it out of KVM_RUN at once. Every wait on the threads is bounded: a thread that does not park or
stop in time is named, and one that never stops is abandoned (a daemon thread, whose vCPU is
never closed under it). Nothing here is specific to an architecture.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.bus import Bus
from pyvmm.kvm import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    Vcpu,
)
from pyvmm.kvm.coalesced import CoalescedRing

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
# KVM_SYSTEM_EVENT_* types
SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# What a read from an address no device claims returns (a floating bus).
_ALL_ONES = b"\xff" * 8


@dataclass(frozen=True)
class VmExit:
    """Why the VM stopped and the exit status `pyvmm run` returns."""

    code: int
    reason: str


def _no_ring() -> tuple[int, int]:
    return 0, 0


class VcpuThreads:
    """The threads that run `vcpus`; an exit that ends the VM is passed to `on_exit`."""

    def __init__(
        self,
        vcpus: list[Vcpu],
        io_bus: Bus,
        mmio_bus: Bus,
        coalesced: CoalescedRing | None,
        on_exit: Callable[[VmExit], None],
        describe: Callable[[Vcpu], str] | None = None,
    ) -> None:
        """`describe` gives a line of a vCPU's state for the log of a triple fault."""
        self.vcpus = vcpus
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self._ring = coalesced
        self._on_exit = on_exit
        self._describe = describe
        self._threads: list[threading.Thread] = []
        self._state = threading.Condition()
        self._stopping = threading.Event()
        self._pause_requested = False
        self._parked: set[threading.Thread] = set()
        self.abandoned: set[int] = set()
        """Ids of the vCPUs whose threads never stopped: do not close them."""

    def _log_state(self, vcpu: Vcpu) -> None:
        if self._describe is None:
            return
        try:
            log.warning("vCPU %d: %s", vcpu.id, self._describe(vcpu))
        except OSError as e:
            log.warning("vCPU %d: its state cannot be read: %s", vcpu.id, e)

    def start(self) -> None:
        """Start one thread per vCPU. Call from the main thread: it installs the handler of the
        kick signal (which only has to interrupt KVM_RUN)."""
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        for vcpu in self.vcpus:
            t = threading.Thread(target=self.run_vcpu, args=(vcpu,), name=f"vcpu{vcpu.id}")
            t.daemon = True  # one that never stops must not keep the process alive
            self._threads.append(t)
            t.start()

    def pause(self, timeout: float) -> list[str]:
        """Park every vCPU outside KVM_RUN; the names of those not parked within `timeout`
        seconds (they park when they can, until `resume`)."""
        with self._state:
            self._pause_requested = True
        self._kick()
        with self._state:
            self._state.wait_for(lambda: not self._unparked() or self._stopping.is_set(), timeout)
            return [f"vCPU {vcpu.id}" for vcpu in self._unparked()]

    def resume(self) -> None:
        with self._state:
            self._pause_requested = False
            self._state.notify_all()

    def request_stop(self) -> None:
        """Ask every thread to end at its next exit (or now, if parked); returns at once."""
        self._stopping.set()
        with self._state:
            self._state.notify_all()

    def stop(self, timeout: float) -> None:
        """End every thread, within `timeout` seconds; one that does not end is reported and
        abandoned."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            self._kick()
            for t in self._threads:
                t.join(0.05)
        for vcpu, t in zip(self.vcpus, self._threads, strict=False):
            if t.is_alive():
                log.warning("vCPU %d did not stop within %g s; abandoned", vcpu.id, timeout)
                self.abandoned.add(vcpu.id)
        self._threads.clear()

    def _unparked(self) -> list[Vcpu]:
        """The vCPUs whose threads run and are not parked (call with _state held)."""
        return [
            vcpu
            for vcpu, t in zip(self.vcpus, self._threads, strict=False)
            if t.is_alive() and t not in self._parked
        ]

    def _park(self) -> None:
        me = threading.current_thread()
        with self._state:
            self._parked.add(me)
            self._state.notify_all()
            self._state.wait_for(lambda: not self._pause_requested or self._stopping.is_set())
            self._parked.discard(me)

    def _kick(self) -> None:
        """Bring every vCPU out of KVM_RUN (now, or as soon as it next enters)."""
        for vcpu in self.vcpus:
            vcpu.request_exit()
        for t in self._threads:
            if t.is_alive() and t.ident is not None:
                signal.pthread_kill(t.ident, KICK_SIGNAL)

    def run_vcpu(self, vcpu: Vcpu) -> None:
        """One vCPU's loop, until the VM stops (the body of its thread)."""
        try:
            self._loop(vcpu)
        except Exception as e:
            log.debug("vCPU %d failed", vcpu.id, exc_info=True)
            self._on_exit(VmExit(1, f"vCPU {vcpu.id}: {e}"))

    def _loop(self, vcpu: Vcpu) -> None:
        io_bus, mmio_bus, ring, on_exit = self.io_bus, self.mmio_bus, self._ring, self._on_exit
        ring_indexes = ring.indexes if ring is not None else _no_ring
        stopping = self._stopping
        while not stopping.is_set():
            if self._pause_requested:
                self._park()
                continue
            ex = vcpu.run()
            first, last = ring_indexes()
            if first != last:
                assert ring is not None
                ring.drain(io_bus.write, mmio_bus.write)
            if type(ex) is IoExit:
                if ex.count == 1:
                    if ex.is_write:
                        io_bus.write(ex.port, ex.data)
                    elif not io_bus.read(ex.port, ex.data):
                        ex.data[:] = _ALL_ONES[: ex.size]
                    continue
                size = ex.size
                for i in range(ex.count):  # rep ins/outs: one access per element
                    chunk = ex.data[i * size : (i + 1) * size]
                    if ex.is_write:
                        io_bus.write(ex.port, chunk)
                    elif not io_bus.read(ex.port, chunk):
                        chunk[:] = _ALL_ONES[:size]
            elif isinstance(ex, MmioExit):
                if ex.is_write:
                    mmio_bus.write(ex.addr, ex.data)
                elif not mmio_bus.read(ex.addr, ex.data):
                    ex.data[:] = b"\xff" * len(ex.data)
            elif isinstance(ex, InterruptedExit):
                continue
            elif isinstance(ex, ShutdownExit):
                # A reset all the same (as on hardware), but not one the guest asked for: said.
                log.warning("vCPU %d: triple fault: the guest resets", vcpu.id)
                self._log_state(vcpu)
                on_exit(VmExit(0, "guest reset (triple fault)"))
            elif isinstance(ex, SystemEventExit):
                # arm64's PSCI SYSTEM_OFF and SYSTEM_RESET end the VM here, as a reset does.
                if ex.type == SYSTEM_EVENT_CRASH:
                    on_exit(VmExit(1, f"vCPU {vcpu.id}: guest crashed"))
                elif ex.type == SYSTEM_EVENT_RESET:
                    on_exit(VmExit(0, "guest reset"))
                else:
                    on_exit(VmExit(0, "guest shut down"))
            elif isinstance(ex, HltExit):
                on_exit(VmExit(1, f"vCPU {vcpu.id}: halted outside the irqchip"))
            elif isinstance(ex, FailEntryExit):
                self._log_state(vcpu)
                on_exit(VmExit(1, f"vCPU {vcpu.id}: KVM entry failed (reason {ex.reason:#x})"))
            elif isinstance(ex, InternalErrorExit):
                self._log_state(vcpu)
                on_exit(VmExit(1, f"vCPU {vcpu.id}: KVM internal error (suberror {ex.suberror})"))
            elif isinstance(ex, UnknownExit):
                on_exit(
                    VmExit(
                        1,
                        f"vCPU {vcpu.id}: unhandled exit {ex.exit_reason} "
                        f"(hardware reason {ex.hardware_exit_reason:#x})",
                    )
                )
