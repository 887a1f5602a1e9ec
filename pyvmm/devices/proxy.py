"""The VMM's side of a device process: a PCI function on the bus whose every register and
configuration access is forwarded to the process that runs the device (`child.py`).

`start_device` has the device zygote (`spawner.py`) start the process; `ProxyDevice` stands in
the PCI slot at once, its BARs placed by the VMM beforehand, and the device is waited for only
when it is first needed (or by `wait_ready`), so that processes starting do not hold up the
guest. Each access is one request and one answer over the socketpair (`wire.py`), serialised
by a lock; on the way the process may ask for what only the VMM can do (a GSI, an irqfd, an
MSI route, an ioeventfd), which `VmServices` carries out.

A process that dies, or does not answer within `REPLY_TIMEOUT_S`, is reported once, with its
device's name and the cause, and killed; from then on the function reads as absent hardware
(all ones) and ignores writes, while the VM and the other devices go on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.devices.child import DeviceSpec
from pyvmm.devices.pci.device import BarWindows, PciDevice, VmServices
from pyvmm.devices.spawner import DeviceProcess, DeviceSpawner, SpawnError
from pyvmm.devices.wire import (
    BAR_OFFSET,
    BAR_OFFSET_LENGTH,
    F64,
    IOEVENTFD,
    MSI_ROUTE,
    OFFSET_LENGTH,
    U8,
    U32,
    Channel,
    Op,
    WireError,
    close_fds,
    pack_addresses,
    unpack,
    unpack_windows,
)
from pyvmm.sandbox.seccomp import watch_denials

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 5.0  # a register access the device process has not answered by then failed
# A bound on a device process's start (0.1 s on a KVM host). Eleven of them starting at once
# inside the test VM, beside another test VM on the same two cores, took over 60 s (each a fresh
# interpreter then, not yet forked from the zygote).
START_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 5.0


class DeviceProcessError(Exception):
    """A device process could not start, or refused a request; one line."""


class ProxyDevice(PciDevice):
    """A PCI function served by a device process."""

    def __init__(
        self,
        name: str,
        process: DeviceProcess,
        channel: Channel,
        services: VmServices,
        policy: str = "",
    ) -> None:
        self.name = name
        self.policy = policy  # the seccomp policy file, for messages
        self.process = process
        self._channel = channel
        self._services = services
        self._lock = threading.Lock()
        self._dead = False
        self._ready = False
        self._start_error: DeviceProcessError | None = None
        self._closing = False
        self._kept: list[int] = []  # the irqfds' eventfds, as registered with KVM
        self._ioeventfds: dict[int, int] = {}  # the process's fd number -> our copy
        self._watcher = threading.Thread(target=self._watch, name=f"watch {name}", daemon=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._dead

    def wait_ready(self) -> None:
        """Wait until the process has built its device; a DeviceProcessError (one line) if it
        could not."""
        with self._lock:
            self._become_ready()
        if self._start_error is not None:
            raise self._start_error

    # The start-up: the process asks for its GSIs and irqfds while it builds the device, then
    # sends one REPLY. Called with the lock held, by whoever needs the device first.
    def _become_ready(self) -> None:
        if self._ready or self._dead:
            return
        try:
            _, fds = self._answer(START_TIMEOUT_S, keep_fds=True)
        except DeviceProcessError as exc:  # it said why
            why = str(exc)
            if not why.startswith(f"virtio {self.name}:"):
                why = f"virtio {self.name}: {why}"
            if ": jail: " in why:
                why += "; --disable-sandbox runs devices unjailed (README: Device processes)"
            self._not_started(why)
            return
        except WireError as exc:
            cause = self._cause(exc)
            self._not_started(f"virtio {self.name}: the device process did not start: {cause}")
            return
        self._ready = True
        # A seccomp listener it sends along (--seccomp-log-failures) is served from now on.
        for fd in fds:
            watch_denials(fd, f"virtio {self.name}", self.policy)
        self._watcher.start()

    def _not_started(self, why: str) -> None:
        self._dead = True
        self._kill()
        self._start_error = DeviceProcessError(why)

    def _call(self, op: Op, payload: bytes = b"") -> bytes | None:
        """Send one request and return its answer; None once the process is gone."""
        with self._lock:
            self._become_ready()
            if self._dead:
                return None
            try:
                self._channel.send(op, payload)
                return self._answer(REPLY_TIMEOUT_S)[0]
            except WireError as exc:
                self._fail(exc)
                return None

    def _answer(self, timeout: float, keep_fds: bool = False) -> tuple[bytes, list[int]]:
        """The answer to the request just sent, and the fds it carried (closed unless
        `keep_fds`); the process's own requests of the VM are served meanwhile."""
        while True:
            op, payload, fds = self._channel.recv(timeout)
            if op is Op.REPLY:
                if not keep_fds:
                    close_fds(fds)
                    fds = []
                return payload, fds
            if op is Op.FAILED:
                close_fds(fds)
                raise DeviceProcessError(payload.decode(errors="replace"))
            self._serve(op, payload, fds)

    def _serve(self, op: Op, payload: bytes, fds: list[int]) -> None:
        services = self._services
        if op is Op.ALLOCATE_GSI:
            close_fds(fds)
            self._channel.send(Op.REPLY, U32.pack(services.allocate_gsi()))
        elif op is Op.REGISTER_IRQFD and len(fds) == 1:
            (gsi,) = unpack(U32, payload, op)
            services.register_irqfd(fds[0], gsi)
            self._kept.append(fds[0])
        elif op is Op.SET_MSI_ROUTE:
            close_fds(fds)
            gsi, address, data = unpack(MSI_ROUTE, payload, op)
            services.set_msi_route(gsi, address, data)
        elif op is Op.REGISTER_IOEVENTFD and len(fds) == 1:
            key, address, length = unpack(IOEVENTFD, payload, op)
            fd = self._ioeventfds.setdefault(key, fds[0])
            if fd != fds[0]:
                os.close(fds[0])  # the same eventfd again (a BAR moved back)
            services.register_ioeventfd(fd, address, length)
        elif op is Op.UNREGISTER_IOEVENTFD:
            close_fds(fds)
            key, address, length = unpack(IOEVENTFD, payload, op)
            if key not in self._ioeventfds:
                raise WireError(f"UNREGISTER_IOEVENTFD of an unknown eventfd {key}")
            services.unregister_ioeventfd(self._ioeventfds[key], address, length)
        else:
            close_fds(fds)
            raise WireError(f"{op.name} ({len(fds)} fds) is not a request of the VM")

    # PciDevice
    def allocate_bars(self, allocate_mmio: Callable[[int, str], int]) -> None:
        """Nothing to do: the VMM placed the BARs before the process started (`DeviceSpec`)."""

    def config_read(self, offset: int, data: memoryview) -> None:
        answer = self._call(Op.CONFIG_READ, OFFSET_LENGTH.pack(offset, len(data)))
        data[:] = answer if answer is not None and len(answer) == len(data) else _ones(data)

    def config_write(self, offset: int, data: bytes | memoryview) -> BarWindows | None:
        answer = self._call(Op.CONFIG_WRITE, U32.pack(offset) + bytes(data))
        return unpack_windows(answer) if answer is not None else None

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        answer = self._call(Op.BAR_READ, BAR_OFFSET_LENGTH.pack(bar, offset, len(data)))
        data[:] = answer if answer is not None and len(answer) == len(data) else _ones(data)

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        self._call(Op.BAR_WRITE, BAR_OFFSET.pack(bar, offset) + bytes(data))

    def bars_changed(self, mapped: dict[int, int]) -> None:
        self._call(Op.BARS_CHANGED, pack_addresses(mapped))

    # What the VMM does to every virtio device
    def pause(self, timeout: float) -> bool:
        answer = self._call(Op.PAUSE, F64.pack(timeout))
        # A gone process moves nothing: it counts as parked.
        return answer is None or (len(answer) == 1 and U8.unpack(answer)[0] == 1)

    def resume(self) -> None:
        self._call(Op.RESUME)

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request for the device itself (VirtioDevice.command), answered by the process."""
        answer = self._call(Op.COMMAND, json.dumps(request).encode())
        if answer is None:
            raise DeviceProcessError(f"virtio {self.name}: the device process is gone")
        reply: dict[str, Any] = json.loads(answer)
        return reply

    def close(self) -> None:
        """Shut the process down (bounded), kill it if it does not go, and release its fds."""
        self._closing = True
        if not self._ready:
            self._kill()  # it has served nothing: no state to wind down
        elif not self._dead:
            with self._lock:
                try:
                    self._channel.send(Op.SHUTDOWN)
                    self._answer(SHUTDOWN_TIMEOUT_S)
                except (WireError, DeviceProcessError):
                    pass
        try:
            self.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()
        self._dead = True
        self._channel.close()
        close_fds([*self._kept, *self._ioeventfds.values()])
        self._kept, self._ioeventfds = [], {}

    # Faults
    def _watch(self) -> None:
        self.process.wait()
        if not self._closing:
            with self._lock:
                self._fail(WireError("the process ended"))

    def _fail(self, exc: Exception) -> None:
        """Called with the lock held: report the process's end once, and make sure of it."""
        if self._dead:
            return
        self._dead = True
        self._kill()
        log.error(
            "virtio %s: device process %d failed: %s; the device is gone, the VM goes on",
            self.name,
            self.process.pid,
            self._cause(exc),
        )

    def _cause(self, exc: Exception) -> str:
        code = self.process.poll()
        if self.process.error is not None:
            return self.process.error
        if code is None:
            return str(exc)
        if code < 0:
            return _signal_cause(-code)
        return f"exited with status {code}"

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("virtio %s: device process %d did not die", self.name, self.process.pid)


def _signal_cause(number: int) -> str:
    name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
    if number == signal.SIGSYS:
        return f"killed by {name} (a system call its seccomp policy does not allow)"
    if number == signal.SIGKILL:
        return f"killed by {name} (out of memory, or killed from outside)"
    return f"killed by {name}"


def _ones(data: memoryview) -> bytes:
    return b"\xff" * len(data)


def spawn_device(spec: DeviceSpec, services: VmServices) -> ProxyDevice:
    """Start the device process `spec` describes (a zygote of its own) and wait until its
    device is built."""
    spawner = DeviceSpawner()
    try:
        device = start_device(spec, services, spawner)
    finally:
        spawner.close()
    device.wait_ready()
    return device


def start_device(spec: DeviceSpec, services: VmServices, spawner: DeviceSpawner) -> ProxyDevice:
    """Have `spawner` start the device process `spec` describes; `wait_ready()` on the result
    before use (so that several processes can start at once). The fds `spec` names are handed
    over: the caller may close its copies at once."""
    ours, theirs = Channel.pair()
    spec.sock = theirs.fileno()
    spec.parent_pid = os.getpid()
    try:
        process = spawner.spawn(spec)
    except SpawnError as exc:
        ours.close()
        raise DeviceProcessError(
            f"virtio {spec.name}: cannot start a device process: {exc}"
        ) from None
    finally:
        theirs.close()
    policy = "" if spec.policy_dir is None else f"{spec.policy_dir}/{spec.kind}.policy"
    return ProxyDevice(spec.name, process, ours, services, policy)
