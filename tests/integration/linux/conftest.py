"""Keep each boot's console log, and report boots that hung once and passed on a rerun (see
pyvmm.harness.boots.run_boots)."""

from __future__ import annotations

import re
import warnings
from typing import Any

from pyvmm.harness.boots import BootResult
from tests.integration.conftest import save_serial_log


def warn_if_rerun(result: BootResult) -> None:
    save_serial_log(f"linux-{result.name}", result.output)
    if result.hung_attempt is not None:
        warnings.warn(
            f"boot {result.name} hung once and was run again:\n{result.hung_attempt}",
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
