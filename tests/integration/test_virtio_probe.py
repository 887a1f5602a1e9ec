"""PCI and virtio devices as the probe guest sees them, and the control socket, natively."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, needs_kvm, run_pyvmm

pytestmark = needs_kvm

MiB = 1 << 20
SECTOR = 512
PATTERN_SECTORS = 2048  # the first 1 MiB holds (sector + byte) & 0xff
WRITTEN = range(2048, 2304)  # the probe's blk test writes (sector * 3 + byte) & 0xff here


def pattern(sector: int, multiplier: int = 1) -> bytes:
    return bytes(((sector * multiplier + i) & 0xFF) for i in range(SECTOR))


def make_pattern_image(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.write(b"".join(pattern(s) for s in range(PATTERN_SECTORS)))
        f.truncate(size)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _probe(probe_elf: Path, tests: str, *flags: str, timeout: float = 120) -> dict[str, str]:
    r = run_pyvmm("run", *flags, "-p", f"probe={tests}", str(probe_elf), timeout=timeout)
    assert r.returncode == 0, f"pyvmm exited {r.returncode}: {r.stderr}\n{r.stdout}"
    results = r.probe_results()
    for test in tests.split(","):
        assert test in results, f"no PROBE {test} line in:\n{r.stdout}"
        status, details = results[test]
        assert status == "ok", f"PROBE {test} FAIL {details}"
    return {t: d for t, (_, d) in results.items()}


def test_pci_bus_lists_host_bridge_disks_and_rng(probe_elf: Path, tmp_path: Path) -> None:
    a = make_pattern_image(tmp_path / "a.img")
    b = make_pattern_image(tmp_path / "b.img")
    details = _probe(probe_elf, "pci", "--rwdisk", str(a), "-d", str(b))
    assert details["pci"].startswith("5 devices")  # bridge, vda, vdb, rng, balloon


# Multiprocess mode is the default; --disable-sandbox runs the devices as threads.
BOTH_MODES = pytest.mark.parametrize("mode", [[], ["--disable-sandbox"]], ids=["process", "thread"])


@BOTH_MODES
def test_blk_reads_the_image_and_its_writes_reach_the_file(
    probe_elf: Path, tmp_path: Path, mode: list[str]
) -> None:
    image = make_pattern_image(tmp_path / "disk.img")
    details = _probe(probe_elf, "blk", *mode, "--rwdisk", str(image))
    assert details["blk"] == f"{64 * MiB // SECTOR} sectors serial pyvmm-vda"
    data = image.read_bytes()
    for s in (0, 1, PATTERN_SECTORS - 1):
        assert data[s * SECTOR : (s + 1) * SECTOR] == pattern(s)
    for s in (WRITTEN[0], WRITTEN[100], WRITTEN[-1]):
        assert data[s * SECTOR : (s + 1) * SECTOR] == pattern(s, 3)
    assert data[(WRITTEN[-1] + 1) * SECTOR : (WRITTEN[-1] + 2) * SECTOR] == bytes(SECTOR)


def test_read_only_disk_refuses_writes_and_stays_untouched(probe_elf: Path, tmp_path: Path) -> None:
    image = make_pattern_image(tmp_path / "ro.img")
    before = sha256(image)
    _probe(probe_elf, "blk-ro", "-d", str(image))
    assert sha256(image) == before


@BOTH_MODES
def test_rng_gives_varying_bytes_with_msix_interrupts(probe_elf: Path, mode: list[str]) -> None:
    details = _probe(probe_elf, "rng", *mode)
    assert int(details["rng"].split()[0]) >= 1


@BOTH_MODES
@pytest.mark.parametrize("work", ["rand32", "seqw"])
def test_two_disks_busy_at_once_complete_on_msix_interrupts(
    probe_elf: Path, tmp_path: Path, mode: list[str], work: str
) -> None:
    # The guest keeps both disks busy and halts between completions, so every request is
    # finished only by a used-buffer interrupt reaching it (a lost one stalls the run for the
    # probe's 10 ms watchdog each time, a broken MSI-X route fails it); writes land in both.
    disks = [tmp_path / "a.img", tmp_path / "b.img"]
    for disk in disks:
        disk.write_bytes(bytes(4 * MiB))
    flags = [f for disk in disks for f in ("--rwdisk", str(disk))]
    params = ["probe.bench=" + work, "probe.disks=2", "probe.wait=irq", f"probe.bytes={MiB}"]
    details = _probe(probe_elf, "blkbench", *mode, *flags, *(f for p in params for f in ("-p", p)))
    requests = 2 * (MiB // 4096 if work == "rand32" else MiB // (64 << 10))
    assert details["blkbench"] == f"{work} 2 disks {requests} requests {2 * MiB} bytes"
    if work == "seqw":
        for disk in disks:
            data = disk.read_bytes()
            # Each 64 KiB block starts with its request number (little-endian).
            assert [data[n << 16] for n in range(16)] == list(range(16))


@BOTH_MODES
def test_hostile_queues_leave_the_vmm_and_other_disks_working(
    probe_elf: Path, tmp_path: Path, mode: list[str]
) -> None:
    good = make_pattern_image(tmp_path / "good.img")
    victim = make_pattern_image(tmp_path / "victim.img")
    # virtq-hostile attacks the last disk; blk then uses the first.
    disks = ["--rwdisk", str(good), "--rwdisk", str(victim)]
    _probe(probe_elf, "virtq-hostile,blk,rng", *mode, *disks)


def test_missing_or_unwritable_images_fail_at_start(probe_elf: Path, tmp_path: Path) -> None:
    r = run_pyvmm("run", "--rwdisk", str(tmp_path / "nope.img"), str(probe_elf))
    assert r.returncode == 1
    assert r.stderr.strip() == f"pyvmm: --rwdisk {tmp_path / 'nope.img'}: no such file"
    r = run_pyvmm("run", "-r", str(tmp_path), str(probe_elf))
    assert r.returncode == 1
    assert "is a directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1


class SpinningVm:
    """A probe guest running `spin` (or the `probe` tests given) with a control socket, its
    serial lines collected."""

    def __init__(self, probe_elf: Path, sock: Path, *flags: str, probe: str = "spin") -> None:
        cmd = [sys.executable, "-m", "pyvmm", "run", "-s", str(sock), *flags]
        cmd += ["-p", f"probe={probe}", str(probe_elf)]
        self.sock = sock
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").strip()))

    def spins(self) -> int:
        return sum(1 for _, line in self.lines if line.startswith("PROBE spin "))

    def wait_for_spins(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.spins() < n:
            assert self.proc.poll() is None, f"pyvmm exited early: {self.stderr()}"
            assert time.monotonic() < deadline, f"only {self.spins()} spin lines"
            time.sleep(0.05)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace") if self.proc.poll() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spinning(probe_elf: Path, tmp_path: Path) -> Iterator[SpinningVm]:
    vm = SpinningVm(probe_elf, tmp_path / "ctl.sock")
    vm.wait_for_spins(2)
    yield vm
    vm.close()


def ctl(sock: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", command, str(sock)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_stop_ends_the_vm_with_status_0_and_removes_the_socket(spinning: SpinningVm) -> None:
    assert spinning.sock.exists()
    assert oct(spinning.sock.stat().st_mode & 0o777) == "0o600"
    r = ctl(spinning.sock, "stop")
    assert (r.returncode, r.stderr) == (0, "")
    assert spinning.proc.wait(timeout=20) == 0
    assert not spinning.sock.exists()


def test_suspend_halts_the_guest_and_resume_continues_it(spinning: SpinningVm) -> None:
    assert ctl(spinning.sock, "suspend").returncode == 0
    time.sleep(0.3)  # a line already on its way may still arrive
    halted = spinning.spins()
    time.sleep(1.0)
    assert spinning.spins() == halted, "the guest kept running while suspended"
    assert ctl(spinning.sock, "resume").returncode == 0
    spinning.wait_for_spins(halted + 3, timeout=5)
    assert ctl(spinning.sock, "stop").returncode == 0
    assert spinning.proc.wait(timeout=20) == 0


def test_stop_works_while_suspended(spinning: SpinningVm) -> None:
    assert ctl(spinning.sock, "suspend").returncode == 0
    assert ctl(spinning.sock, "stop").returncode == 0
    assert spinning.proc.wait(timeout=20) == 0


def test_bad_requests_get_errors_and_the_vm_goes_on(spinning: SpinningVm) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(spinning.sock))
        f = s.makefile("rwb")
        for request in (b"not json\n", b'{"cmd": "explode"}\n', b"[1, 2]\n"):
            f.write(request)
            f.flush()
            reply = json.loads(f.readline())
            assert reply["ok"] is False and reply["error"]
    before = spinning.spins()
    spinning.wait_for_spins(before + 2)
    assert ctl(spinning.sock, "stop").returncode == 0


def test_an_image_in_use_by_another_vm_is_refused(probe_elf: Path, tmp_path: Path) -> None:
    image = make_pattern_image(tmp_path / "shared.img")
    first = SpinningVm(probe_elf, tmp_path / "first.sock", "--rwdisk", str(image))
    try:
        first.wait_for_spins(1)
        r = run_pyvmm("run", "--rwdisk", str(image), str(probe_elf))
        assert r.returncode == 1
        assert r.stderr.strip() == f"pyvmm: --rwdisk {image}: in use by another VM (locked)"
        r = run_pyvmm("run", "-d", str(image), str(probe_elf))
        assert r.returncode == 1 and "in use by another VM" in r.stderr
    finally:
        first.close()


def test_a_stale_socket_is_replaced(probe_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()  # the file stays, nobody listens: what a killed VM leaves behind
    vm = SpinningVm(probe_elf, sock)
    try:
        vm.wait_for_spins(1)
        assert ctl(sock, "stop").returncode == 0
        assert vm.proc.wait(timeout=20) == 0
    finally:
        vm.close()


def test_control_commands_without_a_vm_fail_clearly(tmp_path: Path) -> None:
    r = ctl(tmp_path / "none.sock", "stop")
    assert r.returncode == 1
    assert r.stderr.strip().endswith("no such socket (is the VM running?)")
