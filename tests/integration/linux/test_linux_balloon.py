"""A stock Debian kernel's virtio_balloon driver through pyvmm's balloon (`pyvmm balloon` and
`pyvmm balloon_stats` on the control socket): the balloon set to BALLOON_MIB MiB of a MEM_MIB
MiB guest takes that much from the guest (MemFree: the device offers DEFLATE_ON_OOM, so Linux
leaves MemTotal alone) and from what the guest's memory holds on the host; set back to 0, the
guest has it again, and holds it on the host again once it writes it; the statistics are the
guest's. The kernel log stays clean.

The host's side is pyvmm.harness.balloonpeer, started when the guest says it is ready and again
when it has written its memory again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pyvmm.harness.balloonpeer import peer_argv
from pyvmm.harness.boots import BootResult, BootSpec, command_report
from pyvmm.harness.linux import LinuxHarness
from tests.integration.linux.conftest import completed, guest_check

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


@dataclass
class BalloonBoot:
    result: BootResult
    cycle: dict[str, Any]  # balloonpeer's reports ({} when it never ran)
    done: dict[str, Any]


@pytest.fixture(scope="module")
def boot() -> Iterator[BalloonBoot]:
    harness = LinuxHarness(progress=print)
    print(harness.placement.describe())
    files = harness.guest_files()
    params = (
        f"pyvmm.check={','.join(CHECKS)} pyvmm.balloon_mib={BALLOON_MIB} "
        f"pyvmm.balloon_fill={FILL_MIB} pyvmm.balloon_wait={WAIT_S}"
    )
    with harness.session() as dirs:
        control = str(dirs.local / "balloon.ctl")
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
        (result,) = harness.run([spec])
    boot = BalloonBoot(
        result,
        command_report(result.commands, READY, "balloonpeer"),
        command_report(result.commands, FILLED, "balloonpeer"),
    )
    _say(boot)
    yield boot


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
    command = next((c for c in boot.result.commands if c.marker == marker), None)
    assert command is not None, f"the guest never said '{marker}':\n{boot.result.output[-3000:]}"
    assert command.returncode == 0 and "error" not in report, (
        f"balloonpeer ({marker}) exited {command.returncode}: {command.output}\n"
        f"pyvmm's stderr: {boot.result.stderr.strip()[-3000:]}"
    )
    return report


def _guest(boot: BalloonBoot) -> re.Match[str]:
    details = guest_check(boot.result, "balloon")
    m = GUEST_BALLOON.fullmatch(details)
    assert m, f"GUEST balloon ok line not understood: {details}"
    return m


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
    assert abs(cycle["deflated"] - cycle["inflated"]) <= SLACK, "a deflate allocates nothing"
    regained = filled - cycle["deflated"]
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
