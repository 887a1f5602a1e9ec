"""Boot the probe guest under pyvmm and check what it reports about the machine it finds."""

from __future__ import annotations

import datetime
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, needs_kvm, run_pyvmm

pytestmark = needs_kvm

ALL_TESTS = ["serial", "cmos", "e820", "cpus", "cmdline", "timer"]


def _boot(probe_elf: Path, tests: list[str], *flags: str, timeout: float = 120) -> dict[str, str]:
    r = run_pyvmm("run", *flags, "-p", "probe=" + ",".join(tests), str(probe_elf), timeout=timeout)
    assert r.returncode == 0, f"pyvmm exited {r.returncode}: {r.stderr.strip()}\n{r.stdout}"
    results = r.probe_results()
    for test in tests:
        assert test in results, f"no result for {test} in:\n{r.stdout}"
        status, details = results[test]
        assert status == "ok", f"PROBE {test} FAIL {details}"
    return {t: d for t, (_, d) in results.items()}


def test_all_probe_tests_pass_with_defaults(probe_elf: Path) -> None:
    details = _boot(probe_elf, ALL_TESTS, "-p", "probe.mem=256", "-p", "probe.cpus=1")
    assert details["cpus"].split()[0] == "1"
    assert "probe=serial,cmos,e820,cpus,cmdline,timer" in details["cmdline"]
    assert "console=ttyS0" in details["cmdline"]


def test_rtc_shows_the_hosts_utc_time(probe_elf: Path) -> None:
    details = _boot(probe_elf, ["cmos"])
    guest = datetime.datetime.strptime(details["cmos"][:19], "%Y-%m-%d %H:%M:%S")
    host = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((host - guest).total_seconds()) < 30


def test_two_vcpus_in_the_mp_table(probe_elf: Path) -> None:
    details = _boot(probe_elf, ["cpus", "timer"], "-c", "2", "-p", "probe.cpus=2")
    assert details["cpus"].split()[0] == "2"


def test_ram_above_4g_is_usable(probe_elf: Path) -> None:
    details = _boot(probe_elf, ["e820", "cmos"], "-m", "4096", "-p", "probe.mem=4096", timeout=300)
    top = int(details["e820"].split("top ")[1].split()[0], 16)
    assert top > 1 << 32


def test_repeated_params_reach_the_command_line(probe_elf: Path) -> None:
    details = _boot(probe_elf, ["cmdline"], "-p", "alpha=1", "-p", "beta two")
    assert "alpha=1 beta two" in details["cmdline"]


def test_unknown_probe_test_is_reported_and_the_vm_still_resets(probe_elf: Path) -> None:
    r = run_pyvmm("run", "-p", "probe=nosuchtest", str(probe_elf))
    assert r.returncode == 0
    assert r.probe_results()["nosuchtest"][0] == "FAIL"


def _start_long_guest(probe_elf: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pyvmm", "run", "-p", "probe=outloop"]
    cmd += ["-p", "probe.count=100000000", str(probe_elf)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_vm_in_order(probe_elf: Path, sig: signal.Signals) -> None:
    proc = _start_long_guest(probe_elf, stdin=subprocess.DEVNULL)
    time.sleep(2)
    assert proc.poll() is None, "the guest should still be running"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + sig
    assert err.decode().strip() == f"pyvmm: stopped by {sig.name}"


def test_terminal_is_restored_after_a_signal(probe_elf: Path) -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    try:
        proc = _start_long_guest(probe_elf, stdin=slave)
        deadline = time.monotonic() + 10
        while termios.tcgetattr(slave) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert termios.tcgetattr(slave) != before, "pyvmm should put the terminal in raw mode"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGTERM
        assert termios.tcgetattr(slave) == before
    finally:
        while select.select([master], [], [], 0)[0]:
            if not os.read(master, 4096):
                break
        os.close(master)
        os.close(slave)
