"""Where Linux guests run, and what a missing test-VM ingredient looks like."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pyvmm.harness import linux, testvm
from pyvmm.harness.boots import parse_checks
from pyvmm.harness.linux import choose_placement


@pytest.fixture
def kvm_device(tmp_path: Path) -> str:
    device = tmp_path / "kvm"
    device.touch()
    return str(device)


def test_vmx_or_svm_hosts_boot_natively(monkeypatch: pytest.MonkeyPatch, kvm_device: str) -> None:
    monkeypatch.delenv("PYVMM_TEST_KERNEL", raising=False)
    for flag, name in (("vmx", "VMX"), ("svm", "SVM")):
        monkeypatch.setattr(linux, "_cpu_flags", lambda flag=flag: {"fpu", flag, "lm"})
        placement = choose_placement(kvm_device)
        assert placement.native
        assert name in placement.reason


def test_pvm_hosts_use_the_test_vm(monkeypatch: pytest.MonkeyPatch, kvm_device: str) -> None:
    monkeypatch.delenv("PYVMM_TEST_KERNEL", raising=False)
    monkeypatch.setattr(linux, "_cpu_flags", lambda: {"fpu", "lm", "hypervisor"})
    placement = choose_placement(kvm_device)
    assert not placement.native
    assert "neither VMX nor SVM" in placement.describe()
    assert "inside the test VM" in placement.describe()


def test_no_kvm_device_means_the_test_vm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYVMM_TEST_KERNEL", raising=False)
    placement = choose_placement(str(tmp_path / "kvm"))
    assert not placement.native
    assert "absent" in placement.reason


def test_a_named_test_kernel_boots_natively(
    monkeypatch: pytest.MonkeyPatch, kvm_device: str
) -> None:
    monkeypatch.setenv("PYVMM_TEST_KERNEL", "/boot/pvm-guest")
    monkeypatch.setattr(linux, "_cpu_flags", lambda: {"fpu"})
    placement = choose_placement(kvm_device)
    assert placement.native
    assert "/boot/pvm-guest" in placement.reason


def test_missing_qemu_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(testvm.TestVmError, match=r"qemu-system-x86_64 not found: apt-get install"):
        testvm.TestVm(kit=None)  # type: ignore[arg-type]


def test_guest_lines_are_parsed_wherever_they_sit_on_the_line() -> None:
    out = "noise\r\n[  1.0] x GUEST mem ok MemTotal 1 kB\nGUEST cpus FAIL expected 2\nGUEST done\n"
    assert parse_checks(out) == {"mem": ["ok", "MemTotal 1 kB"], "cpus": ["FAIL", "expected 2"]}


def _watched(tmp_path: Path) -> testvm.WatchedFiles:
    return testvm.WatchedFiles(
        tmp_path / "console.log", tmp_path / "heartbeat.log", tmp_path / "output"
    )


def _wait_on_sleeper(
    watched: testvm.WatchedFiles, start: float, timeout: float, **kw: float
) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        testvm.TestVm._wait(sleeper, watched, start, timeout, **kw)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_locked_up_test_vm_is_detected_on_its_console(tmp_path: Path) -> None:
    watched = _watched(tmp_path)
    watched.console.write_text(
        "testvm: ready\n[ 77.0] watchdog: BUG: soft lockup - CPU#0 stuck for 26s!\n"
    )
    with pytest.raises(testvm.TestVmLockupError, match="locked up"):
        _wait_on_sleeper(watched, time.monotonic(), timeout=20)


def test_a_test_vm_whose_kernel_dies_is_the_emulators_failure(tmp_path: Path) -> None:
    watched = _watched(tmp_path)
    watched.console.write_text(
        "testvm: ready\n[ 317.3] BUG: TASK stack guard page was hit at 00000000105c9f47\n"
        "[ 317.3] CPU: 0 PID: 430 Comm: python Not tainted 6.1.0-56-amd64 #1\n"
        "[ 317.3] RIP: 0010:error_entry+0x17/0x130\n[ 317.3] Code: f8 e9 06\n"
        "[ 317.3] Kernel panic - not syncing: corrupted stack end detected inside scheduler\n"
    )
    with pytest.raises(
        testvm.TestVmLockupError, match=r"kernel died .*stack guard.*Comm: python.*RIP: .*panic"
    ):
        _wait_on_sleeper(watched, time.monotonic(), timeout=20)


def test_a_test_vm_whose_heartbeat_stops_is_a_lockup(tmp_path: Path) -> None:
    watched = _watched(tmp_path)
    watched.heartbeat.write_text("3.01\n8.02\n")
    watched.output.write_text("boots: bzimage-initrd-2cpu started\n")
    with pytest.raises(
        testvm.TestVmLockupError, match=r"no heartbeat .* last uptime 8.02 s.*bzimage-initrd"
    ):
        _wait_on_sleeper(watched, time.monotonic(), timeout=20, stall_s=1.0)


def test_a_quiet_test_vm_that_overruns_its_time_says_what_the_command_printed(
    tmp_path: Path,
) -> None:
    watched = _watched(tmp_path)
    watched.output.write_text("boots: vmlinux-initrd-1cpu started\n")
    with pytest.raises(
        testvm.TestVmError, match=r"did not finish within 0 s.*output ends with: boots: vmlinux"
    ):
        _wait_on_sleeper(watched, time.monotonic() - 1, timeout=0)


def test_a_test_vm_that_resets_while_running_the_command_is_the_emulators_failure(
    tmp_path: Path,
) -> None:
    watched = _watched(tmp_path)
    watched.console.write_text("testvm: ready after 7.80 s\n[ 74.3] kvm [141]: vcpu0\n")
    watched.heartbeat.write_text("185.0\n190.1\n")
    watched.output.write_text("boots: intx started\n")
    (tmp_path / "qemu.log").write_text("")
    with pytest.raises(
        testvm.TestVmLockupError, match=r"reset itself .*last uptime 190.1 s.*boots: intx"
    ):
        testvm._ended_early(0, watched, tmp_path / "qemu.log")


def test_a_test_vm_that_never_got_to_the_command_says_what_qemu_said(tmp_path: Path) -> None:
    watched = _watched(tmp_path)
    watched.console.write_text("Loading initrd\n")
    (tmp_path / "qemu.log").write_text("qemu-system-x86_64: -virtfs: no such option\n")
    with pytest.raises(testvm.TestVmError, match=r"status 1\) without running .*-virtfs") as e:
        testvm._ended_early(1, watched, tmp_path / "qemu.log")
    assert not isinstance(e.value, testvm.TestVmLockupError)
