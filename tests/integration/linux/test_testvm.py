"""The test VM runs a command in the host's tree with KVM available, and never outlives its
timeout."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.harness.kit import GuestKit
from pyvmm.harness.linux import choose_placement
from pyvmm.harness.testvm import TestVm, TestVmError

pytestmark = pytest.mark.skipif(
    choose_placement().native, reason="this host boots Linux natively; no test VM needed"
)


@pytest.fixture(scope="module")
def kit() -> GuestKit:
    return GuestKit()


@pytest.fixture
def scratch(kit: GuestKit) -> Iterator[Path]:
    root = kit.cache_dir / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as d:
        yield Path(d)


def test_command_runs_with_kvm_and_its_status_comes_back(kit: GuestKit, scratch: Path) -> None:
    script = "test -c /dev/kvm && echo kvm-present; echo written > {}/out.txt; exit 7"
    result = TestVm(kit).run(
        ["/bin/sh", "-c", script.format(scratch)], scratch=scratch, timeout=180
    )
    assert result.returncode == 7
    assert "kvm-present" in result.output
    assert (scratch / "out.txt").read_text() == "written\n"


def test_a_hung_command_is_killed_at_the_timeout(kit: GuestKit, scratch: Path) -> None:
    with pytest.raises(TestVmError, match="did not finish within 20 s"):
        TestVm(kit).run(["sleep", "3600"], scratch=scratch, timeout=20)
    leftover = subprocess.run(
        ["pgrep", "-f", f"qemu-system-x86_64.*{scratch}"], capture_output=True, text=True
    )
    assert leftover.stdout.strip() == "", "a QEMU process outlived the timeout"
