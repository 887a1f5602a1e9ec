"""run_boots runs a boot again when its first attempt failed in a way the emulator causes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.harness import boots
from pyvmm.harness.boots import BootSpec, run_boots


def _faults_once(tmp_path: Path) -> BootSpec:
    """A 'VMM' whose first run logs a triple fault, and whose second runs cleanly."""
    marker = tmp_path / "ran"
    script = (
        f"if [ -e {marker} ]; then echo 'GUEST done'; exit 0; fi; touch {marker}; "
        "echo 'pyvmm: vCPU 0: triple fault: the guest resets' >&2; exit 0"
    )
    return BootSpec("faulty", ["sh", "-c", script], timeout=20)


def test_in_the_test_vm_a_triple_fault_is_run_again_and_kept(tmp_path: Path) -> None:
    (result,) = run_boots([_faults_once(tmp_path)], emulated=True)
    assert "GUEST done" in result.output
    assert result.hung_attempt is not None
    assert result.hung_attempt.startswith("triple fault; ")
    assert "vCPU 0: triple fault" in result.hung_attempt


def test_on_a_kvm_host_a_triple_fault_stands(tmp_path: Path) -> None:
    (result,) = run_boots([_faults_once(tmp_path)])
    assert "triple fault" in result.stderr
    assert result.hung_attempt is None


def test_each_guest_line_is_timed_as_it_comes(tmp_path: Path) -> None:
    script = (
        "echo 'boot noise'; echo '[ 1.0] GUEST mem ok MemTotal'; sleep 1; "
        "printf 'GUEST hwrng ok virtio'; sleep 0.5; echo '_rng.0'; echo 'GUEST done'"
    )
    (result,) = run_boots([BootSpec("timed", ["sh", "-c", script], timeout=20)])
    names = [name for _, name in result.timeline]
    assert names == ["mem ok", "hwrng ok", "done"]
    times = [t for t, _ in result.timeline]
    assert result.to_init_s == times[0]
    assert times[1] - times[0] >= 1.0  # the second line counted when it ended, not before


def test_a_command_runs_beside_the_console_not_instead_of_reading_it(tmp_path: Path) -> None:
    # The guest prints after the marker while the command still runs: those lines are read as
    # they come, and the command's result is still collected.
    script = "echo 'GUEST peer ready'; sleep 0.5; echo 'GUEST mem ok'; sleep 2; echo 'GUEST done'"
    peer = ["sh", "-c", "sleep 1.5; echo peer-said"]
    spec = BootSpec("beside", ["sh", "-c", script], timeout=20, on_line={"GUEST peer ready": peer})
    (result,) = run_boots([spec])
    when = {name: t for t, name in result.timeline}
    assert when["mem ok"] - when["peer ready"] < 1.5  # not held up by the 1.5 s command
    (command,) = result.commands
    assert command.returncode == 0 and command.output.strip() == "peer-said"


def test_commands_run_one_after_another_in_their_markers_order(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = "echo 'GUEST a ready'; echo 'GUEST b ready'; sleep 2; echo 'GUEST done'"
    first = ["sh", "-c", f"echo a-start >> {log}; sleep 1; echo a-end >> {log}"]
    second = ["sh", "-c", f"echo b-start >> {log}"]
    on_line = {"GUEST a ready": first, "GUEST b ready": second}
    (result,) = run_boots([BootSpec("order", ["sh", "-c", script], timeout=20, on_line=on_line)])
    assert log.read_text().split() == ["a-start", "a-end", "b-start"]
    assert [c.marker for c in result.commands] == ["GUEST a ready", "GUEST b ready"]


def test_a_guest_that_stops_beating_is_a_hang_before_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(boots, "BEAT_STALL_S", 1.0)
    script = "echo 'GUEST-BEAT'; echo 'GUEST net ready'; exec sleep 60"
    (result,) = run_boots([BootSpec("stopped", ["sh", "-c", script], timeout=50)])
    assert result.timed_out
    assert "stopped beating" in result.stderr
    assert result.wall_s < 40  # well before its timeout


def test_a_guest_that_never_beats_may_stay_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boots, "BEAT_STALL_S", 1.0)
    script = "echo 'GUEST net ready'; sleep 3; echo 'GUEST done'"
    (result,) = run_boots([BootSpec("quiet", ["sh", "-c", script], timeout=50)])
    assert not result.timed_out
    assert "GUEST done" in result.output


def test_a_guest_done_with_its_checks_may_stay_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boots, "BEAT_STALL_S", 1.0)
    script = "echo 'GUEST-BEAT'; echo 'GUEST done'; sleep 3"  # a slow VMM exit
    (result,) = run_boots([BootSpec("ending", ["sh", "-c", script], timeout=50)])
    assert not result.timed_out and result.returncode == 0
