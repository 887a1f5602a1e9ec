"""Keep each boot's console log, and report boots that hung once and passed on a rerun (see
pyvmm.harness.boots.run_boots)."""

from __future__ import annotations

import warnings

from pyvmm.harness.boots import BootResult
from tests.integration.conftest import save_serial_log


def warn_if_rerun(result: BootResult) -> None:
    save_serial_log(f"linux-{result.name}", result.output)
    if result.hung_attempt is not None:
        warnings.warn(
            f"boot {result.name} hung once and was run again:\n{result.hung_attempt}",
            stacklevel=2,
        )
