"""The host's end of the Linux guest's vsock checks (guest/linux/init), run where the VMM runs
once the guest says it is ready:

    python -m pyvmm.harness.vsockpeer data (--uds PATH | --cid N) PORT MIB
    python -m pyvmm.harness.vsockpeer reset (--uds PATH | --cid N) PORT --control SOCKET
    python -m pyvmm.harness.vsockpeer conns (--uds PATH | --cid N) PORT --count N

It reaches the guest the two ways pyvmm offers. With pyvmm's own device (`--vsock-uds PATH`) a
host program connects to PATH and says `CONNECT <port>`, and the guest's streams to host port P
come to a Unix listener at `PATH_P`; with the host kernel's vhost-vsock (`--cid N` alone) host
programs use AF_VSOCK sockets to the guest's CID, and listen on a vsock port.

`data` (check_vsock): sends MIB MiB of random data to the guest's PORT, ends the stream and
reads the guest's answer (its byte count, CRC-32 and seconds); then takes the guest's stream on
PORT + 1 to its end, and answers the same way. `reset` (check_vsockreset): opens a stream to the
guest's PORT + 2 and takes one from it on PORT + 3, a line each way on both; suspends and resumes
the VM through its control socket; records how the two streams ended as the host sees them; then
opens and takes one more each way. It prints one JSON object (with "error" when something
failed); every wait is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import socket
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyvmm.control.client import send_command
from pyvmm.control.protocol import ControlError
from pyvmm.harness.boots import command_report

MiB = 1 << 20
CHUNK = MiB
DEFAULT_TIMEOUT_S = 120.0
CONNECT_RETRY_S = 0.1  # the guest may not listen yet
MAX_LINE = 256
HOLD_LINE = b"pyvmm vsock hold\n"  # what the guest's `vsock hold` sends (guest/linux/vsock.c)
HELD_LINE = b"pyvmm vsock held\n"  # ... and then, once our echo of it has come back
SUSPENDED_S = 1.0  # how long the VM stays suspended
QUIET_S = 3.0  # how long old streams are watched for their end before they are written to
# The guest's readiness lines (guest/linux/init) and the mode each one starts.
DATA_READY = "GUEST vsock ready"
RESET_READY = "GUEST vsockreset ready"
CONNS_READY = "GUEST vsockconn ready"
CONNS_PORT = 4  # check_vsockconn's port, past PORT
# check_vsock's ok line: the guest's CID, what it received and sent, and its tool's CPU time.
GUEST_VSOCK = re.compile(
    r"cid (?P<cid>\d+); rx (?P<rx_bytes>\d+) bytes crc32 (?P<rx_crc>[0-9a-f]{8}) in "
    r"(?P<rx_s>[\d.]+) s \(cpu (?P<rx_cpu>user [\d.]+ s, sys [\d.]+ s)\); tx (?P<tx_bytes>\d+) "
    r"bytes crc32 (?P<tx_crc>[0-9a-f]{8}) in (?P<tx_s>[\d.]+) s "
    r"\(cpu (?P<tx_cpu>user [\d.]+ s, sys [\d.]+ s)\)"
)


class PeerError(Exception):
    """The exchange with the guest did not complete; the message says where."""


@dataclass(frozen=True)
class Guest:
    """How host programs reach the guest: `uds` (pyvmm's device) or `cid` (vhost-vsock)."""

    uds: str | None = None
    cid: int | None = None

    def connect(self, port: int, deadline: float) -> socket.socket:
        """A stream to the guest's `port`, tried again until it listens or the deadline."""
        why = "no attempt"
        while (left := deadline - time.monotonic()) > 0:
            try:
                sock = self._connect_once(port, left)
            except OSError as e:
                why = e.strerror or str(e)
            else:
                if sock is not None:
                    sock.settimeout(None)
                    return sock
                why = "the device closed the connection without OK (nobody listens there?)"
            time.sleep(CONNECT_RETRY_S)
        raise PeerError(f"cannot connect to the guest's port {port}: {why}")

    def _connect_once(self, port: int, timeout: float) -> socket.socket | None:
        if self.uds is None:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((self.cid, port))
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.uds)
            sock.sendall(f"CONNECT {port}\n".encode())
            line = read_line(sock)
        except BaseException:
            sock.close()
            raise
        if not line.startswith(b"OK "):
            sock.close()
            return None
        return sock

    def listen(self, port: int) -> socket.socket:
        """A listener for the guest's streams to host port `port`."""
        if self.uds is None:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            address: Any = (socket.VMADDR_CID_ANY, port)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = self.listener_path(port)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
        try:
            sock.bind(address)
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        return sock

    def listener_path(self, port: int) -> str:
        return f"{self.uds}_{port}"

    def argv(self) -> list[str]:
        return ["--uds", self.uds] if self.uds is not None else ["--cid", str(self.cid)]


@contextlib.contextmanager
def listening(guest: Guest, port: int) -> Iterator[socket.socket]:
    sock = guest.listen(port)
    try:
        yield sock
    finally:
        sock.close()
        if guest.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guest.listener_path(port))


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def accept(listener: socket.socket, deadline: float, port: int) -> socket.socket:
    listener.settimeout(_left(deadline))
    try:
        sock, _ = listener.accept()
    except TimeoutError:
        raise PeerError(f"the guest did not connect to host port {port} in time") from None
    sock.settimeout(None)
    return sock


def read_line(sock: socket.socket) -> bytes:
    """One line, read a byte at a time so that nothing after it is taken; b"" at the end."""
    line = bytearray()
    while len(line) < MAX_LINE and not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def read_to_end(sock: socket.socket, deadline: float) -> bytes:
    """What comes until the peer ends the stream (a short answer)."""
    data = bytearray()
    while True:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(MAX_LINE)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_LINE:
            raise PeerError(f"the guest's answer is longer than {MAX_LINE} bytes: {data!r}")


def _answer(data: bytes) -> dict[str, Any]:
    """The guest's `vsock recv` answer, "BYTES CRC32 SECONDS\\n"."""
    words = data.decode(errors="replace").split()
    if len(words) != 3:
        raise PeerError(f"the guest answered {data!r}, not 'BYTES CRC32 SECONDS'")
    return {"bytes": int(words[0]), "crc32": words[1], "seconds": float(words[2])}


def send(guest: Guest, port: int, mib: int, deadline: float) -> dict[str, Any]:
    """`mib` MiB of random data to the guest's `port`; the guest answers what it received."""
    data = os.urandom(mib * MiB)  # made and summed before the clock starts
    crc = zlib.crc32(data)
    view = memoryview(data)
    with guest.connect(port, deadline) as sock:
        start = time.monotonic()
        try:
            for offset in range(0, len(data), CHUNK):
                sock.settimeout(_left(deadline))
                sock.sendall(view[offset : offset + CHUNK])
            sock.shutdown(socket.SHUT_WR)
            answer = read_to_end(sock, deadline)
        except OSError as e:
            raise PeerError(f"sending to the guest's port {port}: {e}") from None
        seconds = time.monotonic() - start
    return {"bytes": len(data), "crc32": f"{crc:08x}", "seconds": seconds, "guest": _answer(answer)}


def receive(guest: Guest, listener: socket.socket, port: int, deadline: float) -> dict[str, Any]:
    """The guest's stream to host `port`, taken to its end and answered."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = crc = 0
    with accept(listener, deadline, port) as sock:
        start = time.monotonic()
        try:
            while True:
                sock.settimeout(_left(deadline))
                n = sock.recv_into(buf)
                if n == 0:
                    break
                crc = zlib.crc32(view[:n], crc)
                total += n
            seconds = time.monotonic() - start
            sock.settimeout(_left(deadline))
            sock.sendall(f"{total} {crc:08x} {seconds:.3f}\n".encode())
        except OSError as e:
            raise PeerError(f"receiving on host port {port} after {total} bytes: {e}") from None
    return {"bytes": total, "crc32": f"{crc:08x}", "seconds": seconds}


def exchange_data(guest: Guest, port: int, mib: int, deadline: float) -> dict[str, Any]:
    with listening(guest, port + 1) as listener:
        sent = send(guest, port, mib, deadline)
        received = receive(guest, listener, port + 1, deadline)
    return {"sent": sent, "received": received}


def hold_line(sock: socket.socket, opened_by_host: bool, deadline: float) -> None:
    """The line `vsock hold` exchanges: the side that opened the stream sends, the other
    echoes it. On a stream the guest opened, the guest then says it has the echo: until then
    the echo may still be on its way through the device, and a transport reset would drop it."""
    sock.settimeout(_left(deadline))
    try:
        if opened_by_host:
            sock.sendall(HOLD_LINE)
            line = read_line(sock)
            if line != HOLD_LINE:
                raise PeerError(f"sent {HOLD_LINE!r} to the guest, {line!r} came back")
        else:
            line = read_line(sock)
            if line != HOLD_LINE:
                raise PeerError(f"the guest sent {line!r}, not {HOLD_LINE!r}")
            sock.sendall(line)
            line = read_line(sock)
            if line != HELD_LINE:
                raise PeerError(f"the guest sent {line!r}, not {HELD_LINE!r}")
    except OSError as e:
        raise PeerError(f"the line exchange with the guest: {e}") from None


def how_they_ended(streams: dict[str, socket.socket]) -> dict[str, str]:
    """How old streams ended, as the host sees them: "closed" (the device closed them within
    QUIET_S), "closed when written to" or "reset when written to" (the guest's answer to data
    on a stream it no longer has), "data" or "open" (they did not end)."""
    how: dict[str, str] = {}
    deadline = time.monotonic() + QUIET_S
    waiting = dict(streams)
    while waiting and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(waiting.values()), [], [], left)
        for name in [n for n, sock in waiting.items() if sock in ready]:
            how[name] = _ending(waiting.pop(name), "")
    for name, sock in waiting.items():
        try:
            sock.send(b"x")
        except (ConnectionResetError, BrokenPipeError):
            how[name] = "reset when written to"
            continue
        sock.settimeout(QUIET_S)
        how[name] = _ending(sock, " when written to")
    return {name: how[name] for name in streams}


def _ending(sock: socket.socket, suffix: str) -> str:
    try:
        return ("closed" if not sock.recv(1) else "data") + suffix
    except ConnectionResetError:
        return "reset" + suffix
    except TimeoutError:
        return "open"


def control(socket_path: str, command: str) -> float:
    """Send `command` to the VM's control socket; the seconds it took."""
    start = time.monotonic()
    try:
        reply = send_command(socket_path, {"cmd": command})
    except ControlError as e:
        raise PeerError(f"{command}: {e}") from None
    if not reply.get("ok"):
        raise PeerError(f"{command}: the VM answered {reply}")
    return time.monotonic() - start


def exchange_reset(guest: Guest, port: int, control_socket: str, deadline: float) -> dict[str, Any]:
    """Streams each way, a suspend and resume, how they ended, and new streams each way."""
    report: dict[str, Any] = {}
    with listening(guest, port + 3) as listener:
        with (
            guest.connect(port + 2, deadline) as accepted,
            accept(listener, deadline, port + 3) as connected,
        ):
            hold_line(accepted, True, deadline)
            hold_line(connected, False, deadline)
            report["suspend_s"] = control(control_socket, "suspend")
            time.sleep(SUSPENDED_S)
            report["resume_s"] = control(control_socket, "resume")
            report["old"] = how_they_ended({"accepted": accepted, "connected": connected})
        with guest.connect(port + 2, deadline) as accepted:
            hold_line(accepted, True, deadline)
        with accept(listener, deadline, port + 3) as connected:
            hold_line(connected, False, deadline)
        report["again"] = True
    return report


def exchange_conns(guest: Guest, port: int, count: int, deadline: float) -> dict[str, Any]:
    """`count` streams opened to the guest's `port` in turn, each to the guest's close."""
    start = time.monotonic()
    for i in range(count):
        with guest.connect(port, deadline) as sock:
            try:
                if read_to_end(sock, deadline):
                    raise PeerError(f"connection {i + 1}: the guest sent data before closing")
            except OSError as e:
                raise PeerError(f"connection {i + 1} to the guest's port {port}: {e}") from None
    return {"connections": count, "seconds": time.monotonic() - start}


# ---- what the tests use ----


def kernel_params(
    checks: list[str], cid: int, port: int, mib: int, wait_s: int, conns: int = 100
) -> str:
    """The guest's command line for `checks` (vsock, vsockreset, vsockconn)."""
    return (
        f"pyvmm.check={','.join(checks)} pyvmm.vsock_cid={cid} pyvmm.vsock_port={port} "
        f"pyvmm.vsock_mib={mib} pyvmm.vsock_wait={wait_s} pyvmm.vsock_conns={conns}"
    )


def peer_argv(
    mode: str, guest: Guest, port: int, timeout_s: float, *extra: str, python: str = sys.executable
) -> list[str]:
    """This program for BootSpec.on_line: `data` with extra [MIB], `reset` with extra
    ["--control", SOCKET], `conns` with extra ["--count", N]; `python` runs it where the boots
    run (LinuxHarness.python)."""
    return [
        *[python, "-m", "pyvmm.harness.vsockpeer", mode, *guest.argv(), str(port)],
        *[*extra, "--timeout", f"{timeout_s:g}"],
    ]


def peer_report(commands: list[Any], marker: str) -> dict[str, Any]:
    """The JSON report of the peer that `marker` started (a boot's CommandResults): {} when it
    never ran or did not finish, {"error": ...} when it failed or said something else."""
    return command_report(commands, marker, "vsockpeer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.harness.vsockpeer")
    parser.add_argument("mode", choices=["data", "reset", "conns"])
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--uds", metavar="PATH", help="pyvmm's device: its --vsock-uds PATH")
    way.add_argument("--cid", type=int, metavar="N", help="vhost-vsock: the guest's CID")
    parser.add_argument("port", type=int, help="the guest's first port (see the checks)")
    parser.add_argument("mib", type=int, nargs="?", default=0, help="data: MiB each way")
    parser.add_argument("--control", metavar="SOCKET", help="reset: the VM's control socket")
    parser.add_argument("--count", type=int, default=100, help="conns: how many streams")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.mode == "reset" and args.control is None:
        parser.error("reset needs --control SOCKET")
    guest = Guest(args.uds, args.cid)
    deadline = time.monotonic() + args.timeout
    report: dict[str, Any] = {"mode": args.mode}
    try:
        if args.mode == "data":
            report.update(exchange_data(guest, args.port, args.mib, deadline))
        elif args.mode == "conns":
            port = args.port + CONNS_PORT
            report.update(exchange_conns(guest, port, args.count, deadline))
        else:
            report.update(exchange_reset(guest, args.port, args.control, deadline))
    except (PeerError, OSError) as e:
        report["error"] = str(e)
    print(json.dumps(report), flush=True)
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
