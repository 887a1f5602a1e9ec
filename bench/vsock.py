"""vsock benchmark: stream throughput guest to host and host to guest, connections per second,
and the VMM's host CPU per MB, with the probe's `vsockbench` on pyvmm's own virtio-vsock device
(`--cid 3 --vsock-uds PATH`), jailed in its process and as a thread. pyvmm only: QEMU has no
userspace vsock device (its vhost-vsock hands the rings to the host kernel).

The host side is what any host program does with pyvmm's socket: a listener at `PATH_<port>`
for the guest's connections, and clients of `PATH` that say `CONNECT <port>` and read `OK <host
port>` before the stream begins.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import PYVMM, THREADS, Row, interleave
from bench.native import ArgvFor, ProbeCase, probe_cases, run_vmm, tree_cpu_s
from bench.vmms import PROBE, pyvmm_argv, pyvmm_threads_argv

CID = 3
GUEST_PORT = 1234  # the probe's probe.vsock.port: where it listens (rx, conn)
HOST_PORT = 5678  # the probe's probe.vsock.host_port: a listener at PATH_5678 (tx)
CASES = ("tx", "rx", "conn")  # one boot runs all three, in this order
MAX_BYTES = 64 << 20  # per stream case: the probe's most (probe.vsock.bytes)
MAX_COUNT = 1_000_000  # the probe's most connections (probe.vsock.count)
# ~8,000 packets of 4 KiB each way and 500 connections: each case lasts about a second here,
# the group (10 boots at --runs 5) 40 s (77 s with other VMs busy on the machine).
DEFAULT_BYTES = 32 << 20
DEFAULT_COUNT = 500
NO_QEMU = "vsock: pyvmm only (QEMU has no userspace vsock device, only vhost-vsock)"
PATTERN_PERIOD = 251  # the stream's byte at offset i is i % 251 (the probe's pattern)
READ_SIZE = 1 << 20
IO_TIMEOUT_S = 60.0
ACCEPT_POLL_S = 0.1
MB = 1e6  # MB/s as dd and the net rows: 10^6 bytes


def pattern(length: int) -> bytes:
    """The first `length` bytes of the stream both sides send."""
    period = bytes(range(PATTERN_PERIOD))
    return (period * (length // PATTERN_PERIOD + 1))[:length]


def pattern_ok(data: memoryview, offset: int) -> bool:
    """Whether the first and last of `data`, received at stream offset `offset`, are the
    pattern's (the probe's own cheap check)."""
    end = offset + len(data) - 1
    return data[0] == offset % PATTERN_PERIOD and data[-1] == end % PATTERN_PERIOD


def probe_params(nbytes: int, count: int) -> list[str]:
    """The probe's command line for one boot running every case of CASES."""
    return [
        "probe=" + ",".join("vsockbench" for _ in CASES),
        "probe.vsock.dir=" + ",".join(CASES),
        f"probe.vsock.bytes={nbytes}",
        f"probe.vsock.count={count}",
    ]


def vsock_flags(uds: Path) -> list[str]:
    return ["--cid", str(CID), "--vsock-uds", str(uds)]


def connect(uds: Path, port: int, first: bytes = b"") -> tuple[socket.socket, bytes]:
    """A host program's stream to the guest's `port` through pyvmm's socket, `first` sent with
    the CONNECT line (it waits in the socket until the guest accepts): the socket, and what
    came after the `OK <host port>` line in the same reads."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT_S)
    try:
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode() + first)
        got = b""
        while b"\n" not in got:
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError(f"vsock: pyvmm closed the stream to port {port}: {got!r}")
            got += chunk
    except BaseException:
        sock.close()
        raise
    line, _, rest = got.partition(b"\n")
    if not line.startswith(b"OK "):
        sock.close()
        raise ConnectionError(f"vsock: {line!r} for CONNECT {port}")
    return sock, rest


@dataclass
class Host:
    """The host side of one boot: the listener the guest's tx stream connects to (read to its
    end, counted, sampled against the pattern), and, when the guest says it listens, the
    client that sends its rx stream or makes its connections one after another. Each is timed
    on the host's clock (`seconds`, and `timed` of the amount in that time):

    - tx: from the first bytes read to the end of the stream (the guest's shutdown, passed on
      once the device has forwarded everything), so less the first read's bytes;
    - rx: from the first send, after `OK`, to the end of the stream (the guest's close, once
      it has read everything);
    - conn: from the first connection to the end of the last."""

    uds: Path
    nbytes: int
    count: int
    received: int = 0  # tx: bytes the listener read
    echoed: int = 0  # conn: connections that got their byte back
    seconds: dict[str, float] = field(default_factory=dict)
    timed: dict[str, int] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    _data: bytes = b""
    _listener: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._data = pattern(self.nbytes)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{self.uds}_{HOST_PORT}")
        listener.listen(4)
        listener.settimeout(ACCEPT_POLL_S)
        self._listener = listener
        self._spawn(self._serve_tx)

    def stop(self) -> None:
        """End the host side's threads (each within its socket timeout) and the listener."""
        self._stop.set()
        for thread in self._threads:
            thread.join(IO_TIMEOUT_S)
        if self._listener is not None:
            self._listener.close()

    def close(self) -> None:
        """stop(), then raise the first error of the host side, if any."""
        self.stop()
        if self.errors:
            raise RuntimeError(f"vsock: host side failed: {self.errors[0]!r}") from self.errors[0]

    def on_line(self, text: str) -> None:
        """A line of the guest's serial output: `PROBE vsockbench start rx|conn <n>` starts
        the client."""
        words = text.split()
        if words[:3] == ["PROBE", "vsockbench", "start"]:
            if words[3] == "rx":
                self._spawn(self._send_rx)
            elif words[3] == "conn":
                self._spawn(self._connections)

    def _spawn(self, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as e:  # handed to close()
                self.errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve_tx(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                if self._stop.is_set():
                    return
        with conn:
            conn.settimeout(IO_TIMEOUT_S)
            buf = memoryview(bytearray(READ_SIZE))
            first, start = 0, 0.0
            while n := conn.recv_into(buf):
                if not first:
                    first, start = n, time.perf_counter()
                if not pattern_ok(buf[:n], self.received):
                    raise RuntimeError(f"vsock: tx: {n} bytes at {self.received} not the pattern")
                self.received += n
            self.seconds["tx"] = time.perf_counter() - start
            self.timed["tx"] = self.received - first

    def _send_rx(self) -> None:
        sock, rest = connect(self.uds, GUEST_PORT)
        with sock:
            if rest:
                raise RuntimeError(f"vsock: rx: the guest sent {rest!r}")
            start = time.perf_counter()
            sock.sendall(self._data)
            sock.shutdown(socket.SHUT_WR)
            if sock.recv(1):
                raise RuntimeError("vsock: rx: the guest sent data")
            self.seconds["rx"] = time.perf_counter() - start
            self.timed["rx"] = self.nbytes

    def _connections(self) -> None:
        start = time.perf_counter()
        for n in range(self.count):
            if self._stop.is_set():
                return
            sock, got = connect(self.uds, GUEST_PORT, b"x")
            with sock:
                while chunk := sock.recv(16):  # to the end: the guest closes after its echo
                    got += chunk
            if got != b"x":
                raise RuntimeError(f"vsock: connection {n}: {got!r} came back, not b'x'")
            self.echoed += 1
        self.seconds["conn"] = time.perf_counter() - start
        self.timed["conn"] = self.count


Case = ProbeCase


def cases(lines: list[tuple[float, float, str]]) -> list[Case]:
    """Each `PROBE vsockbench start` line paired with the `ok` line after it."""
    return probe_cases("vsockbench", lines)


def rates(found: list[Case], seconds: dict[str, float], timed: dict[str, int]) -> dict[str, float]:
    """Per case: its rate on the host's clock (MB/s, or connections per second: `timed` of its
    amount in `seconds`, see Host) and the VMM's CPU per unit moved (ms per MB, or per
    connection). The guest's `ok` line must say it moved the whole amount: `ok tx|rx <bytes>
    bytes ...`, `ok conn <n> connections ...`."""
    out: dict[str, float] = {}
    for case in found:
        words = case.details
        if words[:2] != [case.direction, str(case.amount)] or seconds.get(case.direction, 0) <= 0:
            raise RuntimeError(f"vsock: {case.direction} {case.amount}: ok {' '.join(words)}")
        rate = timed[case.direction] / seconds[case.direction]
        if case.direction == "conn":
            out["conn_rate"] = rate
            out["conn_cpu"] = case.cpu_s * 1e3 / case.amount
        else:
            out[f"{case.direction}_rate"] = rate / MB
            out[f"{case.direction}_cpu"] = case.cpu_s * 1e3 / (case.amount / MB)
    return out


def measure(argv_for: ArgvFor, nbytes: int, count: int) -> dict[str, float]:
    """One boot running every case of CASES."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-vsock-") as d:
        uds = Path(d) / "v.sock"  # short: PATH_<port> must fit a Unix socket address
        host = Host(uds, nbytes, count)
        host.start()
        argv = argv_for(PROBE, probe_params(nbytes, count), extra=vsock_flags(uds))
        try:
            run = run_vmm(argv, on_line=host.on_line, cpu=tree_cpu_s)
        except BaseException:
            host.stop()  # the VMM's failure is the one to tell
            raise
        host.close()
    found = cases(run.lines)
    if [c.direction for c in found] != list(CASES):
        raise RuntimeError(f"vsock: the probe ran {found}, not {CASES}")
    if host.received != nbytes or host.echoed != count:
        raise RuntimeError(
            f"vsock: the host read {host.received} of {nbytes} bytes, "
            f"{host.echoed} of {count} connections echoed"
        )
    return rates(found, host.seconds, host.timed)


def vsock(runs: int, nbytes: int, count: int) -> list[Row]:
    """Every case of CASES in one boot per mode and run, interleaved."""

    def make(argv_for: ArgvFor) -> Callable[[], dict[str, float]]:
        return lambda: measure(argv_for, nbytes, count)

    results = interleave(runs, {PYVMM: make(pyvmm_argv), THREADS: make(pyvmm_threads_argv)})
    rows = [
        Row("vsock", "stream guest to host", "MB/s", True),
        Row("vsock", "stream host to guest", "MB/s", True),
        Row("vsock", "connections per second", "conn/s", True),
        Row("vsock", "VMM CPU, guest to host", "ms/MB", False),
        Row("vsock", "VMM CPU, host to guest", "ms/MB", False),
        Row("vsock", "VMM CPU per connection", "ms", False),
    ]
    keys = ["tx_rate", "rx_rate", "conn_rate", "tx_cpu", "rx_cpu", "conn_cpu"]
    for row, key in zip(rows, keys, strict=True):
        for vmm, values in results.items():
            row.record(vmm, values[key])
    return rows
