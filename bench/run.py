"""The benchmarks, each run several times; medians are reported.

- exit round trip: the probe guest does N `out` instructions to port 0x80 from CPL3; the time
  and VMM CPU (user+system) of an N-iteration run less a 0-iteration run, per exit.
- start-up: wall time from starting `pyvmm run` to the probe guest's first serial byte, and to
  the process's exit.
- memory: peak RSS of the VMM process for a 256 MiB guest, less the guest RAM it touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "guest" / "build" / "probe.elf"


def _pyvmm(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", "run", *args]


def _timed_run(cmd: list[str]) -> tuple[float, float, float | None]:
    """(wall seconds, child CPU seconds, seconds to first stdout byte)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - start if first else None
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {os.waitstatus_to_exitcode(status)}")
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, first_byte


def bench_exits(runs: int, count: int) -> dict[str, Any]:
    per_exit_wall: list[float] = []
    per_exit_cpu: list[float] = []
    for _ in range(runs):
        w0, c0, _ = _timed_run(_pyvmm("-p", "probe=outloop", "-p", "probe.count=0", str(PROBE)))
        w1, c1, _ = _timed_run(
            _pyvmm("-p", "probe=outloop", "-p", f"probe.count={count}", str(PROBE))
        )
        per_exit_wall.append((w1 - w0) / count)
        per_exit_cpu.append((c1 - c0) / count)
    wall = statistics.median(per_exit_wall)
    return {
        "exits": count,
        "exits_per_second": round(1 / wall),
        "wall_us_per_exit": round(wall * 1e6, 2),
        "vmm_cpu_us_per_exit": round(statistics.median(per_exit_cpu) * 1e6, 2),
    }


def bench_startup(runs: int) -> dict[str, Any]:
    firsts: list[float] = []
    exits: list[float] = []
    for _ in range(runs):
        wall, _, first = _timed_run(_pyvmm("-p", "probe=cmdline", str(PROBE)))
        assert first is not None
        firsts.append(first)
        exits.append(wall)
    return {
        "to_first_serial_byte_ms": round(statistics.median(firsts) * 1e3, 1),
        "to_exit_ms": round(statistics.median(exits) * 1e3, 1),
    }


def bench_memory(runs: int) -> dict[str, Any]:
    reports = []
    for _ in range(runs):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.rss_child",
                "-m",
                "256",
                "-p",
                "probe=cmdline",
                str(PROBE),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        reports.append(json.loads(proc.stderr.strip().splitlines()[-1]))
    mib = 1 << 20
    return {
        "guest_mem_mib": 256,
        "peak_rss_mib": round(statistics.median(r["peak_rss_bytes"] for r in reports) / mib, 1),
        "guest_ram_touched_mib": round(
            statistics.median(r["guest_ram_touched_bytes"] for r in reports) / mib, 1
        ),
        "vmm_rss_beyond_guest_mib": round(
            statistics.median(r["vmm_rss_beyond_guest_bytes"] for r in reports) / mib, 1
        ),
    }


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--runs", type=int, default=5, help="runs per benchmark (median kept)")
    parser.add_argument("--exits", type=int, default=100_000, help="out instructions per run")
    args = parser.parse_args(argv)
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True)
    results = {
        "machine": machine(),
        "exit_round_trip": bench_exits(args.runs, args.exits),
        "startup": bench_startup(args.runs),
        "memory": bench_memory(args.runs),
    }
    print(json.dumps(results, indent=2))
    return 0
