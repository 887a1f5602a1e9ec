"""virtio-vsock end to end: the probe guest's own driver (guest/lib/virtio_vsock.c) against host
programs on pyvmm's Unix sockets, with the device jailed in its process and as a thread.

Host programs connect to `--vsock-uds PATH` and say `CONNECT <port>`; the guest's connections to
host port P reach a listener at `PATH_P`. The host listener here speaks the probe's protocol
(guest/tests/vsock.c): it reads the guest's PRNG stream to the end, checks it, and answers as
many bytes of the host's stream.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Run, needs_kvm, save_serial_log, wait_until

pytestmark = needs_kvm

BOTH_MODES = pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="process"),
        pytest.param(["--disable-sandbox"], id="thread"),
    ],
)
MiB = 1 << 20
CID = 3
GUEST_PORT = 1234  # the probe's probe.vsock.port
HOST_PORT = 5678  # the probe's probe.vsock.host_port
# The probe's PRNG streams (lib/virtio_vsock.h): what the guest sends, what the host answers.
SEED_GUEST = 0x70726F6265207673
SEED_HOST = 0x686F737420726570
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
U64 = (1 << 64) - 1
IO_TIMEOUT = 30.0


def prng(seed: int, length: int) -> bytes:
    """The first `length` bytes of the probe's splitmix64 stream from `seed`."""
    words = array.array("Q")
    state = seed
    for _ in range((length + 7) // 8):
        state = (state + GOLDEN_GAMMA) & U64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
        words.append(z ^ (z >> 31))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()[:length]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: `PATH_<port>` must fit a Unix socket address."""
    with tempfile.TemporaryDirectory(prefix="vsock-") as d:
        yield Path(d)


class ProbeVm:
    """pyvmm running the probe with a vsock device, in the background; output to files."""

    def __init__(self, probe_elf: Path, directory: Path, tests: str, *flags: str) -> None:
        self.uds = directory / "v.sock"
        self._out = directory / "stdout"
        self._err = directory / "stderr"
        cmd = [sys.executable, "-m", "pyvmm", "run", *flags, "--cid", str(CID)]
        cmd += ["--vsock-uds", str(self.uds), "-p", f"probe={tests}", str(probe_elf)]
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        wait_until(lambda: self.uds.exists() or self.proc.poll() is not None, 30, "no PATH")
        assert self.proc.poll() is None, self._err.read_text()

    def finish(self, timeout: float = 60) -> Run:
        """Wait for the VM to end; its output (the serial log is kept as for run_pyvmm)."""
        try:
            self.proc.wait(timeout)
        finally:
            self.proc.kill()
            self.proc.wait()
        run = Run(self.proc.returncode, self._out.read_text(), self._err.read_text())
        save_serial_log(os.environ.get("PYTEST_CURRENT_TEST", "vsock").split(" ")[0], run.stdout)
        return run

    def result(self, test: str, timeout: float = 60) -> tuple[str, Run]:
        """The probe's details for `test`, which must have passed, and the run; the VM must have
        ended well and left no socket file behind."""
        run = self.finish(timeout)
        assert run.returncode == 0, f"pyvmm exited {run.returncode}: {run.stderr}"
        status, details = run.probe_results().get(test, ("missing", run.stdout))
        assert status == "ok", f"PROBE {test} {status} {details}\nstderr:\n{run.stderr}"
        assert not self.uds.exists(), "the vsock socket file outlived the VM"
        return details, run

    def abandon(self) -> str:
        """The host side failed: stop the VM now (the guest would wait out its timeouts); what
        pyvmm said."""
        self.proc.kill()
        return self.finish().stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def connect(uds: Path, port: int) -> tuple[socket.socket, int]:
    """A host program's stream to the guest's `port`: the socket and the host port it got."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.connect(str(uds))
    sock.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):  # byte by byte: what follows the line is the guest's
        byte = sock.recv(1)
        assert byte, f"closed after {line!r}, before OK"
        line += byte
    m = re.fullmatch(rb"OK (\d+)\n", line)
    assert m, line
    return sock, int(m.group(1))


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def echo(uds: Path, data: bytes) -> tuple[bytes, float]:
    """Send `data` to the guest's echo port while reading what comes back, until the guest
    closes: what came, and the seconds it took."""
    sock, _ = connect(uds, GUEST_PORT)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    start = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    try:
        back = read_all(sock)
    finally:
        sender.join(IO_TIMEOUT)
        sock.close()
    assert not errors, errors
    return back, time.monotonic() - start


@dataclass
class Listener:
    """The host listener at `PATH_<port>`: each stream read to its end (slowly: `delay`
    seconds before the first read and between reads of `read_size` bytes), checked, answered."""

    path: Path
    delay: float = 0.0
    read_size: int = 1 << 16
    received: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        chunks = []
        try:
            if self.delay:
                time.sleep(self.delay)
            while chunk := conn.recv(self.read_size):
                chunks.append(chunk)
                if self.delay:
                    time.sleep(self.delay)
            data = b"".join(chunks)
            self.received.append(len(data))
            expected = prng(SEED_GUEST, len(data))
            if data == expected:
                if data:  # (a stream the guest reset has no reader left)
                    conn.sendall(prng(SEED_HOST, len(data)))
            else:
                at = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
                self.errors.append(f"{len(data)} bytes, differing at {at}")
                conn.sendall(f"MISMATCH at {at}\n".encode())
        except OSError as e:
            self.errors.append(f"{e!r} after {sum(map(len, chunks))} bytes")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(IO_TIMEOUT)
        self.sock.close()


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[Listener]:
    server = Listener(Path(f"{short_tmp / 'v.sock'}_{HOST_PORT}"))
    yield server
    server.close()


def _field(details: str, name: str) -> int:
    m = re.search(rf"\b{name} (\d+)", details)
    assert m, f"no '{name}' in {details!r}"
    return int(m.group(1))


@BOTH_MODES
def test_the_guest_echoes_4_mib_and_garbage_lines_are_refused(
    probe_elf: Path, short_tmp: Path, mode: list[str]
) -> None:
    vm = ProbeVm(probe_elf, short_tmp, "vsock-echo", *mode)
    data = os.urandom(4 * MiB)
    try:
        # Garbage first lines: each program's socket is closed, and the VM goes on.
        for garbage in (b"HELLO 1234\n", b"CONNECT twelve\n", b"C" * 100):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
                bad.settimeout(IO_TIMEOUT)
                bad.connect(str(vm.uds))
                bad.sendall(garbage)
                with contextlib.suppress(ConnectionResetError):  # (the rest of it unread)
                    assert bad.recv(100) == b"", garbage
        back, seconds = echo(vm.uds, data)
    except (OSError, AssertionError) as e:
        pytest.fail(f"{e!r}; pyvmm said:\n{vm.abandon()}")
    try:
        assert len(back) == len(data) and back == data
        details, _ = vm.result("vsock-echo")
    finally:
        vm.kill()
    assert details.startswith(f"cid {CID} port {GUEST_PORT} echoed {len(data)} bytes")
    print(f"vsock echo {mode or 'process'}: 4 MiB each way in {seconds:.2f} s, "
          f"{len(data) / seconds / 1e6:.1f} MB/s each way; guest: {details}")  # fmt: skip


@BOTH_MODES
def test_16_host_programs_at_once_each_get_their_own_data_back(
    probe_elf: Path, short_tmp: Path, mode: list[str]
) -> None:
    vm = ProbeVm(probe_elf, short_tmp, "vsock-many", *mode)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            data = os.urandom(256 * 1024 + n)
            back, _ = echo(vm.uds, data)
            results[n] = back == data
        except (OSError, AssertionError) as e:
            errors.append(e)

    try:
        clients = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        if errors:
            pytest.fail(f"{errors}; pyvmm said:\n{vm.abandon()}")
        details, _ = vm.result("vsock-many")
    finally:
        vm.kill()
    assert results == dict.fromkeys(range(16), True)
    assert details.startswith(f"16 streams {16 * 256 * 1024 + sum(range(16))} bytes")


@BOTH_MODES
def test_the_guest_connects_to_a_host_listener(
    probe_elf: Path, short_tmp: Path, listener: Listener, mode: list[str]
) -> None:
    vm = ProbeVm(probe_elf, short_tmp, "vsock-connect", *mode)
    try:
        details, _ = vm.result("vsock-connect")
    finally:
        vm.kill()
    assert listener.received == [MiB] and not listener.errors, listener.errors
    assert details.startswith(f"sent {MiB} received {MiB} peer buf_alloc {128 * 1024} ")


@BOTH_MODES
def test_a_slow_host_reader_stops_the_guest_by_credit_and_loses_nothing(
    probe_elf: Path, short_tmp: Path, listener: Listener, mode: list[str]
) -> None:
    listener.delay, listener.read_size = 0.003, 16 * 1024
    vm = ProbeVm(probe_elf, short_tmp, "vsock-slow-reader", *mode)
    try:
        details, _ = vm.result("vsock-slow-reader")
    finally:
        vm.kill()
    assert listener.received == [MiB] and not listener.errors, listener.errors
    assert _field(details, "waits") > 0 and _field(details, "updates") > 0, details
    print(f"vsock slow reader {mode or 'process'}: {details}")


@BOTH_MODES
def test_a_hostile_guest_leaves_the_device_working(
    probe_elf: Path, short_tmp: Path, listener: Listener, mode: list[str]
) -> None:
    vm = ProbeVm(probe_elf, short_tmp, "vsock-hostile", *mode)
    try:
        details, run = vm.result("vsock-hostile")
    finally:
        vm.kill()
    assert details.startswith("flood 1000/1000 rst rw 8/8 rst"), details
    # The two live streams were reset with nothing sent; the last one carried 64 KiB.
    assert sorted(listener.received) == [0, 0, 64 * 1024] and not listener.errors
    # The device's complaints are rate-limited: a few lines, not one per bad packet.
    assert len(run.stderr.splitlines()) < 50, run.stderr
