"""When pyvmm.harness.pressure has seen enough to let its guests go."""

from __future__ import annotations

from typing import Any

from pyvmm.harness.pressure import settled

MARGIN = 1000


def _entry(t: float, available: int, *targets: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"t": t, "available_mib": available}
    for i, target in enumerate(targets):
        entry[f"vm{i}"] = {"target_mib": target, "actual_mib": target}
    return entry


def test_memory_back_above_the_margin_after_three_steps_each_is_settled() -> None:
    timeline = [
        _entry(0, 1200, 0, 0),
        _entry(1, 900, 32, 32),  # low
        _entry(2, 950, 64, 64),
        _entry(3, 990, 96, 64),
        _entry(4, 1010, 96, 96),  # back above, every balloon asked three sizes: settled
        _entry(5, 1020, 96, 96),
    ]
    assert settled(timeline, MARGIN, 2) == 4


def test_not_settled_before_memory_was_ever_low() -> None:
    timeline = [_entry(t, 1200, 32 * (t + 1), 32 * (t + 1)) for t in range(5)]
    assert settled(timeline, MARGIN, 2) is None


def test_not_settled_while_one_balloon_has_taken_fewer_steps() -> None:
    timeline = [
        _entry(0, 900, 32, 32),
        _entry(1, 950, 64, 32),
        _entry(2, 1010, 96, 32),
        _entry(3, 1010, 96, 64),  # vm1 asked two sizes only
    ]
    assert settled(timeline, MARGIN, 2) is None


def test_still_low_is_not_settled() -> None:
    timeline = [_entry(t, 900, 32 * (t + 1), 32 * (t + 1)) for t in range(6)]
    assert settled(timeline, MARGIN, 2) is None
