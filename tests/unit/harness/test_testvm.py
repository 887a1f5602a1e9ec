"""The x86_64 test VM, offline: how many vCPUs it gets."""

from __future__ import annotations

import os

import pytest

from pyvmm.harness.testvm import MAX_CPUS, default_cpus


@pytest.mark.parametrize(
    ("cores", "workers", "cpus"),
    [(2, None, 2), (2, "2", 1), (2, "4", 1), (8, "2", 4), (16, None, MAX_CPUS)],
)
def test_test_vms_side_by_side_share_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: str | None, cpus: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert default_cpus() == cpus
