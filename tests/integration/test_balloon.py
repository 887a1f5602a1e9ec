"""The balloon as a user drives it: its flags, `pyvmm balloon BYTES SOCKET` and `pyvmm
balloon_stats SOCKET` (absolute sizes; JSON out), and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
