"""Multiprocess mode (the default): each virtio device runs in a process of its own, none is left
behind by any way the VM ends, and a device process that dies takes only its device with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from pyvmm.sandbox.seccomp import policy_dir, syscall_number
from tests.integration.conftest import ROOT, needs_kvm, run_pyvmm, wait_until
from tests.integration.test_virtio_probe import ctl, make_pattern_image

pytestmark = needs_kvm

MiB = 1 << 20
ARCH = os.uname().machine


def children(pid: int) -> set[int]:
    """The PIDs of a process's children, by its tasks' `children` files."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return found


def descendants(pid: int) -> set[int]:
    found = children(pid)
    for child in list(found):
        with suppress(FileNotFoundError):
            found |= descendants(child)
    return found


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@contextmanager
def long_vm(
    probe_elf: Path, tmp_path: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], set[int]]]:
    """A VM with a disk whose guest runs until stopped; yields it and its device processes,
    once both are up (they start in the background: the guest does not wait for them)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    argv = [sys.executable, "-m", "pyvmm", "run", "--rwdisk", str(image), *extra]
    argv += ["-p", "probe=outloop", "-p", "probe.count=100000000000", str(probe_elf)]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert b"PROBE outloop start" in proc.stdout.readline() or proc.stdout.readline()
        wait_until(lambda: _devices_up(proc.pid), 60, "the device processes never came up")
        devices = descendants(proc.pid)
        yield proc, devices
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _devices_up(vmm: int) -> bool:
    """Whether the disk's, the rng's and the balloon's processes are jailed and under their
    filters."""
    try:
        up = jailed(descendants(vmm))
        return set(up) == {"pyvmm-vda", "pyvmm-rng", "pyvmm-balloon"} and all(
            status(pid)["Seccomp"] == "2" for pid in up.values()
        )
    except (FileNotFoundError, KeyError):
        return False  # a process that ended, or had not yet been named, while being read


def jailed(devices: set[int]) -> dict[str, int]:
    """comm -> PID of each device process proper: PID 1 of its own PID namespace (the process
    that started it waits outside for it)."""
    return {comm(pid): pid for pid in devices if status(pid)["NSpid"].split()[-1] == "1"}


def namespace(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_each_device_runs_jailed_under_seccomp(probe_elf: Path, tmp_path: Path) -> None:
    with long_vm(probe_elf, tmp_path) as (proc, devices):
        names = jailed(devices)
        assert set(names) == {"pyvmm-vda", "pyvmm-rng", "pyvmm-balloon"}, names
        for name, pid in names.items():
            facts = status(pid)
            assert (facts["Seccomp"], facts["NoNewPrivs"]) == ("2", "1"), (name, facts)
            for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert facts[cap] == "0000000000000000", (name, cap, facts[cap])
            for kind in ("mnt", "pid", "net", "ipc", "uts"):
                assert namespace(pid, kind) != namespace(proc.pid, kind), (name, kind)
            assert os.listdir(f"/proc/{pid}/root") == [], f"{name} sees files in its root"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _policies_without(tmp_path: Path, device: str, call: str) -> Path:
    """A copy of this machine's policies in which `device`'s omits `call`."""
    copy = tmp_path / "policies"
    copy.mkdir()
    for policy in policy_dir().glob("*.policy"):
        lines = policy.read_text().splitlines(keepends=True)
        if policy.stem == device:
            lines = [line for line in lines if not line.startswith(f"{call}:")]
        (copy / policy.name).write_text("".join(lines))
    return copy


@pytest.mark.parametrize("log_failures", [False, True], ids=["killed", "logged"])
def test_a_call_outside_the_policy_kills_only_that_device(
    probe_elf: Path, tmp_path: Path, log_failures: bool
) -> None:
    image = make_pattern_image(tmp_path / "disk.img")
    policies = _policies_without(tmp_path, "rng_device", "getrandom")
    flags = ["--seccomp-policy-dir", str(policies), "--rwdisk", str(image)]
    flags += ["--seccomp-log-failures"] if log_failures else []
    run = run_pyvmm("run", *flags, "-p", "probe=rng,blk", str(probe_elf), timeout=120)
    results = run.probe_results()
    assert results["blk"][0] == "ok", run.stdout  # the disk's process went on working
    failures = [line for line in run.stderr.splitlines() if "device process" in line]
    if log_failures:
        assert results["rng"][0] == "ok", run.stdout
        assert failures == [], run.stderr
        denied = f"pyvmm: virtio rng: seccomp: getrandom ({syscall_number('getrandom', ARCH)})"
        assert any(line.startswith(denied) for line in run.stderr.splitlines()), run.stderr
    else:
        assert results["rng"][0] == "FAIL", run.stdout  # its device is gone
        assert len(failures) == 1, run.stderr
        assert failures[0].startswith("pyvmm: virtio rng: device process")
        assert "killed by SIGSYS (a system call its seccomp policy does not allow)" in failures[0]
    assert run.returncode == 0, run.stderr  # the VM went on to the guest's own end


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "stop", "SIGKILL"])
def test_no_device_process_outlives_the_vm(probe_elf: Path, tmp_path: Path, how: str) -> None:
    sock = tmp_path / "vm.sock"
    with long_vm(probe_elf, tmp_path, "-s", str(sock)) as (proc, devices):
        assert len(devices) >= 2
        if how == "stop":
            assert ctl(sock, "stop").returncode == 0
        else:
            proc.send_signal(getattr(signal, how))  # SIGKILL: the children's PDEATHSIG
        proc.wait(30)
        wait_until(lambda: not any(alive(pid) for pid in devices), 10, "a device outlived it")
    assert not sock.exists() or how == "SIGKILL"


# Runs pyvmm as a child subreaper: a device process that outlived pyvmm would become this
# wrapper's child, and the wrapper prints its children's PIDs once pyvmm has ended.
_SUBREAPER = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
time.sleep(0.5)
left = [t for t in os.listdir(f"/proc/{os.getpid()}/task")]
pids = set()
for t in left:
    pids.update(open(f"/proc/{os.getpid()}/task/{t}/children").read().split())
print(" ".join(sorted(pids)), file=sys.stderr)
sys.exit(code)
"""


def test_a_guest_reset_leaves_no_device_process(probe_elf: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    wrapper = [sys.executable, "-c", _SUBREAPER]
    run = run_pyvmm("run", "--rwdisk", str(image), str(probe_elf), wrapper=wrapper)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", f"processes left behind: {run.stderr}"


def test_a_dead_device_is_reported_once_and_the_vm_goes_on(probe_elf: Path, tmp_path: Path) -> None:
    with long_vm(probe_elf, tmp_path) as (proc, devices):
        disk = jailed(devices)["pyvmm-vda"]
        # As the OOM killer would (a PID 1 ignores other signals from outside its namespace;
        # a seccomp kill is test_a_call_outside_the_policy_kills_only_that_device).
        os.kill(disk, signal.SIGKILL)
        time.sleep(1)
        assert proc.poll() is None, "the VM ended with its disk's process"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    lines = stderr.decode().splitlines()
    failed = [line for line in lines if "device process" in line]
    assert len(failed) == 1, lines
    assert failed[0].startswith("pyvmm: virtio vda: device process")
    assert "failed: killed by SIGKILL (out of memory, or killed from outside)" in failed[0]
    assert proc.returncode == 128 + signal.SIGTERM
