"""The balloon as a user drives it: its flags, `pyvmm balloon BYTES SOCKET` and `pyvmm
balloon_stats SOCKET` (absolute sizes; JSON out), and their one-line errors; and the probe
guest's balloon driver through them: the memory it gives leaves the host's memfd, comes back as
zeros, statistics are the guest's, and frame numbers outside RAM are refused and logged once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmm.control.client import send_command
from tests.integration.conftest import ROOT, run_pyvmm
from tests.integration.test_virtio_probe import SpinningVm

MiB = 1 << 20


def balloon_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def _one_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--low-mem-margin", "-1"], "--low-mem-margin -1: must be 0 to"),
        (["--balloon-policy-timers", "1,2"], "--balloon-policy-timers: '1,2' is not three"),
        (["--balloon-policy-timers", "1,0,3"], "--balloon-policy-timers: three lengths"),
    ],
)
def test_bad_balloon_flags(tmp_path: Path, flags: list[str], fragment: str) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    r = run_pyvmm("run", *flags, str(kernel))
    assert r.returncode in (1, 2)
    _one_line(r.stderr.splitlines()[-1], fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["balloon", "12x"], "argument BYTES: '12x' is not a size"),
        (["balloon", "-5"], "argument BYTES: '-5' is not a size"),
    ],
)
def test_a_bad_size_is_one_line_naming_it(tmp_path: Path, args: list[str], fragment: str) -> None:
    r = balloon_ctl(*args, str(tmp_path / "no.sock"))
    assert r.returncode == 2
    assert fragment in r.stderr.strip().splitlines()[-1]


def test_balloon_commands_to_a_missing_socket_fail_naming_it(tmp_path: Path) -> None:
    sock = tmp_path / "no.sock"
    for args in (["balloon", "1M"], ["balloon_stats"]):
        r = balloon_ctl(*args, str(sock))
        assert r.returncode == 1
        _one_line(r.stderr, str(sock))


@pytest.fixture
def spinning(probe_elf: Path, tmp_path: Path) -> Iterator[SpinningVm]:
    vm = SpinningVm(probe_elf, tmp_path / "ctl.sock")
    vm.wait_for_spins(2)
    yield vm
    vm.close()


def test_the_size_set_is_the_size_reported_before_any_driver(spinning: SpinningVm) -> None:
    """The probe's `spin` has no balloon driver: the target is kept, nothing is held, and the
    statistics are null rather than made up."""
    assert balloon_ctl("balloon", "64M", str(spinning.sock)).returncode == 0
    assert balloon_ctl("balloon", "32M", str(spinning.sock)).returncode == 0  # absolute
    r = balloon_ctl("balloon_stats", str(spinning.sock))
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["target"] == stats["requested"] == 32 * MiB
    assert stats["actual"] == 0 and stats["stats"] is None and stats["stats_fresh"] is False
    assert stats["guest_memory_on_host"] > 0


def test_a_balloon_larger_than_the_guest_is_refused(spinning: SpinningVm) -> None:
    r = balloon_ctl("balloon", "1G", str(spinning.sock))
    assert r.returncode == 1
    _one_line(r.stderr, "balloon 1073741824: more than the guest's 256 MiB of memory")
    assert spinning.proc.poll() is None, "the VM goes on"


def test_a_vm_without_a_balloon_says_so(probe_elf: Path, tmp_path: Path) -> None:
    vm = SpinningVm(probe_elf, tmp_path / "ctl.sock", "--no-balloon")
    try:
        vm.wait_for_spins(2)
        for args in (["balloon", "1M"], ["balloon_stats"]):
            r = balloon_ctl(*args, str(vm.sock))
            assert r.returncode == 1
            _one_line(r.stderr, "this VM has no balloon (it was started with --no-balloon)")
    finally:
        vm.close()


class BalloonVm(SpinningVm):
    """A probe guest running `balloon` (or `balloon-hostile`), its serial lines collected."""

    def __init__(self, probe_elf: Path, sock: Path, tests: str, *flags: str) -> None:
        super().__init__(probe_elf, sock, *flags, probe=tests)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for _, line in self.lines if text in line]
            if found:
                return found[0]
            assert self.proc.poll() is None or self._reader.is_alive(), (
                f"pyvmm ended before {text!r}: {self.lines[-5:]}"
            )
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines[-5:]}"
            time.sleep(0.02)

    def stats(self) -> dict[str, Any]:
        r = balloon_ctl("balloon_stats", str(self.sock))
        assert r.returncode == 0, r.stderr
        stats: dict[str, Any] = json.loads(r.stdout)
        return stats


POOL_MIB = 64  # the probe's default pool


@pytest.mark.parametrize("flags", [[], ["--balloon-page-reporting"], ["--disable-sandbox"]])
def test_the_probe_driver_inflates_and_deflates_and_the_host_memory_follows(
    probe_elf: Path, tmp_path: Path, flags: list[str]
) -> None:
    vm = BalloonVm(probe_elf, tmp_path / "ctl.sock", "balloon,spin", *flags)  # spin: it waits
    try:
        vm.wait_for(f"PROBE balloon ready {POOL_MIB} MiB")
        before = vm.stats()
        assert before["stats"]["total_memory"] > 200 * MiB, "the guest's own statistics"

        assert balloon_ctl("balloon", "32M", str(vm.sock)).returncode == 0
        vm.wait_for("PROBE balloon inflated 8192 pages")
        inflated = vm.stats()
        assert inflated["actual"] == 32 * MiB
        freed = before["guest_memory_on_host"] - inflated["guest_memory_on_host"]
        assert 31 * MiB <= freed <= 33 * MiB, f"the memfd gave back {freed / MiB:.1f} MiB"
        assert inflated["stats_fresh"] is True
        assert inflated["stats"]["free_memory"] == (POOL_MIB - 32) * MiB
        assert inflated["stats"]["minor_faults"] > before["stats"]["minor_faults"]
        # Without asking the guest: at once, the same sizes, the statistics it had.
        cached = send_command(str(vm.sock), {"cmd": "balloon_stats", "fresh": False})["balloon"]
        assert cached["actual"] == 32 * MiB and cached["stats_fresh"] is False
        assert cached["stats"] == inflated["stats"]

        assert balloon_ctl("balloon", "0", str(vm.sock)).returncode == 0
        vm.wait_for("PROBE balloon deflated 0 pages zero 8192/8192")  # they read zero
        ok = vm.wait_for("PROBE balloon ok")
        assert "inflated 8192 deflated 8192" in ok and "zero ok" in ok
        report = "report ok" if "--balloon-page-reporting" in flags else "report not offered"
        assert report in ok
        # The guest read the pages (zeros) and wrote them again: the host holds them again.
        again = vm.stats()["guest_memory_on_host"]
        assert again - inflated["guest_memory_on_host"] >= 31 * MiB
        assert balloon_ctl("stop", str(vm.sock)).returncode == 0
        assert vm.proc.wait(30) == 0
    finally:
        vm.close()


def test_frames_outside_ram_are_refused_logged_once_and_the_vm_goes_on(
    probe_elf: Path, tmp_path: Path
) -> None:
    vm = BalloonVm(probe_elf, tmp_path / "ctl.sock", "balloon-hostile")
    try:
        ok = vm.wait_for("PROBE balloon-hostile ")
        assert "PROBE balloon-hostile ok" in ok and "then 16 pages zero 16/16" in ok, ok
        assert vm.proc.wait(30) == 0
        stderr = vm.proc.stderr.read().decode() if vm.proc.stderr else ""
    finally:
        vm.close()
    refused = [line for line in stderr.splitlines() if "not guest RAM" in line]
    assert len(refused) <= 2, stderr  # once, and the count of the rest when the VM ends
    assert refused and "refused" in refused[0]
