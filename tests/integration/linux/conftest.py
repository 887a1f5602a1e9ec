"""Keep each boot's console log, and report boots that hung once and passed on a rerun (see
pyvmm.harness.boots.run_boots)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from pyvmm.harness.boots import BootResult
from pyvmm.harness.build_test import RESULTS
from pyvmm.harness.linux import TIMINGS
from tests.integration.conftest import save_serial_log


def warn_if_rerun(result: BootResult) -> None:
    save_serial_log(f"linux-{result.name}", result.output)
    if result.hung_attempt is not None:
        warnings.warn(
            f"boot {result.name} failed once and was run again: {result.hung_attempt}",
            stacklevel=2,
        )


def completed(result: BootResult) -> None:
    """The boot ran to its end and pyvmm exited 0 (rerun warnings and its log kept)."""
    warn_if_rerun(result)
    assert not result.timed_out, (
        f"{result.name} timed out; output:\n{result.output[-3000:]}\n{result.stderr[-6000:]}"
    )
    assert result.returncode == 0, (
        f"{result.name}: pyvmm exited {result.returncode}: {result.stderr.strip()}\n"
        + result.output[-3000:]
    )


def guest_check(result: BootResult, name: str) -> str:
    """The details of the guest's `GUEST <name> ok ...` line; fails on FAIL or no line."""
    assert name in result.checks, (
        f"{result.name}: no GUEST {name} line in:\n{result.output}\n"
        f"pyvmm's stderr: {result.stderr.strip()[-3000:]}"
    )
    status, details = result.checks[name]
    assert status == "ok", (
        f"{result.name}: GUEST {name} FAIL {details}\npyvmm's stderr: {result.stderr.strip()}"
    )
    return details


def peer_ok(result: BootResult, marker: str, report: dict[str, Any], peer: str) -> dict[str, Any]:
    """The report of the host program (`peer`) the guest's `marker` line started, once it is
    known to have run to a good end."""
    command = next((c for c in result.commands if c.marker == marker), None)
    assert command is not None, f"{result.name}: the guest never said '{marker}'"
    assert command.returncode == 0 and "error" not in report, (
        f"{result.name}: {peer} ({marker}) exited {command.returncode}: {command.output}\n"
        f"pyvmm's stderr: {result.stderr.strip()[-3000:]}"
    )
    return report


def guest_match(result: BootResult, name: str, pattern: re.Pattern[str]) -> re.Match[str]:
    """The guest's `GUEST <name> ok ...` details, matched whole by `pattern`."""
    details = guest_check(result, name)
    m = pattern.fullmatch(details)
    assert m, f"{result.name}: GUEST {name} ok line not understood: {details}"
    return m


def _timings_dir() -> Path:
    return RESULTS / "linux-timings"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the run itself, not an xdist worker
        shutil.rmtree(_timings_dir(), ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Each process (each xdist worker) leaves its runs' timings for the summary."""
    if not TIMINGS:
        return
    worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
    _timings_dir().mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "arch": run.arch,
            "wall_s": run.wall_s,
            "boots": [[r.name, r.wall_s, r.to_init_s, r.timeline] for r in run.results],
        }
        for run in TIMINGS
    ]
    (_timings_dir() / f"{worker}.json").write_text(json.dumps(rows))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Where the Linux suite's time went: each harness run (a test VM's whole life, unless the
    host boots the kernel itself) and each boot in it, as every worker saw them."""
    files = sorted(_timings_dir().glob("*.json")) if _timings_dir().is_dir() else []
    if not files:
        return
    write = terminalreporter.write_line
    write("Linux boots (wall s; to init s; when each check's line came, s):")
    for path in files:
        for run in json.loads(path.read_text()):
            boots = sum(b[1] for b in run["boots"])
            write(f"  {path.stem}: {run['arch']} run {run['wall_s']:.0f} s, boots {boots:.0f} s:")
            for name, wall, to_init, timeline in run["boots"]:
                init = "-" if to_init is None else f"{to_init:.0f}"
                checks = ", ".join(f"{check} {t:.0f}" for t, check in timeline)
                write(f"    {name:<28} {wall:6.1f} {init:>5}  {checks}")
