"""The arm64 test VM and its root, offline: the QEMU command line, the init script, where arm64
guests are placed, and what a missing ingredient says."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.harness import armroot, linux, testvm_arm64
from pyvmm.harness.kit import GuestKit, Kernel
from pyvmm.harness.testvm import TestVmError, WatchedFiles
from pyvmm.harness.testvm_arm64 import TESTVM_ARM64_INIT, Arm64TestVm

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="an x86_64 host's view")


class FakeKit(GuestKit):
    def kernel(self) -> Kernel:
        base = self.cache_dir / "kernel" / "6.1.0-99-arm64"
        return Kernel("6.1.0-99-arm64", base / "vmlinuz", base / "Image", base / "root")


def test_the_init_script_is_valid_shell_with_nothing_left_to_fill() -> None:
    assert "{" not in TESTVM_ARM64_INIT.replace("${", "").replace("() {", "")
    subprocess.run(["sh", "-n"], input=TESTVM_ARM64_INIT, text=True, check=True)


def test_qemu_boots_the_image_at_el2_with_the_root_and_the_shares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(testvm_arm64, "build_root", lambda kit: tmp_path / "root.ext4")
    kit = FakeKit(tmp_path / "cache", arch="aarch64")
    vm = Arm64TestVm(kit, tmp_path / "project", cpus=2)
    watched = WatchedFiles(tmp_path / "console", tmp_path / "beat", tmp_path / "out")
    cmd = vm.qemu_command(tmp_path / "initrd", tmp_path / "scratch", tmp_path / "w", watched)
    line = " ".join(cmd)
    assert cmd[0] == "qemu-system-aarch64"
    assert "-M virt,virtualization=on,gic-version=3" in line
    assert f"-kernel {kit.kernel().vmlinux}" in line
    assert f"file={tmp_path / 'root.ext4'},if=none,id=root,format=raw,readonly=on" in line
    assert f"path={tmp_path / 'project'},mount_tag=project,security_model=none,readonly=on" in line
    assert f"path={(tmp_path / 'cache').resolve()},mount_tag=cache" in line
    assert f"path={tmp_path / 'scratch'},mount_tag=scratch,security_model=none," in line
    assert f"path={watched.heartbeat}" in line


def test_the_arm64_test_vm_needs_the_arm64_kit_and_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TestVmError, match="needs the aarch64 kit"):
        Arm64TestVm(GuestKit(tmp_path), tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TestVmError, match="qemu-system-aarch64 not found: apt-get install"):
        Arm64TestVm(GuestKit(tmp_path, arch="aarch64"), tmp_path)


def test_arm64_guests_on_an_x86_64_host_go_to_the_arm64_test_vm(tmp_path: Path) -> None:
    placement = linux.choose_placement(arch="aarch64")
    assert not placement.native
    assert "aarch64 test VM" in placement.reason
    harness = linux.LinuxHarness(GuestKit(tmp_path, arch="aarch64"))
    assert harness.arch == "aarch64" and harness.placement == placement
    assert harness.pyvmm_argv("k")[:4] == ["python3", "-m", "pyvmm", "run"]
    assert linux.LinuxHarness(GuestKit(tmp_path)).python != "python3"


def test_the_root_key_follows_what_the_root_is_made_from(monkeypatch: pytest.MonkeyPatch) -> None:
    key = armroot.root_key()
    assert key == armroot.root_key()
    monkeypatch.setattr(armroot, "PACKAGES", (*armroot.PACKAGES, "strace"))
    assert armroot.root_key() != key


def test_missing_mmdebstrap_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert armroot.missing_emulation() == "mmdebstrap not found: apt-get install mmdebstrap"
