"""The vsock benchmark's own parts: the byte pattern it shares with the probe, the probe's command
line, and how serial lines and host timings become rates."""

from __future__ import annotations

import pytest

from bench.vsock import CASES, MB, Case, cases, pattern, pattern_ok, probe_params, rates


def test_the_pattern_is_the_offset_mod_251_and_its_check_finds_a_misplaced_chunk() -> None:
    data = pattern(1000)
    assert len(data) == 1000 and data[250] == 250 and data[251] == 0 and data[999] == 999 % 251
    view = memoryview(data)
    assert pattern_ok(view[300:700], 300)
    assert not pattern_ok(view[300:700], 301)  # one byte out of place
    assert not pattern_ok(view[300:700], 300 + 4052)  # a whole packet out of place


def test_one_boot_runs_every_case() -> None:
    assert probe_params(1 << 20, 50) == [
        "probe=vsockbench,vsockbench,vsockbench",
        "probe.vsock.dir=tx,rx,conn",
        "probe.vsock.bytes=1048576",
        "probe.vsock.count=50",
    ]
    assert CASES == ("tx", "rx", "conn")


def _lines(*texts: tuple[float, str]) -> list[tuple[float, float, str]]:
    return [(0.0, cpu, text) for cpu, text in texts]


def test_start_and_ok_lines_pair_up_with_the_cpu_between_them() -> None:
    found = cases(
        _lines(
            (0.5, "PROBE vsockbench start tx 1000000\n"),
            (1.5, "PROBE vsockbench ok tx 1000000 bytes 900 us credit waits 3\n"),
            (1.6, "PROBE vsockbench start conn 10\n"),
            (1.7, "PROBE vsockbench ok conn 10 connections 5000 us\n"),
            (1.7, "PROBE done 2 passed, 0 failed\n"),
        )
    )
    assert [(c.direction, c.amount, round(c.cpu_s, 6)) for c in found] == [
        ("tx", 1_000_000, 1.0),
        ("conn", 10, 0.1),
    ]


def test_rates_come_from_the_host_clock_and_cpu_is_per_mb_or_per_connection() -> None:
    found = [
        Case("tx", 2_000_000, 0.5, ["tx", "2000000", "bytes", "1", "us"]),
        Case("rx", 2_000_000, 1.0, ["rx", "2000000", "bytes", "1", "us", "first", "4052"]),
        Case("conn", 100, 0.2, ["conn", "100", "connections", "1", "us"]),
    ]
    out = rates(
        found,
        seconds={"tx": 0.5, "rx": 2.0, "conn": 0.25},
        timed={"tx": 1_000_000, "rx": 2_000_000, "conn": 100},
    )
    assert out == pytest.approx(
        {
            "tx_rate": 1_000_000 / 0.5 / MB,
            "tx_cpu": 250.0,  # 0.5 s of CPU for 2 MB
            "rx_rate": 1.0,
            "rx_cpu": 500.0,
            "conn_rate": 400.0,
            "conn_cpu": 2.0,
        }
    )


def test_a_short_stream_or_a_missing_host_time_fails_the_run() -> None:
    short = [Case("tx", 2_000_000, 0.5, ["tx", "1000000", "bytes", "1", "us"])]
    with pytest.raises(RuntimeError, match="ok tx 1000000"):
        rates(short, {"tx": 1.0}, {"tx": 1_000_000})
    whole = [Case("rx", 10, 0.5, ["rx", "10", "bytes", "1", "us"])]
    with pytest.raises(RuntimeError):
        rates(whole, {}, {})
