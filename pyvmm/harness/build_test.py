"""What `bin/build_test` runs: each suite in turn, then a summary table and one closing line.

Suites: lint (ruff), type (mypy --strict), unit, integration (the probe guest and the CLI) and
linux (a stock Debian kernel, natively or in the test VM); pytest's JUnit XML is kept under
build/test-results. `--quick` stops after the unit tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "build" / "test-results"
LINT_PATHS = ["pyvmm", "tests", "bench"]
LINUX_TESTS = "tests/integration/linux"


@dataclass
class SuiteResult:
    name: str
    ok: bool
    seconds: float
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def _run(cmd: Sequence[str]) -> bool:
    print(f"+ {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode == 0


def _python_tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _count_junit(path: Path) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, skip reasons) from a pytest JUnit XML file."""
    if not path.exists():
        return 0, 0, 0, []
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    reasons: set[str] = set()
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif (skip := case.find("skipped")) is not None:
            skipped += 1
            reasons.add(skip.get("message", "").strip())
        else:
            passed += 1
    return passed, failed, skipped, sorted(r for r in reasons if r)


def run_lint() -> SuiteResult:
    start = time.monotonic()
    ruff = _python_tool("ruff")
    ok = _run([ruff, "check", *LINT_PATHS]) & _run([ruff, "format", "--check", *LINT_PATHS])
    return SuiteResult("lint", ok, time.monotonic() - start)


def run_type() -> SuiteResult:
    start = time.monotonic()
    ok = _run([_python_tool("mypy")])
    return SuiteResult("type", ok, time.monotonic() - start)


def run_pytest(
    name: str, path: str, workers: int | None = None, extra: Sequence[str] = ()
) -> SuiteResult:
    start = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    xml = RESULTS / f"{name}.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", path, f"--junitxml={xml}", *extra]
    if workers:
        cmd += ["-n", str(workers)]
    ok = _run(cmd)
    passed, failed, skipped, reasons = _count_junit(xml)
    if passed + failed == 0:
        ok = False
        reasons.append("no test ran")
    return SuiteResult(name, ok, time.monotonic() - start, passed, failed, skipped, reasons)


def build_probe_guest() -> bool:
    return _run(["make", "-s", "-C", "guest"])


def print_summary(results: list[SuiteResult], wall: float) -> None:
    print()
    print(f"{'suite':<12} {'result':<7} {'passed':>7} {'failed':>7} {'skipped':>8} {'time':>8}")
    for r in results:
        print(
            f"{r.name:<12} {'ok' if r.ok else 'FAILED':<7} {r.passed:>7} {r.failed:>7} "
            f"{r.skipped:>8} {r.seconds:>7.1f}s"
        )
        for note in r.notes:
            print(f"{'':<12} note: {note}")
    passed = sum(r.passed for r in results)
    failed = sum(r.failed for r in results) + sum(1 for r in results if not r.ok and not r.failed)
    skipped = sum(r.skipped for r in results)
    print(f"wall time {wall:.1f}s")
    print(f"build_test: {passed} passed, {failed} failed, {skipped} skipped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/build_test")
    parser.add_argument("--quick", action="store_true", help="lint, types and unit tests only")
    args = parser.parse_args(argv)
    start = time.monotonic()
    workers = min(os.cpu_count() or 1, 2)
    results = [run_lint(), run_type(), run_pytest("unit", "tests/unit", workers)]
    if not args.quick:
        t = time.monotonic()
        if build_probe_guest():
            results.append(
                run_pytest("integration", "tests/integration", extra=["--ignore", LINUX_TESTS])
            )
        else:
            results.append(
                SuiteResult(
                    "integration", False, time.monotonic() - t, notes=["guest build failed"]
                )
            )
        # One test VM (or one series of native boots) for the whole Linux suite: no xdist.
        results.append(run_pytest("linux", LINUX_TESTS))
    print_summary(results, time.monotonic() - start)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
