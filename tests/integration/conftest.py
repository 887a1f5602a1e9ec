"""Shared fixtures for integration tests: the probe guest and a way to run `pyvmm`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE_ELF = ROOT / "guest" / "build" / "probe.elf"
PROBE_LINE = re.compile(r"^PROBE (\S+) (ok|FAIL)(?: (.*))?$")


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    path = os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm")
    if not os.path.exists(path):
        return f"{path} is absent on this host"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not accessible to uid {os.getuid()}"
    return None


needs_kvm = pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable()))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def probe_results(self) -> dict[str, tuple[str, str]]:
        """{test: (ok|FAIL, details)} from the probe guest's serial output."""
        results = {}
        for line in self.stdout.splitlines():
            m = PROBE_LINE.match(line.strip())
            if m:
                results[m.group(1)] = (m.group(2), m.group(3) or "")
        return results


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def results_dir() -> Path:
    """Where test artifacts go (bin/build_test copies this out of containers)."""
    return ROOT / os.environ.get("PYVMM_TEST_RESULTS", "build/test-results")


def save_serial_log(name: str, text: str) -> None:
    """Keep a guest's serial output as build/test-results/serial/<name>.log."""
    directory = results_dir() / "serial"
    directory.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:150]
    (directory / f"{safe}.log").write_text(text)


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "pyvmm").split(" ")[0]


def run_pyvmm(
    *args: str,
    timeout: float = 120,
    stdin: int | None = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    wrapper: list[str] | None = None,
) -> Run:
    """Run `python -m pyvmm ARGS`, optionally with extra environment or under a wrapper."""
    proc = subprocess.run(
        [*(wrapper or []), sys.executable, "-m", "pyvmm", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    save_serial_log(_current_test(), proc.stdout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


# Runs its arguments as a child that dies with it (a timeout kills only this wrapper) and
# writes the child's own peak RSS (KiB) to the file named first.
_PEAK_RSS_WRAPPER = """
import ctypes, os, signal, sys
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_pyvmm_measured(*args: str, rss_file: Path, timeout: float = 120) -> tuple[Run, int]:
    """`run_pyvmm`, and the peak resident memory of the pyvmm process in bytes."""
    wrapper = [sys.executable, "-c", _PEAK_RSS_WRAPPER, str(rss_file)]
    run = run_pyvmm(*args, timeout=timeout, wrapper=wrapper)
    return run, int(rss_file.read_text()) * 1024


@pytest.fixture(scope="session")
def probe_elf() -> Path:
    """The probe guest, built by make (bin/build_test builds it first; this keeps it fresh)."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True)
    assert PROBE_ELF.exists(), f"make -C guest did not produce {PROBE_ELF}"
    return PROBE_ELF
