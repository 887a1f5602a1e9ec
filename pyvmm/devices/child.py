"""A device process: one virtio PCI function, served to the VMM over a socketpair.

The VMM's zygote (`zygote.py`, a fresh interpreter, never a fork of the VMM's threaded self)
forks it, handing over by fd the socket, the guest memfd, the INTx line's eventfds and the
device's backing file; its `DeviceSpec` says which fd is which. The process builds the device
exactly as the VMM would in-process, then jails itself and installs its seccomp filter, and
only then serves the VMM's requests (`wire.py`) until told to shut down or until the VMM goes
away. The virtqueues' work runs in the device's worker thread here, on the eventfds and guest
memory this process holds: the VMM sees only register traffic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.virtio.balloon import Balloon
from pyvmm.devices.virtio.block import Block
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.net import Net
from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.devices.virtio.rng import Rng
from pyvmm.devices.virtio.vhost_net import VhostNet
from pyvmm.devices.virtio.vhost_vsock import VhostVsock
from pyvmm.devices.virtio.vsock import Vsock
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
    pack_windows,
    unpack,
    unpack_addresses,
)
from pyvmm.disk.raw import RawDisk
from pyvmm.memory import GuestMemory
from pyvmm.net.tap import Tap
from pyvmm.sandbox.jail import (
    JailError,
    JailSpec,
    die_with_parent,
    enter_jail,
    held_fds,
    name_process,
)
from pyvmm.sandbox.seccomp import load_filter
from pyvmm.vhost import Vhost
from pyvmm.vsock.dialer import DialRequests

log = logging.getLogger("pyvmm.device")


@dataclass
class DiskSpec:
    fd: int
    path: str
    writable: bool
    serial: str


@dataclass
class TapSpec:
    fd: int
    name: str
    created: bool  # pyvmm made it (it goes away with the last fd)
    mac: str | None  # the guest's MAC as 12 hex digits; None: the driver picks one
    vhost_fd: int | None = None  # /dev/vhost-net, when the kernel runs the queues


@dataclass
class VsockSpec:
    cid: int
    listener: int | None = None  # where host programs connect (pyvmm's own device)
    dialer: int | None = None  # the device's end of the VMM's dialer (pyvmm.vsock.dialer)
    vhost_fd: int | None = None  # /dev/vhost-vsock with the CID claimed (the kernel's device)


@dataclass
class BalloonSpec:
    page_reporting: bool


@dataclass
class DeviceSpec:
    """What a device process is to be: the VMM writes it, the process reads it from argv."""

    name: str  # "vda", "net0", "rng": also what its log lines and errors say
    kind: str  # "block_device", "net_device", ... "rng_device": also its policy's name
    parent_pid: int
    sock: int
    memfd: int
    ram: list[tuple[int, int]]  # guest RAM as (guest address, size), in memfd order
    intx: tuple[int, int, int]  # gsi, irqfd, resample eventfd
    # Where the VMM placed each BAR: (index, guest address, size); the device must agree.
    bars: list[tuple[int, int, int]] = field(default_factory=list)
    disk: DiskSpec | None = None
    tap: TapSpec | None = None
    vsock: VsockSpec | None = None
    balloon: BalloonSpec | None = None
    policy_dir: str | None = None  # where <kind>.policy is; None: no seccomp filter
    log_failures: bool = False
    jail: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def fds(self) -> list[int]:
        """The fds this spec names, each once: what the process must be handed."""
        named = [self.sock, self.memfd, *self.intx[1:]]
        if self.disk is not None:
            named.append(self.disk.fd)
        if self.tap is not None:
            named += [self.tap.fd, *([] if self.tap.vhost_fd is None else [self.tap.vhost_fd])]
        if self.vsock is not None:
            vsock = self.vsock
            named += [fd for fd in (vsock.listener, vsock.dialer, vsock.vhost_fd) if fd is not None]
        return list(dict.fromkeys(named))

    def renumbered(self, numbers: dict[int, int]) -> DeviceSpec:
        """This spec with each fd it names replaced by `numbers[fd]` (where a process was
        handed them under other numbers)."""

        def new(fd: int | None) -> int | None:
            return None if fd is None else numbers[fd]

        spec = dataclasses.replace(self, sock=numbers[self.sock], memfd=numbers[self.memfd])
        gsi, irqfd, resample = self.intx
        spec.intx = (gsi, numbers[irqfd], numbers[resample])
        if self.disk is not None:
            spec.disk = dataclasses.replace(self.disk, fd=numbers[self.disk.fd])
        if self.tap is not None:
            tap = self.tap
            spec.tap = dataclasses.replace(tap, fd=numbers[tap.fd], vhost_fd=new(tap.vhost_fd))
        if self.vsock is not None:
            vsock = self.vsock
            spec.vsock = dataclasses.replace(
                vsock,
                listener=new(vsock.listener),
                dialer=new(vsock.dialer),
                vhost_fd=new(vsock.vhost_fd),
            )
        return spec

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        data = json.loads(text)
        disk = data.pop("disk")
        tap = data.pop("tap")
        vsock = data.pop("vsock")
        balloon = data.pop("balloon")
        spec = cls(**data)
        spec.ram = [(int(a), int(s)) for a, s in spec.ram]
        spec.intx = (int(spec.intx[0]), int(spec.intx[1]), int(spec.intx[2]))
        spec.bars = [(int(i), int(a), int(s)) for i, a, s in spec.bars]
        spec.disk = DiskSpec(**disk) if disk is not None else None
        spec.tap = TapSpec(**tap) if tap is not None else None
        spec.vsock = VsockSpec(**vsock) if vsock is not None else None
        spec.balloon = BalloonSpec(**balloon) if balloon is not None else None
        return spec


class ChildLink:
    """What the device asks of the VM from in here: each request goes to the VMM, which is
    waiting on this socket for the answer to its own request (or for the process to be ready)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def allocate_gsi(self) -> int:
        self._channel.send(Op.ALLOCATE_GSI)
        op, payload, fds = self._channel.recv()
        close_fds(fds)
        if op is not Op.REPLY:
            raise WireError(f"ALLOCATE_GSI answered with {op.name}")
        return unpack(U32, payload, op)[0]

    def register_irqfd(self, fd: int, gsi: int) -> None:
        self._channel.send(Op.REGISTER_IRQFD, U32.pack(gsi), (fd,))

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self._channel.send(Op.SET_MSI_ROUTE, MSI_ROUTE.pack(gsi, address, data))

    def register_ioeventfd(self, fd: int, address: int, length: int) -> None:
        self._channel.send(Op.REGISTER_IOEVENTFD, IOEVENTFD.pack(fd, address, length), (fd,))

    def unregister_ioeventfd(self, fd: int, address: int, length: int) -> None:
        self._channel.send(Op.UNREGISTER_IOEVENTFD, IOEVENTFD.pack(fd, address, length))


def _backend(spec: DeviceSpec) -> VirtioDevice:
    if spec.kind == "block_device":
        if spec.disk is None:
            raise ValueError("a block device needs a disk")
        disk = RawDisk.from_fd(spec.disk.fd, spec.disk.path, spec.disk.writable)
        return Block(disk, name=spec.name, serial=spec.disk.serial)
    if spec.kind in ("net_device", "vhost_net_device"):
        if spec.tap is None:
            raise ValueError("a net device needs a TAP")
        tap = Tap(spec.tap.fd, spec.tap.name, spec.tap.created)
        mac = bytes.fromhex(spec.tap.mac) if spec.tap.mac else None
        if spec.kind == "net_device":
            return Net(tap, spec.name, mac)
        if spec.tap.vhost_fd is None:
            raise ValueError("a vhost-net device needs /dev/vhost-net")
        return VhostNet(tap, Vhost(spec.tap.vhost_fd), spec.name, mac)
    if spec.kind == "vsock_device":
        if spec.vsock is None or spec.vsock.listener is None or spec.vsock.dialer is None:
            raise ValueError("a vsock device needs its host sockets")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, spec.vsock.listener)
        dialer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, spec.vsock.dialer)
        return Vsock(spec.vsock.cid, listener, DialRequests(dialer), spec.name)
    if spec.kind == "vhost_vsock_device":
        if spec.vsock is None or spec.vsock.vhost_fd is None:
            raise ValueError("a vhost-vsock device needs /dev/vhost-vsock")
        return VhostVsock(spec.vsock.cid, Vhost(spec.vsock.vhost_fd, "vhost-vsock"), spec.name)
    if spec.kind == "balloon_device":
        if spec.balloon is None:
            raise ValueError("a balloon device needs its settings")
        return Balloon(spec.balloon.page_reporting)
    if spec.kind == "rng_device":
        return Rng()
    raise ValueError(f"unknown device kind {spec.kind!r}")


class DeviceServer:
    """The device and the loop that answers the VMM."""

    def __init__(self, spec: DeviceSpec, channel: Channel) -> None:
        self.channel = channel
        self.mem = GuestMemory(spec.ram, memfd=spec.memfd)
        link = ChildLink(self.channel)
        gsi, irqfd, resample_fd = spec.intx
        self.device = VirtioPciDevice(
            _backend(spec),
            self.mem,
            LevelIrq.from_fds(gsi, irqfd, resample_fd),
            link,
        )
        sizes = {i: size for i, size in enumerate(self.device.config.bar_sizes) if size}
        if sizes != {index: size for index, _, size in spec.bars}:
            raise ValueError(f"the VMM placed BARs {spec.bars}; the device has {sizes}")
        for index, address, _ in spec.bars:
            self.device.config.set_bar_address(index, address)

    def serve(self, listener: int | None = None) -> None:
        """Answer requests until SHUTDOWN or until the VMM closes its end. `listener`, the
        seccomp filter's (with --seccomp-log-failures), goes to the VMM with the first answer."""
        # Built: the VMM's start-up wait ends here.
        self.channel.send(Op.REPLY, b"", () if listener is None else (listener,))
        if listener is not None:
            os.close(listener)
        while True:
            try:
                op, payload, fds = self.channel.recv()
            except WireError:
                return  # the VMM is gone
            close_fds(fds)
            kind = Op.REPLY
            try:
                answer = self.handle(op, payload)
            except Exception as exc:  # the VMM reports it; this process goes on serving
                kind, answer = Op.FAILED, _one_line(exc).encode(errors="replace")
            try:
                self.channel.send(kind, answer)
            except WireError:
                return  # the VMM is gone (it ended while this request was answered)
            if op is Op.SHUTDOWN:
                return

    def handle(self, op: Op, payload: bytes) -> bytes:
        device = self.device
        if op is Op.BAR_READ:
            bar, offset, length = unpack(BAR_OFFSET_LENGTH, payload, op)
            data = bytearray(length)
            device.bar_read(bar, offset, memoryview(data))
            return bytes(data)
        if op is Op.BAR_WRITE:
            bar, offset = unpack(BAR_OFFSET, payload, op)
            device.bar_write(bar, offset, payload[BAR_OFFSET.size :])
            return b""
        if op is Op.CONFIG_READ:
            offset, length = unpack(OFFSET_LENGTH, payload, op)
            data = bytearray(length)
            device.config_read(offset, memoryview(data))
            return bytes(data)
        if op is Op.CONFIG_WRITE:
            (offset,) = unpack(U32, payload, op)
            return pack_windows(device.config_write(offset, payload[U32.size :]))
        if op is Op.BARS_CHANGED:
            device.bars_changed(unpack_addresses(payload))
            return b""
        if op is Op.PAUSE:
            (timeout,) = unpack(F64, payload, op)
            return U8.pack(device.pause(timeout))
        if op is Op.RESUME:
            device.resume()
            return b""
        if op is Op.SHUTDOWN:
            device.close()
            return b""
        if op is Op.COMMAND:
            request = json.loads(payload)
            if not isinstance(request, dict):
                raise WireError("COMMAND: not a JSON object")
            return json.dumps(device.command(request)).encode()
        raise WireError(f"{op.name} is not a request")

    def close(self) -> None:
        self.device.close()
        self.mem.close()
        self.channel.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _frame_line(code: CodeType, line: int | None) -> str:
    return f"  {code.co_filename}:{line} in {code.co_name}"


def _frames(exc: BaseException) -> list[str]:
    """An exception's frames, and its cause, without their source lines: Python's own printer
    opens each frame's .py file for them, a call the device's seccomp policy kills the process
    for, halfway through the report."""
    lines = []
    tb = exc.__traceback__
    while tb is not None:
        lines.append(_frame_line(tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        lines.append(f"  after {type(cause).__name__}: {_one_line(cause)}")
    return lines


class _JailedFormatter(logging.Formatter):
    """Log lines whose exceptions are printed by `_frames` (log.exception in the worker)."""

    def formatException(self, ei: Any) -> str:
        _, exc, _ = ei
        if exc is None:
            return ""
        return "\n".join([f"{type(exc).__name__}: {_one_line(exc)}", *_frames(exc)])


def _report_exception(name: str, where: str, exc: BaseException | None) -> None:
    """An exception's type, message and frames on stderr (`_frames`)."""
    if exc is None:
        return
    lines = [f"pyvmm: virtio {name}: {where}: {type(exc).__name__}: {_one_line(exc)}"]
    sys.stderr.write("\n".join([*lines, *_frames(exc)]) + "\n")
    sys.stderr.flush()


def _report_uncaught(name: str) -> None:
    """From here on an exception nothing catches, in any thread, or one raised where it cannot
    propagate (a finalizer), is reported as above."""
    sys.excepthook = lambda kind, exc, tb: _report_exception(name, "uncaught", exc)
    threading.excepthook = lambda args: _report_exception(
        name, f"thread {args.thread.name if args.thread else '?'}", args.exc_value
    )
    sys.unraisablehook = lambda unraisable: _report_exception(
        name, f"unraisable ({unraisable.err_msg or 'in a finalizer'})", unraisable.exc_value
    )


# Python's audit events for what opens a file (the seccomp policies allow no open or openat).
REFUSED_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})


class JailedOpenError(PermissionError):
    """Python code in a jailed device process tried to open a file."""


def _refuse_files(name: str) -> None:
    """Make Python's file opens (open(), os.open, a module's source read for its first import,
    a directory listed) raise JailedOpenError, reported with where it came from, instead of
    reaching the seccomp filter, which kills the whole process for them without a word of why.
    A module imported for the first time is reported too: one that is a shared library is
    opened by the dynamic loader, which Python does not see."""

    def report(what: str) -> None:
        frames = [f"pyvmm: virtio {name}: {what}"]
        frame: FrameType | None = sys._getframe(2)
        while frame is not None:
            frames.append(_frame_line(frame.f_code, frame.f_lineno))
            frame = frame.f_back
        sys.stderr.write("\n".join(frames) + "\n")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "import":
            report(f"imports {args[0]} in the jail")
        elif event in REFUSED_EVENTS:
            what = f"the jail refuses {event} {args[0]!r}"
            report(what)
            raise JailedOpenError(what)

    sys.addaudithook(hook)


# The host user a device process runs as when the VMM is root: nobody.
NOBODY = (65534, 65534)


def _jail(spec: DeviceSpec, new_fds: int) -> None:
    """Enter the jail (pyvmm.sandbox.jail), keeping every fd this process holds by now: the
    spawner passed it only the device's, and building the device made the rest; `new_fds` is
    the room the device needs for more."""
    run_as = NOBODY if os.geteuid() == 0 else None
    name = f"virtio {spec.name}"
    jail = JailSpec(name, spec.parent_pid, held_fds(), run_as=run_as, threads=True)
    enter_jail(dataclasses.replace(jail, new_fds=new_fds))


def run(spec: DeviceSpec) -> int:
    """Be the device process `spec` describes, holding the fds it names; its exit status."""
    try:
        die_with_parent(f"virtio {spec.name}", spec.parent_pid)
        name_process(f"virtio {spec.name}", f"pyvmm-{spec.name}")
    except JailError:
        return 1  # the VMM is gone already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the VMM decides when this process ends
    handler = logging.StreamHandler()
    handler.setFormatter(_JailedFormatter("pyvmm: %(message)s"))
    logging.basicConfig(handlers=[handler], level=logging.WARNING)
    channel = Channel(socket.socket(fileno=spec.sock))
    try:
        server = DeviceServer(spec, channel)
        seccomp_filter = None
        if spec.policy_dir is not None:
            # Compiled before the jail: libseccomp is loaded and the policy read from the
            # host's files while there are any.
            seccomp_filter = load_filter(Path(spec.policy_dir), spec.kind, spec.log_failures)
        # Installing a filter with a listener makes an fd, which the jail leaves no number for:
        # this one holds a number for it until then.
        placeholder = os.dup(2) if spec.log_failures and seccomp_filter is not None else None
        if spec.jail:
            _jail(spec, server.device.device.new_fds)
        listener = None
        if seccomp_filter is not None:
            if placeholder is not None:
                os.close(placeholder)
            seccomp_filter.install()
            listener = seccomp_filter.listener() if spec.log_failures else None
    except Exception as exc:  # the VMM reports it, as the reason this process did not start
        channel.send(Op.FAILED, _one_line(exc).encode(errors="replace"))
        return 1
    _report_uncaught(spec.name)
    if seccomp_filter is not None:
        _refuse_files(spec.name)
    try:
        server.serve(listener)
    except Exception as exc:
        _report_exception(spec.name, "serving", exc)
        return 1
    finally:
        server.close()
    return 0
