"""Network benchmark: UDP packets per second through virtio-net on a host TAP, guest to host and
host to guest, at 64- and 1,400-byte payloads, and the VMM's host CPU seconds per million
packets, with the probe's `netbench` under pyvmm (processes and threads) and QEMU
(`-netdev tap,vhost=off`, userspace virtio-net).

Every VM runs in a network namespace made for it (`ip netns add`, deleted after), under `ip netns
exec`; the host's sockets are opened, and its netlink requests made, on threads that have entered
it (pyvmm.harness.netns). Nothing touches the host's own network.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.measure import PYVMM, QEMU, THREADS, Row, interleave
from bench.native import ArgvFor, ProbeCase, probe_cases, run_vmm, tree_cpu_s
from bench.vmms import PROBE, pyvmm_argv, pyvmm_threads_argv, qemu_argv
from pyvmm.harness import netns

HOST_IP, NETMASK, PREFIX_LEN = "192.0.2.1", "255.255.255.0", 24
GUEST_IP = "192.0.2.2"  # the probe's default probe.net.ip
MAC = "52:54:00:12:34:56"
PORT = 5555  # the host's; the guest's is PORT + 1 (the probe's default probe.net.port)
SIZES = (64, 1400)  # UDP payload bytes
# The cases one boot runs, in order: (direction, payload bytes). tx is guest to host.
CASES = [(direction, size) for direction in ("tx", "rx") for size in SIZES]
PYVMM_TAP = "pyvmm0"  # the TAP pyvmm makes (and configures) for --host_ip
QEMU_TAP = "qtap0"  # the TAP QEMU makes; configured here
# pyvmm's own device, beside QEMU's (vhost=off): where the host has /dev/vhost-net, pyvmm's
# default would hand the queues to the kernel instead.
PYVMM_NET_FLAGS = ["--host_ip", HOST_IP, "--netmask", NETMASK, "--mac", MAC, "--net-vhost", "off"]
QEMU_NET_ARGS = [
    "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost=off",
    # romfile=: no iPXE option ROM for SeaBIOS to load and run (the probe boots through PVH).
    "-device", f"virtio-net-pci,netdev=n0,mac={MAC},disable-legacy=on,romfile=",
]  # fmt: skip

# The TAP queues this many frames for its reader (its txqueuelen; more are dropped). The sender
# keeps at most IN_FLIGHT sent and not yet read by the VMM, so none is.
TAP_QUEUE = 1000
IN_FLIGHT = TAP_QUEUE * 4 // 5
SEND_BURST_MIN = 64  # room for fewer than this: wait for the VMM to read some
PACE_SLEEP_S = 0.0002
RCVBUF = 64 << 20  # the host's receive buffer for guest-to-host datagrams (SO_RCVBUFFORCE)
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in Python's socket module
IP_FREEBIND = 15  # <linux/in.h>: bind before the TAP has the address
RECV_POLL_S = 0.1
LINK_TIMEOUT_S = 60.0
LINK_POLL_S = 0.005
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000  # the carrier: the TAP's reader has it open
NUD_PERMANENT = 0x80
US = 1e-6
DEFAULT_COUNT = 30000  # datagrams per case: ~0.5 to 1.5 s each here


def tap_counters(tap: str) -> tuple[int, int]:
    """(frames the TAP's reader has taken, frames the TAP dropped) toward the VMM: its transmit
    packets and drops, read in the calling thread's namespace."""
    with open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == tap:
                fields = counters.split()
                return int(fields[9]), int(fields[11])  # transmit: bytes packets errs drop
    return 0, 0


@dataclass
class Tally:
    """Datagrams of one size that reached the host: how many, first and last arrival."""

    count: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass
class Peer:
    """The host side of one VM's run, in its namespace: brings the TAP up (when the VMM does
    not), receives the guest's datagrams (tallied by size), and sends datagrams to the guest
    when its `start rx` line comes."""

    ns: str
    tap: str
    configure: bool  # give the TAP its address and bring it up (QEMU; pyvmm does it itself)
    count: int  # datagrams per rx case
    tallies: dict[int, Tally] = field(default_factory=dict)
    dropped: int = 0  # frames the TAP dropped toward the VMM
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _sends: queue.Queue[int | None] = field(default_factory=queue.Queue)
    _threads: list[threading.Thread] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        for target in (self._link, self._receive, self._send):
            thread = threading.Thread(target=self._guard(target), daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._ready.wait(LINK_TIMEOUT_S):
            raise RuntimeError(f"net: the receiving socket in {self.ns} was not ready")

    def close(self) -> None:
        self._stop.set()
        self._sends.put(None)
        for thread in self._threads:
            thread.join(LINK_TIMEOUT_S)
        if self.errors:
            raise RuntimeError(f"net: host side failed: {self.errors[0]!r}") from self.errors[0]

    def on_line(self, text: str) -> None:
        """A line of the guest's serial output: `PROBE netbench start rx <size>` sends."""
        words = text.split()
        if words[:4] == ["PROBE", "netbench", "start", "rx"]:
            self._sends.put(int(words[4]))

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                netns.enter(self.ns)
                fn()
            except BaseException as e:  # handed to close()
                self.errors.append(e)
                self._ready.set()

        return run

    def _link(self) -> None:
        """Wait for the TAP, configure it if asked, wait for it to be up with a carrier, and
        pin the guest's MAC in the neighbour table (no ARP inside a measurement)."""
        from pyroute2 import IPRoute

        deadline = time.monotonic() + LINK_TIMEOUT_S
        with IPRoute() as ipr:
            while not (found := ipr.link_lookup(ifname=self.tap)):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(LINK_POLL_S)
            index = found[0]
            if self.configure:
                ipr.addr("add", index=index, address=HOST_IP, prefixlen=PREFIX_LEN)
                ipr.link("set", index=index, state="up")
            while not self._stop.is_set():
                flags = ipr.get_links(index)[0]["flags"]
                if flags & IFF_UP and flags & IFF_LOWER_UP:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.tap} was not up within {LINK_TIMEOUT_S:.0f} s")
                time.sleep(LINK_POLL_S)
            ipr.neigh("replace", dst=GUEST_IP, lladdr=MAC, ifindex=index, state=NUD_PERMANENT)

    def _receive(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind((HOST_IP, PORT))
            sock.settimeout(RECV_POLL_S)
            self._ready.set()
            buf = bytearray(2048)
            tallies = self.tallies
            while not self._stop.is_set():
                try:
                    size = sock.recv_into(buf)
                except TimeoutError:
                    continue
                now = time.perf_counter()
                tally = tallies.get(size)
                if tally is None:
                    tally = tallies[size] = Tally(first=now)
                tally.count += 1
                tally.last = now

    def _send(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            while (size := self._sends.get()) is not None:
                self._send_paced(sock, bytes(i & 0xFF for i in range(size)))

    def _send_paced(self, sock: socket.socket, payload: bytes) -> None:
        """`count` datagrams to the guest, as fast as the VMM reads them from the TAP, never
        more than IN_FLIGHT ahead of it (the TAP queues TAP_QUEUE)."""
        taken, dropped = tap_counters(self.tap)
        base = taken
        sent = 0
        to = (GUEST_IP, PORT + 1)
        while sent < self.count and not self._stop.is_set():
            taken = tap_counters(self.tap)[0]
            room = min(IN_FLIGHT - (sent - (taken - base)), self.count - sent)
            if room < min(SEND_BURST_MIN, self.count - sent):
                time.sleep(PACE_SLEEP_S)
                continue
            for _ in range(room):
                sock.sendto(payload, to)
            sent += room
        self.dropped += tap_counters(self.tap)[1] - dropped


Case = ProbeCase


def cases(lines: list[tuple[float, float, str]]) -> list[Case]:
    """Each `PROBE netbench start` line paired with the `ok` line after it."""
    return probe_cases("netbench", lines)


def probe_params(count: int) -> list[str]:
    """The probe's command line for one boot running every case of CASES."""
    return [
        "probe=" + ",".join("netbench" for _ in CASES),
        "probe.net.dir=" + ",".join(direction for direction, _ in CASES),
        "probe.net.size=" + ",".join(str(size) for _, size in CASES),
        f"probe.net.count={count}",
    ]


def key(direction: str, size: int, what: str) -> str:
    return f"{direction}{size}_{what}"


def measure(
    argv_for: ArgvFor, tap: str, configure: bool, count: int, extra: list[str]
) -> dict[str, float]:
    """One boot running every case of CASES: per case, packets per second, the VMM's CPU
    seconds per million packets, and the share of the datagrams sent that arrived (%)."""
    params = probe_params(count)
    with netns.network_namespace("pyvmm-bench") as ns:
        peer = Peer(ns, tap, configure, count)
        peer.start()
        try:
            argv = ["ip", "netns", "exec", ns, *argv_for(PROBE, params, extra=extra)]
            run = run_vmm(argv, on_line=peer.on_line, cpu=tree_cpu_s)
        finally:
            peer.close()
    found = cases(run.lines)
    if [(c.direction, c.amount) for c in found] != CASES:
        raise RuntimeError(f"net: the probe ran {found}, not {CASES}")
    if peer.dropped:  # the pacing failed: say so (the guest's count shows what arrived)
        print(f"bench: net: the TAP dropped {peer.dropped} frames toward the VMM", file=sys.stderr)
    out: dict[str, float] = {}
    for case in found:
        if case.direction == "tx":
            # `ok tx <count> packets`: timed on the host, first to last arrival.
            sent = int(case.details[1])
            tally = peer.tallies.get(case.amount, Tally())
            got, seconds = tally.count, tally.last - tally.first
        else:
            # `ok rx <n> packets <us> us`: the guest's own time, first to last arrival.
            sent = count
            got, seconds = int(case.details[1]), int(case.details[3]) * US
        if got < 2 or seconds <= 0:
            raise RuntimeError(f"net: {case.direction} {case.amount}: {got} datagrams arrived")
        out[key(case.direction, case.amount, "pps")] = (got - 1) / seconds
        moved = sent if case.direction == "tx" else got  # what went through the VMM
        out[key(case.direction, case.amount, "cpu")] = case.cpu_s / moved * 1e6
        out[key(case.direction, case.amount, "delivered")] = got / sent * 100
    return out


def unavailable() -> str | None:
    """Why the net group cannot run here, or None."""
    why = netns.unavailable()
    return f"net: skipped, {why}" if why else None


def net(runs: int, count: int, qemu: bool) -> list[Row]:
    """Every case of CASES in one boot per VMM and run, `count` datagrams each, interleaved."""

    def make(
        argv_for: ArgvFor, tap: str, configure: bool, extra: list[str]
    ) -> Callable[[], dict[str, float]]:
        return lambda: measure(argv_for, tap, configure, count, extra)

    jobs = {
        PYVMM: make(pyvmm_argv, PYVMM_TAP, False, PYVMM_NET_FLAGS),
        THREADS: make(pyvmm_threads_argv, PYVMM_TAP, False, PYVMM_NET_FLAGS),
    }
    if qemu:
        jobs[QEMU] = make(qemu_argv, QEMU_TAP, True, QEMU_NET_ARGS)
    results = interleave(runs, jobs)
    names = {"tx": "guest to host", "rx": "host to guest"}
    rows: list[Row] = []
    keys: list[str] = []
    for what, unit, higher in (
        ("pps", "pps", True),
        ("cpu", "s/Mpkt", False),
        ("delivered", "%", True),
    ):
        for direction, size in CASES:
            label = {
                "pps": f"UDP {names[direction]}, {size:,} B",
                "cpu": f"VMM CPU, {names[direction]}, {size:,} B",
                "delivered": f"arrived of sent, {names[direction]}, {size:,} B",
            }[what]
            rows.append(Row("net", label, unit, higher))
            keys.append(key(direction, size, what))
    for row, name in zip(rows, keys, strict=True):
        for vmm, values in results.items():
            row.record(vmm, values[name])
    return rows
