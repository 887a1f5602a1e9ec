"""virtio-blk throughput from the probe guest, beside the host's own preadv on the same file.

A 1 GiB raw image is made and read once so it sits in the page cache. The probe guest then
reads it (`blkbench`): sequential 64 KiB requests (8 in flight), and random 4 KiB requests at
queue depth 1 and 32; the time is taken between its `start` and `ok` lines on the serial port.
The host figure is one thread doing the same reads with os.preadv. `python -m bench.blk`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "guest" / "build" / "probe.elf"
GiB = 1 << 30
SEQ_BLOCK = 64 << 10
RAND_BLOCK = 4 << 10


def host_rates(image: Path, seq_bytes: int, rand_reqs: int) -> dict[str, float]:
    fd = os.open(image, os.O_RDONLY)
    try:
        buf = bytearray(SEQ_BLOCK)
        view = memoryview(buf)
        start = time.perf_counter()
        for off in range(0, seq_bytes, SEQ_BLOCK):
            os.preadv(fd, [view], off)
        seq = seq_bytes / (time.perf_counter() - start) / 1e6
        small = memoryview(bytearray(RAND_BLOCK))
        rng = random.Random(1)
        blocks = os.fstat(fd).st_size // RAND_BLOCK
        start = time.perf_counter()
        for _ in range(rand_reqs):
            os.preadv(fd, [small], rng.randrange(blocks) * RAND_BLOCK)
        iops = rand_reqs / (time.perf_counter() - start)
    finally:
        os.close(fd)
    return {"seq_read_MBps": round(seq), "rand_read_iops": round(iops)}


def guest_run(image: Path, mode: str, nbytes: int) -> tuple[float, float]:
    """(seconds between the probe's start and ok lines, pyvmm CPU seconds for the run).
    blkbench only reads, but it looks for a writable disk."""
    cmd = [sys.executable, "-m", "pyvmm", "run", "--rwdisk", str(image), "-p", "probe=blkbench"]
    cmd += ["-p", f"probe.bench={mode}", "-p", f"probe.bytes={nbytes}", str(PROBE)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    started = finished = None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").strip()
        if line == "PROBE blkbench start":
            started = time.perf_counter()
        elif line.startswith("PROBE blkbench ok"):
            finished = time.perf_counter()
        elif line.startswith("PROBE blkbench FAIL"):
            raise RuntimeError(line)
    proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if started is None or finished is None:
        raise RuntimeError(f"blkbench {mode} did not report (exit {proc.returncode})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return finished - started, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.blk")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seq-bytes", type=int, default=GiB)
    parser.add_argument("--rand-bytes", type=int, default=64 << 20)
    args = parser.parse_args(argv)
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("PYVMM_BENCH_DIR", "/var/tmp")) as d:
        image = Path(d) / "bench.img"
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(GiB >> 20):
                f.write(chunk)
        host = host_rates(image, GiB, 20000)  # also pulls the image into the page cache
        results: dict[str, Any] = {"host_preadv": host}
        for mode, nbytes, block in (
            ("seq", args.seq_bytes, SEQ_BLOCK),
            ("rand1", args.rand_bytes, RAND_BLOCK),
            ("rand32", args.rand_bytes, RAND_BLOCK),
        ):
            runs = [guest_run(image, mode, nbytes) for _ in range(args.runs)]
            seconds = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            entry: dict[str, Any] = {"bytes": nbytes, "seconds": round(seconds, 3)}
            if mode == "seq":
                entry["MBps"] = round(nbytes / seconds / 1e6)
                entry["ratio_to_host"] = round(entry["MBps"] / host["seq_read_MBps"], 3)
            else:
                entry["iops"] = round(nbytes / block / seconds)
                entry["ratio_to_host"] = round(entry["iops"] / host["rand_read_iops"], 3)
            entry["process_cpu_s_per_GiB"] = round(cpu / (nbytes / GiB), 2)
            results[mode] = entry
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
