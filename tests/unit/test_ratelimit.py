"""Guest-triggered log messages: a few per kind and interval, then a count of the rest."""

from __future__ import annotations

import logging

import pytest

from pyvmm.ratelimit import GuestLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def guest_log(clock: Clock) -> GuestLog:
    return GuestLog(logging.getLogger("test.ratelimit"), "vda", burst=3, interval=10, clock=clock)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]


def test_a_burst_then_silence_then_the_count(
    guest_log: GuestLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        for i in range(1000):
            guest_log.warning("I/O error", "sector %d failed", i)
        assert messages(caplog) == [f"vda: sector {i} failed" for i in range(3)]
        clock.t += 10
        guest_log.warning("I/O error", "sector %d failed", 1000)
    assert messages(caplog)[-1] == "vda: sector 1000 failed (997 more like this were not logged)"


def test_kinds_are_limited_apart(guest_log: GuestLog, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        for _ in range(10):
            guest_log.warning("a", "first kind")
            guest_log.info("b", "second kind")
    assert messages(caplog).count("vda: first kind") == 3
    assert messages(caplog).count("vda: second kind") == 3


def test_flush_reports_what_was_held_back_once(
    guest_log: GuestLog, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            guest_log.warning("bad chain", "bad chain")
        guest_log.flush()
        guest_log.flush()
    assert messages(caplog)[-1] == "vda: 2 more bad chain messages were not logged"
    assert len(messages(caplog)) == 4


def test_messages_below_the_log_level_cost_nothing(
    guest_log: GuestLog, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            guest_log.info("chain", "ignored")
        guest_log.flush()
    assert messages(caplog) == []
