"""Hostile probe guests against the VMM, judged from the host: pyvmm must end (the guest's
reset) with status 0, the probe's test must pass, and pyvmm must neither flood its log nor
balloon in memory. Each run sits under a small wrapper that kills pyvmm if it hangs and
reports its peak RSS (the wrapper's only child, so RUSAGE_CHILDREN is pyvmm's own)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.integration.conftest import Run, needs_kvm, run_pyvmm
from tests.integration.test_virtio_probe import make_pattern_image

pytestmark = needs_kvm

# A guest of -m 256 barely touched: pyvmm's own peak is ~25-30 MiB. The limit leaves room for a
# VMM that touches all of guest RAM, and none for a copy of a 3.9 GiB request.
PEAK_RSS_LIMIT_MIB = 400
HANG_SECONDS = 60
# A handful of warnings (and a "suppressed N" line) is fine; one line per hostile act is not.
MAX_STDERR_LINES = 30

# argv: report file, timeout in seconds, command. Runs the command (output inherited), kills it
# on timeout, writes "<exit status or 'timeout'> <peak RSS KiB>" to the report file.
_WATCH = """
import resource, subprocess, sys
report, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
try:
    status = str(subprocess.run(cmd, timeout=timeout).returncode)
except subprocess.TimeoutExpired:
    status = "timeout"
with open(report, "w") as f:
    f.write(f"{status} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n")
sys.exit(status != "0")
"""


@dataclass
class Watched:
    run: Run
    status: str  # pyvmm's exit status, or "timeout" (killed after `hang` seconds)
    peak_rss_mib: float
    hang: float

    def stderr_lines(self) -> list[str]:
        return self.run.stderr.splitlines()

    def describe(self) -> str:
        err = self.stderr_lines()
        out = self.run.stdout.strip().splitlines()
        return (
            f"exit {self.status}, peak RSS {self.peak_rss_mib:.0f} MiB, {len(err)} stderr "
            f"lines, last: {err[-3:]}; last serial lines: {out[-3:]}"
        )


def _watch(tmp_path: Path, *args: str, hang: float = HANG_SECONDS) -> Watched:
    report = tmp_path / "watch.txt"
    wrapper = [sys.executable, "-c", _WATCH, str(report), str(hang)]
    r = run_pyvmm(*args, wrapper=wrapper, timeout=hang + 60)
    status, peak_kib = report.read_text().split()
    return Watched(r, status, int(peak_kib) / 1024, hang)


def _probe_ok(w: Watched, test: str) -> str:
    """The run ended by the guest's reset, PROBE <test> passed, pyvmm stayed within its memory
    and log limits: the test's details."""
    assert w.status != "timeout", (
        f"pyvmm did not exit within {w.hang:.0f} s and was killed: {w.describe()}"
    )
    assert w.status == "0", f"pyvmm failed: {w.describe()}"
    results = w.run.probe_results()
    assert test in results, f"no PROBE {test} result: {w.describe()}"
    status, details = results[test]
    assert status == "ok", f"PROBE {test} FAIL {details} ({w.describe()})"
    assert w.peak_rss_mib < PEAK_RSS_LIMIT_MIB, f"pyvmm grew too much: {w.describe()}"
    assert len(w.stderr_lines()) < MAX_STDERR_LINES, f"pyvmm logged too much: {w.describe()}"
    return details


def test_overlapping_rings_are_refused_and_the_reset_returns(
    probe_elf: Path, tmp_path: Path
) -> None:
    good = make_pattern_image(tmp_path / "good.img")
    victim = make_pattern_image(tmp_path / "victim.img")
    # virtq-overlap attacks the last disk; blk then checks the first still works.
    disks = ["--rwdisk", str(good), "--rwdisk", str(victim)]
    w = _watch(tmp_path, "run", *disks, "-p", "probe=virtq-overlap,blk", str(probe_elf))
    details = _probe_ok(w, "virtq-overlap")
    assert details.startswith("reset "), details
    assert w.run.probe_results()["blk"][0] == "ok", w.describe()


def test_impossible_rtc_values_neither_kill_the_vcpu_nor_flood_the_log(
    probe_elf: Path, tmp_path: Path
) -> None:
    # 10,000 impossible months (the probe's default), then 0xff in the seconds under SET; the
    # cmos test afterwards checks the clock reads a sane date again.
    w = _watch(tmp_path, "run", "-p", "probe=cmos-hostile,cmos", str(probe_elf))
    details = _probe_ok(w, "cmos-hostile")
    assert details.startswith("10000 writes"), details
    assert w.run.probe_results()["cmos"][0] == "ok", w.describe()


def test_discard_bombs_fail_fast_without_growing_the_vmm(probe_elf: Path, tmp_path: Path) -> None:
    image = make_pattern_image(tmp_path / "disk.img")
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    # A VMM that copies the segments can take a minute over one request (the probe then waits
    # 60 s, and its reset waits for the request): allow for that before calling it a hang.
    args = ["--rwdisk", str(image), "-p", "probe=blk-discard-bomb", str(probe_elf)]
    w = _watch(tmp_path, "run", *args, hang=3 * HANG_SECONDS)
    details = _probe_ok(w, "blk-discard-bomb")
    assert " discard " in details and " write-zeroes " in details, details
    # Refused requests change nothing (their segments would all be "0 sectors at 0" anyway).
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
