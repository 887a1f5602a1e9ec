"""A stock Debian kernel's virtio_balloon driver through pyvmm's balloon (`pyvmm balloon` and
`pyvmm balloon_stats` on the control socket): the balloon set to BALLOON_MIB MiB of a MEM_MIB
MiB guest takes that much from the guest (MemFree: the device offers DEFLATE_ON_OOM, so Linux
leaves MemTotal alone) and from what the guest's memory holds on the host; set back to 0, the
guest has it again, and holds it on the host again once it writes it; the statistics are the
guest's. The kernel log stays clean.

The host's side is pyvmm.harness.balloonpeer, started when the guest says it is ready and again
when it has written its memory again.

Inflation under real pressure (pyvmm.harness.pressure): two VMs whose guests each write and
delete a file of most of their memory, so the host holds it though the guests no longer use
it; once both have, the margin is set a quarter of MemAvailable's fall above where it is, so
the host is low; the low-memory policy of each (timers shortened) grows its balloon step by
step, MemAvailable comes back above the margin, both guests go on running to their end, and
the host's OOM killer kills nothing.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvmm.harness.balloonpeer import peer_argv
from pyvmm.harness.boots import BootResult, BootSpec, command_report
from pyvmm.harness.linux import LinuxHarness
from tests.integration.linux.conftest import completed, guest_check, guest_match, peer_ok

MiB = 1 << 20
MEM_MIB = 512
BALLOON_MIB = 128
FILL_MIB = 256  # what the guest writes before the balloon grows and after it shrinks
WAIT_S = 120
CHECKS = ["balloon", "dmesg"]
READY, FILLED = "GUEST balloon ready", "GUEST balloon filled"
# How far the figures may stray from the balloon's size: the kernel, the init and the rings
# move a few MiB meanwhile.
SLACK = 16 * MiB
GUEST_BALLOON = re.compile(
    r"MemFree (?P<before>\d+) kB, inflated (?P<inflated>\d+) kB, deflated (?P<deflated>\d+) kB; "
    r"MemTotal (?P<total>\d+) kB"
)


PRESSURE_VMS = 2
PRESSURE_MEM_MIB = 1024  # each: the policy's balloon reaches half of it, in 32 MiB steps
# Each guest writes a file this large and deletes it: the two have touched ~1.2 GiB more of the
# test VM's memory, which the host holds though the guests no longer use it. The host then wants
# a quarter of that back (pressure's --give-back): ~150 MiB from each balloon, ~5 steps.
PRESSURE_WRITE_MIB = 600
PRESSURE_S = 120  # how long each guest stays up once it has written: the balloons' time


@dataclass
class BalloonBoot:
    result: BootResult
    cycle: dict[str, Any]  # balloonpeer's reports ({} when it never ran)
    done: dict[str, Any]


@dataclass
class PressureRun:
    result: BootResult
    report: dict[str, Any]  # pyvmm.harness.pressure's ({"error": ...} when it failed)


@dataclass
class Boots:
    balloon: BalloonBoot
    pressure: PressureRun


@pytest.fixture(scope="module")
def boots() -> Iterator[Boots]:
    harness = LinuxHarness(progress=print)
    print(harness.placement.describe())
    files = harness.guest_files()
    params = (
        f"pyvmm.check={','.join(CHECKS)} pyvmm.balloon_mib={BALLOON_MIB} "
        f"pyvmm.balloon_fill={FILL_MIB} pyvmm.balloon_wait={WAIT_S}"
    )
    with harness.session() as dirs:
        control = str(dirs.local / "balloon.ctl")
        pressure = pressure_spec(
            "pressure", sys.executable, dirs.local, files.bzimage, files.initramfs
        )
        spec = BootSpec(
            "balloon",
            harness.pyvmm_argv(
                *["-m", str(MEM_MIB), "-p", "quiet", "-i", str(files.initramfs)],
                *["-s", control, "-p", params, str(files.bzimage)],
            ),
            timeout=120 + 3 * WAIT_S,
            on_line={
                READY: peer_argv("cycle", control, 2 * WAIT_S, str(BALLOON_MIB)),
                FILLED: peer_argv("done", control, WAIT_S),
            },
        )
        result, pressure_result = harness.run([spec, pressure])
    boot = BalloonBoot(
        result,
        command_report(result.commands, READY, "balloonpeer"),
        command_report(result.commands, FILLED, "balloonpeer"),
    )
    _say(boot)
    yield Boots(boot, pressure_run(pressure_result))


def pressure_spec(name: str, python: str, directory: Path, kernel: Path, initrd: Path) -> BootSpec:
    """The pressure run (pyvmm.harness.pressure) of PRESSURE_VMS VMs booting `kernel`."""
    return BootSpec(
        name,
        [
            *[python, "-m", "pyvmm.harness.pressure", "--dir", str(directory)],
            *["--kernel", str(kernel), "--initrd", str(initrd)],
            *["--vms", str(PRESSURE_VMS), "--mem-mib", str(PRESSURE_MEM_MIB)],
            *["--write-mib", str(PRESSURE_WRITE_MIB), "--seconds", str(PRESSURE_S)],
        ],
        timeout=360 + 400 + PRESSURE_S,  # two VMs starting, then writing, at once
    )


def pressure_run(result: BootResult) -> PressureRun:
    run = PressureRun(result, _pressure_report(result))
    _say_pressure(run)
    return run


@pytest.fixture(scope="module")
def boot(boots: Boots) -> BalloonBoot:
    return boots.balloon


@pytest.fixture(scope="module")
def pressure(boots: Boots) -> PressureRun:
    return boots.pressure


def _pressure_report(result: BootResult) -> dict[str, Any]:
    lines = result.output.strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (ValueError, IndexError):
        return {"error": f"pyvmm.harness.pressure said: {result.output[-2000:]}{result.stderr}"}
    return report


def _say_pressure(run: PressureRun) -> None:
    report = run.report
    if "timeline" not in report:
        return
    print(
        f"pressure: MemAvailable {report['available_at_start_mib']} MiB with the guests running, "
        f"then it fell by {report.get('fell_mib')} MiB; margin {report.get('margin_mib')} MiB "
        f"from {report.get('low_from_s')} s; OOM kills {report['oom_kills']}"
    )
    for entry in report["timeline"]:
        sizes = ", ".join(
            f"vm{i} {entry[f'vm{i}']['actual_mib']:.0f}/{entry[f'vm{i}']['target_mib']:.0f}"
            for i in range(PRESSURE_VMS)
            if f"vm{i}" in entry
        )
        print(f"pressure: {entry['t']:6.1f} s  MemAvailable {entry['available_mib']} MiB  "
              f"balloon MiB (actual/target) {sizes}")  # fmt: skip


def _say(boot: BalloonBoot) -> None:
    cycle = boot.cycle
    if "inflate_s" in cycle:
        print(
            f"balloon: {BALLOON_MIB} MiB inflated in {cycle['inflate_s']:.2f} s, deflated in "
            f"{cycle['deflate_s']:.2f} s; the guest's memory on the host: before "
            f"{cycle['before'] / MiB:.0f} MiB, inflated {cycle['inflated'] / MiB:.0f} MiB, "
            f"deflated {cycle['deflated'] / MiB:.0f} MiB, written again "
            f"{boot.done.get('filled', 0) / MiB:.0f} MiB"
        )
        print(f"balloon: the guest's statistics: {cycle['stats']}")


def _peer(boot: BalloonBoot, marker: str, report: dict[str, Any]) -> dict[str, Any]:
    return peer_ok(boot.result, marker, report, "balloonpeer")


def _guest(boot: BalloonBoot) -> re.Match[str]:
    return guest_match(boot.result, "balloon", GUEST_BALLOON)


def test_the_balloon_boot_runs_every_check(boot: BalloonBoot) -> None:
    completed(boot.result)
    for check in CHECKS:
        guest_check(boot.result, check)


def test_the_guest_gives_the_balloon_its_memory_and_gets_it_back(boot: BalloonBoot) -> None:
    m = _guest(boot)
    before, inflated, deflated = (int(m[k]) * 1024 for k in ("before", "inflated", "deflated"))
    assert abs((before - inflated) - BALLOON_MIB * MiB) <= SLACK, m.group(0)
    assert abs(before - deflated) <= SLACK, m.group(0)
    assert int(m["total"]) * 1024 > (MEM_MIB - 64) * MiB, "DEFLATE_ON_OOM: MemTotal stays"


def test_inflated_memory_leaves_the_host_and_comes_back_when_written(boot: BalloonBoot) -> None:
    cycle = _peer(boot, READY, boot.cycle)
    filled = _peer(boot, FILLED, boot.done)["filled"]
    freed = cycle["before"] - cycle["inflated"]
    assert abs(freed - BALLOON_MIB * MiB) <= SLACK, f"the memfd gave back {freed / MiB:.1f} MiB"
    # Deflated pages cost the host nothing until the guest uses them (its allocator reuses some
    # at once); once it has written its memory again, the host holds it again.
    regained = filled - cycle["inflated"]
    assert regained >= BALLOON_MIB * MiB - SLACK, f"written again: +{regained / MiB:.1f} MiB"


def test_balloon_stats_are_the_guests(boot: BalloonBoot) -> None:
    cycle = _peer(boot, READY, boot.cycle)
    stats = cycle["stats"]
    assert cycle["stats_fresh"] is True
    assert (MEM_MIB - 64) * MiB < stats["total_memory"] <= MEM_MIB * MiB
    assert 0 < stats["free_memory"] < stats["total_memory"]
    assert 0 < stats["available_memory"] <= stats["total_memory"]
    assert {"swap_in", "swap_out", "major_faults", "minor_faults", "disk_caches"} <= set(stats)


def test_kernel_log_is_clean_with_the_balloon(boot: BalloonBoot) -> None:
    guest_check(boot.result, "dmesg")


def test_under_pressure_both_guests_finish_and_nothing_is_oom_killed(pressure: PressureRun) -> None:
    check_pressure_ended_well(pressure)


def test_low_memory_grows_every_balloon_step_by_step(pressure: PressureRun) -> None:
    check_balloons_grew_step_by_step(pressure)


def test_memory_comes_back_above_the_margin(pressure: PressureRun) -> None:
    check_memory_came_back(pressure)


# The pressure run's checks, shared with the arm64 suite's.


def check_pressure_ended_well(pressure: PressureRun) -> None:
    """Every guest finished its checks, and the host's OOM killer killed nothing."""
    report = pressure.report
    assert "error" not in report, report["error"]
    assert report["exit"] == [0] * PRESSURE_VMS, f"{report['exit']}\n{pressure.result.output}"
    for i in range(PRESSURE_VMS):
        guest_check(pressure.result, f"vm{i}-pressure")
        guest_check(pressure.result, f"vm{i}-dmesg")
    assert report["oom_kills"] == 0


def check_balloons_grew_step_by_step(pressure: PressureRun) -> None:
    """Once the host was low, each VM's policy asked for several balloon sizes, within its
    maximum, and each balloon took memory."""
    report = pressure.report
    timeline, margin = report["timeline"], report["margin_mib"]
    low = [e["t"] for e in timeline if e["available_mib"] < margin]
    assert low, f"MemAvailable never fell under the {margin} MiB margin"
    for i in range(PRESSURE_VMS):
        targets = sorted({e[f"vm{i}"]["target_mib"] for e in timeline if f"vm{i}" in e} - {0})
        sizes = [e[f"vm{i}"]["actual_mib"] for e in timeline if f"vm{i}" in e]
        assert len(targets) >= 3, f"vm{i}'s policy asked for only {targets} MiB"
        assert max(targets) <= PRESSURE_MEM_MIB / 2, "past the policy's maximum"
        assert max(sizes) >= PRESSURE_MEM_MIB / 16, f"vm{i}'s balloon took {max(sizes)} MiB"


def check_memory_came_back(pressure: PressureRun) -> None:
    """MemAvailable came back above the margin while both guests still ran."""
    report = pressure.report
    timeline, margin = report["timeline"], report["margin_mib"]
    first_low = next(e["t"] for e in timeline if e["available_mib"] < margin)
    # While both guests still run and read: the balloons, not the VMs' end, gave it back.
    running = [e for e in timeline if all(f"vm{i}" in e for i in range(PRESSURE_VMS))]
    assert any(e["available_mib"] > margin for e in running if e["t"] > first_low), (
        "MemAvailable never came back above the margin while the guests ran"
    )
