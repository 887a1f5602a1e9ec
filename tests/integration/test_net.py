"""virtio-net's host side, each test in a network namespace of its own: the TAP pyvmm makes has
the host address and is up while the VM runs and is gone after every way the VM can end; a TAP
the caller passes with --tap-fd is used and left as it was given; without CAP_NET_ADMIN the
error says so."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.net.tap import REQUIRED_FLAGS, TunIoctl, ffi
from tests.integration.conftest import ROOT, needs_kvm, run_pyvmm, wait_until
from tests.integration.netns import Namespace, network_namespace
from tests.integration.test_device_processes import descendants, jailed, namespace, status

pytestmark = needs_kvm

HOST_IP, NETMASK, MAC = "192.0.2.1", "255.255.255.0", "52:54:00:12:34:56"
GUEST_IP = "192.0.2.2"  # the probe's default probe.net.ip
UDP_PAYLOAD = 64  # net-udp's datagrams: a sequence number and 60 pattern bytes
NET_FLAGS = ["--host_ip", HOST_IP, "--netmask", NETMASK, "--mac", MAC]
BOTH_MODES = pytest.mark.parametrize("mode", [[], ["--disable-sandbox"]], ids=["process", "thread"])


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with network_namespace() as namespace:
        yield namespace


def _taps(ns: Namespace) -> dict[str, dict[str, object]]:
    return {name: link for name, link in ns.links().items() if name.startswith("pyvmm")}


def _spin(ns: Namespace, probe_elf: Path, sock: Path, *flags: str) -> subprocess.Popen[bytes]:
    cmd = [*ns.wrapper, sys.executable, "-m", "pyvmm", "run", "-s", str(sock), *flags]
    return subprocess.Popen(
        [*cmd, "-p", "probe=spin", str(probe_elf)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _ctl(sock: Path, command: str) -> None:
    subprocess.run([sys.executable, "-m", "pyvmm", command, str(sock)], cwd=ROOT, check=True)


@BOTH_MODES
@pytest.mark.parametrize("end", ["stop", "SIGTERM", "SIGKILL"])
def test_the_tap_is_configured_while_the_vm_runs_and_gone_after(
    ns: Namespace, probe_elf: Path, tmp_path: Path, mode: list[str], end: str
) -> None:
    sock = tmp_path / "ctl.sock"
    vm = _spin(ns, probe_elf, sock, *mode, *NET_FLAGS)
    try:
        wait_until(lambda: sock.exists() and bool(_taps(ns)), 30, "no TAP while the VM runs")
        assert _taps(ns) == {"pyvmm0": {"up": True, "addresses": [f"{HOST_IP}/24"]}}
        if end == "stop":
            _ctl(sock, "stop")
            assert vm.wait(timeout=30) == 0
        else:
            vm.send_signal(getattr(signal, end))  # the wrapper execs: this is pyvmm itself
            vm.wait(timeout=30)
        # After SIGKILL the device processes follow their parent (PR_SET_PDEATHSIG), and the
        # TAP goes with the last fd to it.
        wait_until(lambda: not _taps(ns), 30, f"the TAP outlived pyvmm ({end})")
    finally:
        vm.kill()
        vm.wait()


def test_the_tap_is_gone_when_the_guest_resets(ns: Namespace, probe_elf: Path) -> None:
    r = run_pyvmm("run", *NET_FLAGS, "-p", "probe=pci", str(probe_elf), wrapper=ns.wrapper)
    assert r.returncode == 0, r.stderr
    assert r.probe_results()["pci"][1].startswith("4 devices")  # bridge, net0, rng, balloon
    wait_until(lambda: not _taps(ns), 30, "the TAP outlived the VM")


def _open_tap(ns: Namespace, name: str) -> int:
    """An fd on the namespace's existing TAP `name`, opened as a caller of --tap-fd would."""

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        request = ffi.new("struct ifreq *")
        request.ifr_name = name.encode()
        request.ifr_flags = int(REQUIRED_FLAGS)
        fcntl.ioctl(fd, TunIoctl.TUNSETIFF, bytearray(ffi.buffer(request)), True)
        return fd

    return ns.inside(attach)


@BOTH_MODES
def test_a_tap_fd_is_used_and_left_as_given(
    ns: Namespace, probe_elf: Path, mode: list[str]
) -> None:
    subprocess.run(
        ["ip", "-n", ns.name, "tuntap", "add", "dev", "given0", "mode", "tap", "vnet_hdr"],
        check=True,
    )
    before = ns.links()["given0"]
    fd = _open_tap(ns, "given0")
    try:
        cmd = [*ns.wrapper, sys.executable, "-m", "pyvmm", "run", *mode, "--tap-fd", str(fd)]
        proc = subprocess.run(
            [*cmd, "-p", "probe=pci", str(probe_elf)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            pass_fds=[fd],
        )
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert "PROBE pci ok 4 devices" in proc.stdout  # bridge, net0, rng, balloon
    assert ns.links()["given0"] == before  # still there, as it was
    assert not _taps(ns)


def test_making_a_tap_without_cap_net_admin_is_one_line(ns: Namespace, probe_elf: Path) -> None:
    wrapper = [*ns.wrapper, "setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    r = run_pyvmm("run", *NET_FLAGS, str(probe_elf), wrapper=wrapper)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("pyvmm: --host_ip: creating a TAP device needs CAP_NET_ADMIN")
    assert not _taps(ns)


def test_the_net_device_process_is_jailed_and_holds_only_its_fds(
    ns: Namespace, probe_elf: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "ctl.sock"
    vm = _spin(ns, probe_elf, sock, *NET_FLAGS)
    try:

        def net_process() -> int | None:
            try:
                found = jailed(descendants(vm.pid))
                pid = found.get("pyvmm-net0")
                return pid if pid and status(pid)["Seccomp"] == "2" else None
            except (FileNotFoundError, KeyError):
                return None

        wait_until(lambda: net_process() is not None, 60, "no jailed net device process")
        pid = net_process()
        assert pid is not None
        facts = status(pid)
        assert (facts["NoNewPrivs"], facts["CapEff"]) == ("1", "0000000000000000")
        for kind in ("mnt", "pid", "net"):
            assert namespace(pid, kind) != namespace(vm.pid, kind), kind
        held = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
        tun = [t for t in held if t == "/dev/net/tun"]
        memfds = [t for t in held if t.startswith("/memfd:")]
        sockets = [t for t in held if t.startswith("socket:")]
        others = [t for t in held if t not in (*tun, *memfds, *sockets)]
        # One TAP, guest RAM (the memfd, which the process's memory map holds a second fd to),
        # and its socket to the VMM.
        assert len(tun) == 1 and len(set(memfds)) == 1 and len(sockets) == 1, held
        # The rest: eventfds (INTx, and the worker's), stdio on /dev/null or pipes.
        assert all(t.startswith(("anon_inode:[eventfd]", "pipe:", "/dev/null")) for t in others)
        _ctl(sock, "stop")
        assert vm.wait(timeout=30) == 0
    finally:
        vm.kill()
        vm.wait()


class UdpPeer:
    """The host end of the probe's net-udp, in the namespace: takes `count` datagrams, then sends
    as many back, paced so the TAP's queue (1,000 frames) never overflows."""

    def __init__(self, ns: Namespace, count: int, port: int = 5555) -> None:
        self.count = count
        self.port = port
        self.received: set[int] = set()
        self.sock = ns.udp_socket(HOST_IP, port)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(60)
        try:
            while len(self.received) < self.count:
                data, _ = self.sock.recvfrom(2048)
                if len(data) == UDP_PAYLOAD:
                    self.received.add(struct.unpack(">I", data[:4])[0])
                self.sock.settimeout(10)
        except TimeoutError:
            return  # the test reports what did not arrive
        for seq in range(self.count):
            payload = struct.pack(">I", seq) + bytes((seq + i) & 0xFF for i in range(60))
            self.sock.sendto(payload, (GUEST_IP, self.port + 1))
            if seq % 50 == 49:
                time.sleep(0.001)

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()


@BOTH_MODES
@pytest.mark.parametrize("mrg", ["0", "1"], ids=["plain", "mergeable"])
def test_the_probe_talks_to_the_host_kernel(
    ns: Namespace, probe_elf: Path, mode: list[str], mrg: str
) -> None:
    # ARP and ping are answered by the host kernel; 1,000 datagrams each way, all counted; then
    # hostile queues, after which the device still answers ARP. With mrg=1 the probe's receive
    # buffers are 64 bytes, so every frame spans several.
    count = 1000
    peer = UdpPeer(ns, count)
    try:
        tests = "net-arp,net-ping,net-udp,net-hostile"
        params = [f"probe={tests}", f"probe.net.mrg={mrg}", f"probe.net.count={count}"]
        r = run_pyvmm(
            "run", *mode, *NET_FLAGS, *(f for p in params for f in ("-p", p)), str(probe_elf),
            wrapper=ns.wrapper,
        )  # fmt: skip
    finally:
        peer.close()
    assert r.returncode == 0, r.stderr
    results = r.probe_results()
    for test in tests.split(","):
        assert results.get(test, ("missing", ""))[0] == "ok", f"{test}: {results.get(test)}"
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", results["net-arp"][1])
    assert results["net-ping"][1] == "3 replies"
    assert results["net-udp"][1] == f"sent {count} received {count}"
    assert peer.received == set(range(count))


def test_vhost_on_where_there_is_none_is_one_line(ns: Namespace, probe_elf: Path) -> None:
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net")
    r = run_pyvmm("run", *NET_FLAGS, "--net-vhost", "on", str(probe_elf), wrapper=ns.wrapper)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "pyvmm: --net-vhost on: /dev/vhost-net does not exist (load it: modprobe vhost_net)"
    ]
    assert not _taps(ns)  # the TAP made before it is gone
