"""What `bin/build_test` runs: the suites, then a summary table and one closing line.

Suites: lint (ruff), type (mypy --strict), unit, integration (the probe guest and the CLI),
linux (a stock Debian kernel, natively or in the test VM) and containers (the images, and runs
in them); pytest's JUnit XML is kept under build/test-results (`PYVMM_TEST_RESULTS` names another
directory under the tree) with summary.json beside it. `--quick` stops after the unit tests.
The unit and integration suites run in as many pytest-xdist workers as there are cores, two at
most.

The linux suite is the long one: its test files run in LINUX_WORKERS pytest-xdist workers, a
test VM each (QEMU's emulation of a guest with one vCPU keeps about one core busy). It starts
after the integration suite, beside the containers suite (light once its images are cached),
its output kept in linux.log and printed when it ends.

`--container` runs the same suites inside the test image (docker/Dockerfile.test), with /dev/kvm
and /dev/net/tun passed in and the work tree mounted at its own path, so the results land in the
tree as they would on the host; the exit status is the suite's. Inside, the linux suite (QEMU's
software emulation inside a container: too slow for this) and the containers suite (no engine
inside) are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "PYVMM_TEST_RESULTS"
RESULTS = ROOT / os.environ.get(RESULTS_ENV, "build/test-results")
SUMMARY_FILE = "summary.json"
LINT_PATHS = ["pyvmm", "tests", "bench"]
LINUX_TESTS = "tests/integration/linux"
LINUX_WORKERS_ENV = "PYVMM_LINUX_WORKERS"
LINUX_WORKERS = 2  # test VMs at once; each test file's boots share one
CONTAINER_TESTS = "tests/integration/containers"
IN_CONTAINER_SKIPS = {
    "linux": "not run inside the container: the test VM (QEMU TCG) there is too slow; "
    "run bin/build_test on the host",
    "containers": "not run inside the container: no container engine inside it",
}


@dataclass
class SuiteResult:
    name: str
    ok: bool
    seconds: float
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    ran: bool = True  # False: the whole suite was skipped (the first note says why)


def skipped_suite(name: str, reason: str) -> SuiteResult:
    return SuiteResult(name, True, 0.0, notes=[reason], ran=False)


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


def _pytest_command(
    name: str, path: str, workers: int | None, extra: Sequence[str]
) -> tuple[list[str], Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    xml = RESULTS / f"{name}.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", path, f"--junitxml={xml}", *extra]
    if workers:
        cmd += ["-n", str(workers)]
    return cmd, xml


def _suite_result(name: str, ok: bool, start: float, xml: Path) -> SuiteResult:
    passed, failed, skipped, reasons = _count_junit(xml)
    if passed + failed == 0:
        ok = False
        reasons.append("no test ran")
    return SuiteResult(name, ok, time.monotonic() - start, passed, failed, skipped, reasons)


def run_pytest(
    name: str, path: str, workers: int | None = None, extra: Sequence[str] = ()
) -> SuiteResult:
    start = time.monotonic()
    cmd, xml = _pytest_command(name, path, workers, extra)
    return _suite_result(name, _run(cmd), start, xml)


class BackgroundSuite:
    """A pytest suite running beside the others, its output in RESULTS/<name>.log, printed
    whole by result() (so that the suites' outputs do not interleave)."""

    def __init__(
        self, name: str, path: str, workers: int | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.start = time.monotonic()
        cmd, self.xml = _pytest_command(name, path, workers, extra)
        self.log = RESULTS / f"{name}.log"
        print(f"+ {' '.join(cmd)} > {self.log.relative_to(ROOT)} (in the background)", flush=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def result(self) -> SuiteResult:
        status = self.proc.wait()
        print(f"--- {self.name} (from {self.log.relative_to(ROOT)}) ---", flush=True)
        sys.stdout.write(self.log.read_text(errors="replace"))
        sys.stdout.flush()
        return _suite_result(self.name, status == 0, self.start, self.xml)


def linux_workers() -> int:
    """How many test VMs the linux suite runs at once ($PYVMM_LINUX_WORKERS, else
    LINUX_WORKERS), never more than the machine has cores."""
    wanted = int(os.environ.get(LINUX_WORKERS_ENV) or LINUX_WORKERS)
    return max(1, min(wanted, os.cpu_count() or 1))


def build_probe_guest() -> bool:
    return _run(["make", "-s", "-C", "guest"])


def run_containers_suite() -> SuiteResult:
    """The container integration tests, or a skipped suite saying what to install."""
    from pyvmm.harness.containers import ContainerError, select_engine

    try:
        select_engine()
    except ContainerError as e:
        print(f"build_test: containers: {e}", flush=True)
        return skipped_suite("containers", str(e))
    return run_pytest("containers", CONTAINER_TESTS)


def run_in_container(quick: bool) -> tuple[list[SuiteResult], int]:
    """Build (or reuse) the test image and run this suite inside it; the inner suites' rows
    come back through summary.json, the exit status is the inner run's."""
    import platform

    from pyvmm.harness.containers import (
        KVM_DEVICE,
        TEST_IMAGE,
        TEST_TAG,
        TUN_DEVICE,
        ContainerError,
        Engine,
        NoEngineError,
    )

    results: list[SuiteResult] = []
    start = time.monotonic()
    summary = RESULTS / SUMMARY_FILE
    try:
        with Engine() as engine:
            arch = platform.machine()
            built = engine.build(TEST_IMAGE, arch)
            size = engine.image_size(TEST_TAG) / 1e6
            how = "built" if built else "cached"
            results.append(
                SuiteResult(
                    "image",
                    True,
                    time.monotonic() - start,
                    notes=[f"{TEST_TAG} {how}, {size:.0f} MB"],
                )
            )
            devices = [KVM_DEVICE] + ([TUN_DEVICE] if os.path.exists(TUN_DEVICE) else [])
            command = ["python", "-m", "pyvmm.harness.build_test", "--in-container"]
            command += ["--quick"] if quick else []
            summary.unlink(missing_ok=True)
            print(f"+ [{TEST_TAG}] {' '.join(command)}", flush=True)
            run = engine.run(
                TEST_TAG,
                command,
                devices=devices,
                cap_add=["NET_ADMIN"],
                mounts={str(ROOT): str(ROOT)},
                workdir=str(ROOT),
                env={RESULTS_ENV: str(RESULTS.relative_to(ROOT)), "CI": os.environ.get("CI", "")},
                echo=lambda line: print(f"  | {line}", flush=True),
            )
    except NoEngineError as e:
        print(f"build_test: {e}", flush=True)
        results.append(SuiteResult("container", False, time.monotonic() - start, notes=[str(e)]))
        return results, 1
    except ContainerError as e:
        print(f"build_test: {e}", flush=True)
        results.append(SuiteResult("container", False, time.monotonic() - start, notes=[str(e)]))
        return results, 1
    try:
        inner = json.loads(summary.read_text())
        results += [SuiteResult(**row) for row in inner["suites"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"no readable {summary.relative_to(ROOT)} from the container ({e})"
        results.append(
            SuiteResult("container", False, run.seconds, notes=[why, f"exit status {run.status}"])
        )
        return results, run.status or 1
    return results, run.status


def write_summary(results: list[SuiteResult], wall: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [vars(r) for r in results]
    (RESULTS / SUMMARY_FILE).write_text(json.dumps({"suites": rows, "wall": wall}, indent=1))


def print_summary(results: list[SuiteResult], wall: float) -> None:
    print()
    print(f"{'suite':<12} {'result':<7} {'passed':>7} {'failed':>7} {'skipped':>8} {'time':>8}")
    for r in results:
        result = ("ok" if r.ok else "FAILED") if r.ran else "skipped"
        print(
            f"{r.name:<12} {result:<7} {r.passed:>7} {r.failed:>7} "
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
    parser.add_argument(
        "--container", action="store_true", help="run the suite inside the test image"
    )
    parser.add_argument("--in-container", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.container:
        results, status = run_in_container(args.quick)
        print_summary(results, time.monotonic() - start)
        return status
    workers = min(os.cpu_count() or 1, 2)
    results = [run_lint(), run_type(), run_pytest("unit", "tests/unit", workers)]
    if not args.quick:
        t = time.monotonic()
        if build_probe_guest():
            ignore = ["--ignore", LINUX_TESTS, "--ignore", CONTAINER_TESTS]
            results.append(run_pytest("integration", "tests/integration", workers, ignore))
        else:
            results.append(
                SuiteResult(
                    "integration", False, time.monotonic() - t, notes=["guest build failed"]
                )
            )
        if args.in_container:
            results += [skipped_suite(n, why) for n, why in IN_CONTAINER_SKIPS.items()]
        else:
            # Each test file's boots share a test VM: whole files to each worker. The native
            # integration suite runs first, alone: beside two test VMs, its probe VMs and the
            # test VMs' guests all miss their time bounds.
            n = linux_workers()
            dist = ["--dist", "loadfile"] if n > 1 else []
            linux = BackgroundSuite("linux", LINUX_TESTS, n if n > 1 else None, dist)
            containers = run_containers_suite()
            results += [linux.result(), containers]
    wall = time.monotonic() - start
    write_summary(results, wall)
    print_summary(results, wall)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
