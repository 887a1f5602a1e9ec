"""The host side of pyvmm's own vsock device, whatever the guest does: the Unix socket it listens
on (made 0600, gone at the end, a stale one replaced, a live one refused), the jailed device
process and the fds it holds, and the flags' errors. The guest's side of the streams is
tests/integration/test_vsock.py (the probe's vsock driver)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, needs_kvm, run_pyvmm, wait_until
from tests.integration.test_device_processes import descendants, jailed, namespace, status

pytestmark = needs_kvm
CID = "3"


def _spin(probe_elf: Path, path: Path, *flags: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pyvmm", "run", "--cid", CID, "--vsock-uds", str(path), *flags]
    return subprocess.Popen(
        [*argv, "-p", "probe=spin", str(probe_elf)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def vm(probe_elf: Path, path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = _spin(probe_elf, path)
    try:
        wait_until(lambda: path.exists() or proc.poll() is not None, 60, "no vsock socket")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_the_socket_is_ours_alone_and_gone_after_the_vm(
    vm: subprocess.Popen[bytes], path: Path
) -> None:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    vm.send_signal(signal.SIGTERM)
    vm.wait(timeout=30)
    assert not path.exists()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(
    vm: subprocess.Popen[bytes], probe_elf: Path, path: Path
) -> None:
    second = run_pyvmm("run", "--cid", "4", "--vsock-uds", str(path), str(probe_elf), timeout=60)
    assert second.returncode == 1
    assert second.stderr.strip() == f"pyvmm: --vsock-uds {path}: another VM is listening there"
    vm.kill()  # no clean-up on SIGKILL: the file stays, stale
    vm.wait(timeout=30)
    assert path.exists()
    again = run_pyvmm("run", "--cid", CID, "--vsock-uds", str(path), str(probe_elf), timeout=60)
    assert again.returncode == 0, again.stderr
    assert not path.exists()


def test_the_vsock_device_process_is_jailed_and_holds_only_its_fds(
    vm: subprocess.Popen[bytes],
) -> None:
    def vsock_process() -> int | None:
        try:
            pid = jailed(descendants(vm.pid)).get("pyvmm-vsock")
            return pid if pid and status(pid)["Seccomp"] == "2" else None
        except (FileNotFoundError, KeyError):
            return None

    wait_until(lambda: vsock_process() is not None, 60, "no jailed vsock device process")
    pid = vsock_process()
    assert pid is not None
    facts = status(pid)
    assert (facts["NoNewPrivs"], facts["CapEff"]) == ("1", "0000000000000000")
    for kind in ("mnt", "pid", "net"):
        assert namespace(pid, kind) != namespace(vm.pid, kind), kind
    held = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    memfds = [t for t in held if t.startswith("/memfd:")]
    sockets = [t for t in held if t.startswith("socket:")]
    others = [t for t in held if t not in (*memfds, *sockets)]
    # Guest RAM; its socket to the VMM, the listening socket and its end of the dialer.
    assert len(set(memfds)) == 1 and len(sockets) == 3, held
    # The rest: eventfds (INTx, the worker's, its own), its epoll fd, stdio.
    assert all(
        t.startswith(("anon_inode:[eventfd]", "anon_inode:[eventpoll]", "pipe:", "/dev/null"))
        for t in others
    ), held


def test_a_client_with_a_garbage_first_line_is_closed_and_the_vm_goes_on(
    vm: subprocess.Popen[bytes], path: Path, probe_elf: Path
) -> None:
    """The probe here has no vsock driver: the device is never started, and a client waits (in
    the listening socket's queue) until a guest driver is there. Still, the VM is unharmed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(b"GARBAGE\n" * 100)
    assert vm.poll() is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cid", "2", "--vsock-uds", "{path}"], "--cid 2: 2 is reserved or out of range"),
        (["--cid", "4294967295", "--vsock-uds", "{path}"], "--cid 4294967295: "),
        (["--vsock-uds", "{path}"], "--vsock-uds {path}: needs --cid N"),
        (["--cid", "3", "--vsock-uds", "/no/such/dir/v.sock"], "no such directory /no/such/dir"),
        (["--cid", "3", "--vsock-uds", "{long}"], "too long for a Unix socket"),
        (["--cid", "3"], "--cid 3: /dev/vhost-vsock does not exist"),
    ],
)
def test_bad_vsock_flags_are_one_line_errors(
    probe_elf: Path, path: Path, flags: list[str], message: str
) -> None:
    if os.path.exists("/dev/vhost-vsock") and flags == ["--cid", "3"]:
        pytest.skip("this host has vhost-vsock")
    long = str(path.parent / ("x" * 100))
    argv = [f.format(path=path, long=long) for f in flags]
    run = run_pyvmm("run", *argv, str(probe_elf), timeout=60)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(path=path) in lines[0], run.stderr


def test_a_socket_path_where_none_can_be_made_is_one_line(probe_elf: Path) -> None:
    run = run_pyvmm("run", "--cid", CID, "--vsock-uds", "/sys/v.sock", str(probe_elf), timeout=60)
    assert run.returncode == 1
    assert run.stderr.startswith("pyvmm: --vsock-uds /sys/v.sock: cannot create the socket: ")
    assert len(run.stderr.strip().splitlines()) == 1
