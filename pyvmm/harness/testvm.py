"""The test VM: a KVM host made of software, for machines whose own KVM cannot boot Linux.

QEMU's TCG emulation with `-cpu max` offers AMD SVM with nested paging, so Debian's stock kernel
booted under it loads kvm-amd and has a working /dev/kvm. The host's root filesystem is shared
in read-only over 9p under a tmpfs overlay (the host's Python and the project tree run inside
unchanged; writes vanish with the VM), and a scratch directory read-write at the same path.
`TestVm.run()` boots it, runs one command in a chroot of that tree, and returns the command's
exit status and output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from pyvmm.harness.kit import GuestKit

log = logging.getLogger(__name__)

# What the test VM's init loads: virtio-pci and 9p for the shares, overlay to make the host's
# tree writable (into a tmpfs), KVM for SVM guests, tun for network tests, vhost-net and
# vhost-vsock (/dev/vhost-vsock, with the vsock core: host programs' AF_VSOCK) for pyvmm's
# kernel data paths.
TESTVM_MODULES = [
    "virtio_pci", "9pnet_virtio", "9p", "overlay", "kvm_amd", "tun", "vhost_net", "vhost_vsock",
]  # fmt: skip
HOSTROOT_TAG = "hostroot"
SCRATCH_TAG = "scratch"
QEMU = "qemu-system-x86_64"
# QEMU's most capable emulated CPU (it has SVM with nested paging), reporting the family and
# model of a 2014 AMD part (family 16h, Puma). Left at QEMU's default (AMD family 15, the K8 of
# 2003), Linux guests take the AGP-era path that scans all 256 PCI buses for a GART twice at
# boot: 16,384 config-space exits that no guest on a real KVM host makes. Not family 23: its
# guests log an SRSO WARNING.
TESTVM_CPU = "max,family=22,model=48"
DEFAULT_MEM_MIB = 4096
MAX_CPUS = 4
STATUS_FILE = "status"
OUTPUT_FILE = "output"
COMMAND_FILE = "command.sh"

PR_SET_PDEATHSIG = 1
# What the test VM's kernel prints when its (emulated) CPUs stop making progress.
LOCKUP_MARKERS = ("watchdog: BUG: soft lockup", "detected stalls on CPUs")
# ... and when it dies. Nothing the command does as a process can do that; QEMU's emulation of
# nested virtualisation has (twice in CI, while guests gave memory back: a kernel stack overrun
# inside kvm_amd's vCPU run), so it is the emulator's failure, treated like a lockup.
PANIC_MARKER = "Kernel panic - not syncing"
# What the test VM's init prints just before it starts the command.
READY_MARKER = "testvm: ready"
WATCH_INTERVAL_S = 2.0
# The test VM's init writes its uptime to a second serial port every few seconds. When that
# stops, the emulation has stopped (seen once in CI: no console message, no progress, for
# 18 minutes); it is treated like a lockup and the command runs again in a new test VM.
HEARTBEAT_INTERVAL_S = 5
HEARTBEAT_STALL_S = 90.0
LOCKUP_ATTEMPTS = 3

TESTVM_INIT_TEMPLATE = r"""#!/bin/busybox sh
# Test VM init: load KVM and 9p, mount the host's tree read-only and the scratch directory
# read-write, run the command in a chroot of the host's tree, record its status, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Huge pages for shared memory where a program asks for them (madvise), as pyvmm does for guest
# RAM: the setting we recommend for KVM hosts. Debian's default is never.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
# The heartbeat the host watches to tell a stopped emulator from a slow command.
( while :; do cut -d' ' -f1 /proc/uptime; sleep {heartbeat}; done > /dev/ttyS1 2>&1 ) &
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || echo "testvm: insmod $m failed"
done
param() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
scratch="$(param pyvmm.scratch)"
work="$(param pyvmm.work)"
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /lower /upper /host
if ! mount -t 9p -o "$opts,ro,cache=loose" hostroot /lower; then
    echo "testvm: cannot mount the host's tree"; poweroff -f
fi
# The host's tree, writable: changes land in a tmpfs and vanish with the VM.
mount -t tmpfs -o mode=755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /host
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs tmpfs /host/run
mount -t 9p -o "$opts" scratch "/host$scratch"
echo "testvm: ready after $(cut -d' ' -f1 /proc/uptime) s"
chroot /host /bin/sh "$work/command.sh" > "/host$work/output" 2>&1
echo $? > "/host$work/status"
sync
umount "/host$scratch"
poweroff -f
"""
TESTVM_INIT = TESTVM_INIT_TEMPLATE.replace("{heartbeat}", str(HEARTBEAT_INTERVAL_S))


@dataclass(frozen=True)
class WatchedFiles:
    """What the host watches while the test VM runs."""

    console: Path  # the test VM's kernel console (first serial port)
    heartbeat: Path  # the init's uptime ticks (second serial port)
    output: Path  # the command's stdout and stderr


class TestVmError(Exception):
    """The test VM could not be booted, or did not finish its command."""

    __test__ = False  # not a pytest test class, despite the name


class TestVmLockupError(TestVmError):
    """The test VM's own kernel reported CPUs locked up, or died: the emulator, not the
    command."""


@dataclass(frozen=True)
class TestVmResult:
    returncode: int
    output: str
    console: str
    seconds: float
    # Set when a first test VM locked up and this result comes from a second one.
    lockup_retry: str | None = None


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the harness dies, however it dies."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()


def default_cpus() -> int:
    """The host's cores shared out among the test VMs that run side by side, one per pytest
    worker. With more vCPUs than cores, TCG's vCPU threads take turns on a core: two test VMs
    of two vCPUs each on two cores took 1.1-1.4x as long for the same boots."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min((os.cpu_count() or 1) // workers, MAX_CPUS))


class TestVm:
    """Boots the kit's Debian kernel under QEMU TCG with KVM loaded inside."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self, kit: GuestKit, mem_mib: int = DEFAULT_MEM_MIB, cpus: int | None = None
    ) -> None:
        if shutil.which(QEMU) is None:
            raise TestVmError(f"{QEMU} not found: apt-get install qemu-system-x86")
        self.kit = kit
        self.mem_mib = mem_mib
        self.cpus = cpus or default_cpus()

    def initramfs(self) -> Path:
        """The test VM's own initramfs (its init and the modules it loads)."""
        return self.kit.build_initramfs("testvm", TESTVM_INIT, TESTVM_MODULES)

    def qemu_command(
        self, initramfs: Path, scratch: Path, workdir: Path, watched: WatchedFiles
    ) -> list[str]:
        kernel = self.kit.kernel()
        append = (
            f"console=ttyS0 quiet loglevel=4 panic=-1 pyvmm.scratch={scratch} pyvmm.work={workdir}"
        )
        return [
            QEMU,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            TESTVM_CPU,
            "-smp",
            str(self.cpus),
            "-m",
            str(self.mem_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{watched.console}",
            "-serial",
            f"file:{watched.heartbeat}",
            "-kernel",
            str(kernel.bzimage),
            "-initrd",
            str(initramfs),
            "-append",
            append,
            "-virtfs",
            f"local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs",
            f"local,path={scratch},mount_tag={SCRATCH_TAG},security_model=none,multidevs=remap",
        ]

    def run(
        self,
        command: list[str],
        scratch: Path,
        timeout: float,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> TestVmResult:
        """Run `command` inside the test VM. `scratch` (a host directory) is shared writable at
        the same path; the rest of the host's tree is visible, its changes discarded. Raises
        TestVmError if the VM does not finish within `timeout` seconds or never runs the
        command.

        QEMU's emulation itself has been seen to lock up (the test VM's kernel reports soft
        lockups, or its heartbeat stops and nothing moves again). That is detected and the
        command is run again in a fresh test VM, up to LOCKUP_ATTEMPTS times in all; the result
        says so in `lockup_retry`."""
        lockups: list[str] = []
        while True:
            try:
                result = self._run_once(command, scratch, timeout, cwd, env)
            except TestVmLockupError as e:
                lockups.append(str(e))
                if len(lockups) == LOCKUP_ATTEMPTS:
                    raise TestVmLockupError(
                        f"the test VM locked up {len(lockups)} times: " + " / ".join(lockups)
                    ) from e
                log.warning("%s; running the command again in a new test VM", e)
                continue
            if lockups:
                result = dataclasses.replace(result, lockup_retry=" / ".join(lockups))
            return result

    def _run_once(
        self,
        command: list[str],
        scratch: Path,
        timeout: float,
        cwd: Path | None,
        env: dict[str, str] | None,
    ) -> TestVmResult:
        scratch = scratch.resolve()
        initramfs = self.initramfs()
        workdir = Path(tempfile.mkdtemp(prefix=".testvm-", dir=scratch))
        try:
            script = ["set -e", f"cd {shlex.quote(str(cwd or Path.cwd()))}"]
            for key, value in (env or {}).items():
                script.append(f"export {key}={shlex.quote(value)}")
            script.append("exec " + shlex.join(command))
            (workdir / COMMAND_FILE).write_text("\n".join(script) + "\n")
            watched = WatchedFiles(
                workdir / "console.log", workdir / "heartbeat.log", workdir / OUTPUT_FILE
            )
            console = watched.console
            qemu_log = workdir / "qemu.log"
            cmd = self.qemu_command(initramfs, scratch, workdir, watched)
            start = time.monotonic()
            with open(qemu_log, "wb") as qemu_out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=qemu_out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            try:
                self._wait(proc, watched, start, timeout)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            seconds = time.monotonic() - start
            console_text = console.read_text(errors="replace") if console.exists() else ""
            status = workdir / STATUS_FILE
            if not status.exists():
                _ended_early(proc.returncode, watched, qemu_log)
            return TestVmResult(
                int(status.read_text().strip() or "255"),
                (workdir / OUTPUT_FILE).read_text(errors="replace"),
                console_text,
                seconds,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _wait(
        proc: subprocess.Popen[bytes],
        watched: WatchedFiles,
        start: float,
        timeout: float,
        stall_s: float = HEARTBEAT_STALL_S,
    ) -> None:
        """Until QEMU exits; raise on the timeout, or when the test VM's kernel reports a lockup
        or its heartbeat stops for `stall_s` seconds."""
        beats = -1
        last_beat = start
        while proc.poll() is None:
            now = time.monotonic()
            if now - start > timeout:
                raise TestVmError(
                    f"test VM did not finish within {timeout:.0f} s; console ends with: "
                    + _tail(watched.console)
                    + "; the command's output ends with: "
                    + _tail(watched.output)
                )
            _check_console(watched.console)
            size = watched.heartbeat.stat().st_size if watched.heartbeat.exists() else 0
            if size != beats:
                beats, last_beat = size, now
            elif now - last_beat > stall_s:
                raise TestVmLockupError(
                    f"the test VM stopped (no heartbeat for {now - last_beat:.0f} s; last uptime "
                    f"{_tail(watched.heartbeat, 1)} s); the command's output ends with: "
                    + _tail(watched.output)
                )
            time.sleep(WATCH_INTERVAL_S)


def _check_console(console: Path) -> None:
    """TestVmLockupError if the test VM's kernel says it locked up or died."""
    text = console.read_text(errors="replace") if console.exists() else ""
    if any(marker in text for marker in LOCKUP_MARKERS):
        raise TestVmLockupError(
            "the test VM's kernel locked up (QEMU emulation): " + _tail(console, 2)
        )
    if PANIC_MARKER in text:
        raise TestVmLockupError(
            "the test VM's kernel died (QEMU emulation): " + _panic_report(text)
        )


def _ended_early(returncode: int | None, watched: WatchedFiles, qemu_log: Path) -> NoReturn:
    """Say why QEMU ended before the command wrote its status. A test VM that had started the
    command and then ended with QEMU status 0 reset itself (QEMU runs with -no-reboot): its
    kernel triple-faulted under the emulator, as TCG's SVM emulation has been seen to make it
    do, so that is a lockup and worth a fresh test VM."""
    _check_console(watched.console)  # it may have died between two looks
    said = qemu_log.read_text(errors="replace").strip()
    console = watched.console.read_text(errors="replace") if watched.console.exists() else ""
    if returncode == 0 and READY_MARKER in console:
        raise TestVmLockupError(
            f"the test VM reset itself while running the command (last uptime "
            f"{_tail(watched.heartbeat, 1)} s; its kernel triple-faulted?); the command's output "
            "ends with: " + _tail(watched.output)
        )
    raise TestVmError(
        f"test VM ended (QEMU status {returncode}) without running the command: "
        + (said or _tail(watched.console, 60))  # a panic's whole report
    )


def _panic_report(console: str) -> str:
    """The lines of a kernel's death that say where: what it hit, the RIP, the panic."""
    keys = ("BUG:", "Oops", "RIP:", "Comm:", "Kernel panic")
    lines = [line.strip() for line in console.splitlines() if any(k in line for k in keys)]
    return " | ".join(lines[-6:])


def _tail(path: Path, lines: int = 5) -> str:
    if not path.exists():
        return "(no output)"
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"
