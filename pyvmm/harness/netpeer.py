"""The host's end of the Linux guest's `net` check (guest/linux/init), run where the VMM runs
once the guest says it listens (`python -m pyvmm.harness.netpeer GUEST_IP PORT MIB`).

It sends MIB MiB of random data to the guest's PORT and closes; then it takes what the guest
sends from PORT + 1 (the same bytes, echoed back) until the guest closes. It prints one JSON
object: for each direction the bytes, their sha256 and the seconds they took (from the connection
to the last byte acknowledged or received: the data is made and hashed outside that time, which
under the test VM's emulation would be a large part of it), and the frames the host's interface
to the guest (the TAP) counted meanwhile, so the test can tell segmentation offloads at work (a
frame larger than the MTU). Every wait is bounded by --timeout.

With --min-tso-segs it first sets net.ipv4.tcp_min_tso_segs, a setting of the whole network
namespace, so it refuses unless it runs in a namespace other than init's (BootSpec.netns).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import ipaddress
import json
import os
import socket
import struct
import sys
import termios
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 1 << 20
CHUNK = MiB
DEFAULT_TIMEOUT_S = 120.0
ACKED_POLL_S = 0.01
CONNECT_RETRY_S = 0.1  # the guest starts listening after it said so, or after the first phase
ROUTES = Path("/proc/net/route")
MIN_TSO_SEGS = Path("/proc/sys/net/ipv4/tcp_min_tso_segs")
OWN_NETNS, INIT_NETNS = Path("/proc/self/ns/net"), Path("/proc/1/ns/net")
# Per network namespace, unlike /sys/class/net (which shows the namespace that mounted /sys).
DEVICES = Path("/proc/net/dev")


class PeerError(Exception):
    """The exchange with the guest did not complete; the message says where."""


@dataclass
class Phase:
    """One direction of the exchange, as the host saw it."""

    bytes: int
    sha256: str
    seconds: float
    frames: int  # what the host's interface counted, in this phase's direction
    frame_bytes: int


def route_interface(address: str, routes: Path = ROUTES) -> str:
    """The interface the host routes `address` through (the most specific route)."""
    target = int(ipaddress.IPv4Address(address))
    best: tuple[int, str] | None = None
    for line in routes.read_text().splitlines()[1:]:
        fields = line.split()
        # Iface, Destination, Gateway, Flags, RefCnt, Use, Metric, Mask: little-endian hex.
        dest = int.from_bytes(bytes.fromhex(fields[1]), "little")
        mask = int.from_bytes(bytes.fromhex(fields[7]), "little")
        if target & mask == dest and (best is None or mask > best[0]):
            best = (mask, fields[0])
    if best is None:
        raise PeerError(f"no route to {address}")
    return best[1]


@dataclass(frozen=True)
class Counters:
    """An interface's frame counters, as /proc/net/dev shows them."""

    rx_frames: int
    rx_bytes: int
    tx_frames: int
    tx_bytes: int


def counters(interface: str, devices: Path = DEVICES) -> Counters:
    """`interface`'s counters now (a TAP counts each frame once, however many segments)."""
    for line in devices.read_text().splitlines()[2:]:
        name, _, values = line.partition(":")
        if name.strip() == interface:
            # Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
            v = [int(x) for x in values.split()]
            return Counters(v[1], v[0], v[9], v[8])
    raise PeerError(f"no interface {interface} in {devices}")


def _connect(address: str, port: int, deadline: float) -> socket.socket:
    """A connection to the guest, retried until it listens or the deadline passes."""
    why = "no attempt"
    while (left := deadline - time.monotonic()) > 0:
        try:
            return socket.create_connection((address, port), timeout=left)
        except OSError as e:
            why = e.strerror or str(e)
        time.sleep(CONNECT_RETRY_S)
    raise PeerError(f"cannot connect to {address}:{port}: {why}")


def _wait_acked(s: socket.socket, deadline: float, peer: str) -> None:
    """Until the peer has acknowledged every byte sent (SIOCOUTQ, TIOCOUTQ's number, counts
    those not yet acknowledged): then the data has arrived, and the time is the transfer's."""
    while True:
        left = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise PeerError(f"{peer} had not acknowledged the last {left} bytes in time")
        time.sleep(ACKED_POLL_S)


def send(address: str, port: int, mib: int, deadline: float, interface: str) -> Phase:
    """Send `mib` MiB of random data, then close."""
    data = os.urandom(mib * CHUNK)
    digest = hashlib.sha256(data).hexdigest()
    view = memoryview(data)
    before = counters(interface)
    with _connect(address, port, deadline) as s:
        start = time.monotonic()
        for offset in range(0, len(data), CHUNK):
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                s.sendall(view[offset : offset + CHUNK])
            except OSError as e:
                raise PeerError(f"sending to {address}:{port}: {e}") from None
        _wait_acked(s, deadline, f"{address}:{port}")
    seconds = time.monotonic() - start
    after = counters(interface)
    return Phase(
        len(data),
        digest,
        seconds,
        after.tx_frames - before.tx_frames,
        after.tx_bytes - before.tx_bytes,
    )


def receive(address: str, port: int, deadline: float, interface: str) -> Phase:
    """Take what the guest sends until it closes. (Closing our side first would end the
    guest's busybox nc, which exits when its peer closes.)"""
    received = bytearray()
    buf = bytearray(CHUNK)
    before = counters(interface)
    with _connect(address, port, deadline) as s:
        start = time.monotonic()
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                n = s.recv_into(buf)
            except OSError as e:
                why = f"receiving from {address}:{port} after {len(received)} bytes: {e}"
                raise PeerError(why) from None
            if n == 0:
                break
            received += memoryview(buf)[:n]
    seconds = time.monotonic() - start
    after = counters(interface)
    return Phase(
        len(received),
        hashlib.sha256(received).hexdigest(),
        seconds,
        after.rx_frames - before.rx_frames,
        after.rx_bytes - before.rx_bytes,
    )


def set_min_tso_segs(segments: int) -> None:
    """Have TCP in this network namespace build TSO segments of at least `segments` MSS."""
    try:
        own = OWN_NETNS.stat().st_ino != INIT_NETNS.stat().st_ino
    except OSError as e:
        raise PeerError(f"--min-tso-segs: cannot tell whose network namespace this is: {e}") from e
    if not own:
        raise PeerError(
            "--min-tso-segs would change the host's own TCP setting: run netpeer in a network "
            "namespace of its own"
        )
    MIN_TSO_SEGS.write_text(f"{segments}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.harness.netpeer")
    parser.add_argument("guest", help="the guest's IPv4 address")
    parser.add_argument("port", type=int, help="the guest receives on PORT, sends on PORT + 1")
    parser.add_argument("mib", type=int, help="MiB to send")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS")
    parser.add_argument(
        "--min-tso-segs", type=int, metavar="N", help="set net.ipv4.tcp_min_tso_segs to N first"
    )
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    report: dict[str, object] = {}
    try:
        if args.min_tso_segs is not None:
            set_min_tso_segs(args.min_tso_segs)
        interface = route_interface(args.guest)
        report["interface"] = interface
        report["sent"] = asdict(send(args.guest, args.port, args.mib, deadline, interface))
        report["received"] = asdict(receive(args.guest, args.port + 1, deadline, interface))
    except (PeerError, OSError) as e:
        report["error"] = str(e)
    print(json.dumps(report), flush=True)
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
