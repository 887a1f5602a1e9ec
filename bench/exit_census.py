"""Where a pyvmm run's time goes: every port-I/O and MMIO exit counted and timed by address,
beside the time spent before the guest starts. A profiling aid for the benchmarks' slower rows.

`python -m bench.exit_census [pyvmm run flags...] KERNEL` runs the guest in this process with
the guest's serial output on stdout, and prints a JSON report on stderr when the guest ends:
seconds from interpreter start to the VMM built, the run's wall time, and per address (port or
MMIO region) the number of exits and the seconds spent handling them in Python.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from pyvmm.cli import build_parser, config_from_args
from pyvmm.devices.bus import Bus
from pyvmm.vmm import Vmm


def process_age_s() -> float:
    """Seconds since this process started (the kernel's record of it, 10 ms ticks)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot_s - start_ticks / os.sysconf("SC_CLK_TCK")


class CountingBus:
    """A Bus stand-in that counts and times each access by address before passing it on."""

    def __init__(self, bus: Bus, granule: int) -> None:
        self._bus = bus
        self._granule = granule  # addresses are grouped by this (a page for MMIO)
        self._lock = threading.Lock()
        self.counts: dict[int, int] = defaultdict(int)
        self.seconds: dict[int, float] = defaultdict(float)

    def _account(self, addr: int, began: float) -> None:
        key = addr - addr % self._granule
        with self._lock:
            self.counts[key] += 1
            self.seconds[key] += time.perf_counter() - began

    def read(self, addr: int, data: Any) -> bool:
        began = time.perf_counter()
        try:
            return self._bus.read(addr, data)
        finally:
            self._account(addr, began)

    def write(self, addr: int, data: Any) -> None:
        began = time.perf_counter()
        try:
            self._bus.write(addr, data)
        finally:
            self._account(addr, began)

    def report(self, fmt: str) -> list[dict[str, Any]]:
        return [
            {"at": fmt.format(k), "exits": n, "handler_s": round(self.seconds[k], 4)}
            for k, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        ]


def main() -> int:
    args = build_parser().parse_args(["run", *sys.argv[1:]])
    vmm = Vmm(config_from_args(args), console_out=sys.stdout.buffer, console_in_fd=None)
    built_age = process_age_s()
    built = time.monotonic()
    io = CountingBus(vmm.io_bus, 1)
    mmio = CountingBus(vmm.mmio_bus, 4096)
    vmm.vcpu_threads.io_bus = io  # type: ignore[assignment]
    vmm.vcpu_threads.mmio_bus = mmio  # type: ignore[assignment]
    coalesced = [0]
    ring = vmm.coalesced
    if ring is not None:
        drain = ring.drain

        def counting_drain(write_pio: Any, write_mmio: Any) -> int:
            n = drain(write_pio, write_mmio)
            coalesced[0] += n
            return n

        ring.drain = counting_drain  # type: ignore[method-assign]
    try:
        result = vmm.run()
    finally:
        vmm.close()
    ended = time.monotonic()
    report = {
        "exit_code": result.code,
        "start_to_vmm_built_s": round(built_age, 3),
        "run_s": round(ended - built, 3),
        # Writes the kernel recorded without an exit (replayed through the bus, so they are
        # also in the per-address counts below).
        "coalesced_writes": coalesced[0],
        "port_exits": sum(io.counts.values()) - coalesced[0],
        "port_handler_s": round(sum(io.seconds.values()), 3),
        "mmio_exits": sum(mmio.counts.values()),
        "mmio_handler_s": round(sum(mmio.seconds.values()), 3),
        "ports": io.report("{:#x}")[:25],
        "mmio": mmio.report("{:#x}")[:10],
    }
    print(json.dumps(report, indent=1), file=sys.stderr)
    return result.code


if __name__ == "__main__":
    sys.exit(main())
