"""Run Linux guest boots where a stock kernel can boot: on this host's KVM, or in the test VM.

`choose_placement()` decides and says why; `LinuxHarness.run()` runs a list of BootSpecs there
and returns their results. The kit's kernel and initramfs are built (or found cached) first.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvmm.harness.boots import BootResult, BootSpec, run_boots
from pyvmm.harness.kit import GuestKit
from pyvmm.harness.testvm import TestVm, TestVmError

ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = ROOT / "guest" / "linux" / "init"
TESTVM_OVERHEAD_S = 180.0
# Drivers the guest checks need that Debian builds as modules.
GUEST_MODULES = ["virtio_pci", "virtio_blk", "virtio_rng", "ext4"]


@dataclass(frozen=True)
class Placement:
    native: bool
    reason: str

    def describe(self) -> str:
        where = "natively on this host's KVM" if self.native else "inside the test VM"
        return f"Linux guests run {where}: {self.reason}"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_placement(kvm_path: str = "/dev/kvm") -> Placement:
    """Native when the host's KVM can boot a stock kernel, else the test VM."""
    if os.environ.get("PYVMM_TEST_KERNEL"):
        return Placement(True, f"PYVMM_TEST_KERNEL={os.environ['PYVMM_TEST_KERNEL']} boots here")
    if not os.path.exists(kvm_path):
        return Placement(False, f"{kvm_path} is absent")
    flags = _cpu_flags()
    if flags & {"vmx", "svm"}:
        found = "VMX" if "vmx" in flags else "SVM"
        return Placement(True, f"the host CPU has {found}, so its KVM boots stock kernels")
    return Placement(
        False,
        "the host CPU has neither VMX nor SVM (its KVM, e.g. PVM, cannot boot a stock kernel)",
    )


@dataclass(frozen=True)
class GuestFiles:
    bzimage: Path
    vmlinux: Path
    initramfs: Path


class LinuxHarness:
    """Builds the guest kit's files and runs boots natively or in the test VM."""

    def __init__(
        self,
        kit: GuestKit | None = None,
        placement: Placement | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.kit = kit or GuestKit(progress=progress)
        self.placement = placement or choose_placement()

    def guest_files(self) -> GuestFiles:
        kernel = self.kit.kernel()
        initramfs = self.kit.build_initramfs("guest", GUEST_INIT.read_text(), GUEST_MODULES)
        override = os.environ.get("PYVMM_TEST_KERNEL")
        bzimage = Path(override) if override else kernel.bzimage
        vmlinux = Path(override) if override else kernel.vmlinux
        return GuestFiles(bzimage, vmlinux, initramfs)

    def pyvmm_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pyvmm", "run", *args]

    def run(self, specs: list[BootSpec]) -> list[BootResult]:
        if self.placement.native:
            return run_boots(specs)
        return self._run_in_testvm(specs)

    def _run_in_testvm(self, specs: list[BootSpec]) -> list[BootResult]:
        scratch_root = self.kit.cache_dir / "scratch"
        scratch_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch_root) as d:
            scratch = Path(d)
            spec_file = scratch / "specs.json"
            result_file = scratch / "results.json"
            spec_file.write_text(json.dumps([s.__dict__ for s in specs]))
            timeout = sum(s.timeout for s in specs) + TESTVM_OVERHEAD_S
            result = TestVm(self.kit).run(
                [sys.executable, "-m", "pyvmm.harness.boots", str(spec_file), str(result_file)],
                scratch=scratch,
                timeout=timeout,
                cwd=ROOT,
            )
            if result.returncode != 0 or not result_file.exists():
                raise TestVmError(
                    f"the boots inside the test VM failed (status {result.returncode}): "
                    + result.output.strip()[-2000:]
                )
            return [BootResult(**r) for r in json.loads(result_file.read_text())]
