"""Benchmarks on this host's own KVM with the probe guest: start-up and memory, the cost of an
exit, and virtio-blk throughput. Each runs the same probe binary under pyvmm and under QEMU.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.measure import PYVMM, QEMU, THREADS, Row, interleave
from bench.vmms import PROBE, ROOT, pyvmm_argv, pyvmm_threads_argv, qemu_argv

ArgvFor = Callable[..., list[str]]
GiB = 1 << 30
SEQ_BLOCK = 64 << 10
RAND_BLOCK = 4 << 10
# /proc/<pid>/stat fields after "pid (comm)", from 0: ppid, and utime, stime, cutime, cstime.
STAT_PPID = 1
STAT_UTIME = 11
STAT_CSTIME = 14
UNTIMED_TRIES = 3


@dataclass(frozen=True)
class Run:
    wall_s: float
    first_byte_s: float | None
    peak_rss_mib: float
    # Each line of the guest's serial output: when it arrived (seconds after the start), the
    # VMM's CPU time (all threads) by then, and the text.
    lines: list[tuple[float, float, str]]
    # For each line, which read of the VMM's output brought it: lines that came in one read
    # were timed together, however far apart the guest printed them.
    reads: list[int]


class Untimed(Exception):
    """Two lines a figure is taken between arrived together (the reader was kept off the CPU
    while the guest printed both), so the time between them was not seen."""


def process_cpu_s(pid: int) -> float:
    """Seconds all of a live process's threads have run so far (nanosecond schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended between the listing and the read
    return total / 1e9


def tree_cpu_s(pid: int) -> float:
    """Seconds a live process and all its descendants (a VMM's device processes) have run so
    far, with their threads that have ended and the children they have reaped: user and system
    time from /proc/<pid>/stat, in clock ticks (10 ms). Not the live threads' schedstat, which
    forgets a thread once it ends: pyvmm's device worker thread ends at every device reset, and
    the VMM's vCPU thread before its last lines are read."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses.
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a process that ended between the listing and the read
        children.setdefault(int(fields[STAT_PPID]), []).append(int(entry))
        ticks[int(entry)] = sum(int(t) for t in fields[STAT_UTIME : STAT_CSTIME + 1])
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending += children.get(current, [])
        total += ticks.get(current, 0)
    return total / os.sysconf("SC_CLK_TCK")


def run_vmm(
    argv: list[str],
    on_line: Callable[[str], None] | None = None,
    cpu: Callable[[int], float] = process_cpu_s,
) -> Run:
    """Run a VMM to its exit, timing its output line by line; a failure raises. Each line goes
    to `on_line` as it comes; `cpu` reads the VMM's CPU time at each (its own threads, by
    default)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    first_byte: float | None = None
    lines: list[tuple[float, float, str]] = []
    reads: list[int] = []
    pending = b""
    for read in itertools.count():
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        now = time.perf_counter() - start
        if first_byte is None:
            first_byte = now
        used = cpu(proc.pid)  # the process is not reaped yet: /proc still has it
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            text = raw.decode(errors="replace") + "\n"
            lines.append((now, used, text))
            reads.append(read)
            if on_line is not None:
                on_line(text)
    if pending:
        text = pending.decode(errors="replace")
        lines.append((time.perf_counter() - start, cpu(proc.pid), text))
        reads.append(-1)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    failed = [text.strip() for _, _, text in lines if " FAIL " in text]
    if code != 0 or failed:
        raise RuntimeError(
            f"{argv[0]} ... exited {code}: {failed or lines[-3:]}\n  {' '.join(argv)}"
        )
    return Run(wall, first_byte, usage.ru_maxrss / 1024, lines, reads)


def _jobs(
    make: Callable[[ArgvFor], Callable[[], dict[str, float]]], qemu: bool
) -> dict[str, Callable[[], dict[str, float]]]:
    jobs = {PYVMM: make(pyvmm_argv), THREADS: make(pyvmm_threads_argv)}
    if qemu:
        jobs[QEMU] = make(qemu_argv)
    return jobs


def _fill(
    rows: list[Row], results: dict[str, dict[str, list[float]]], keys: list[str]
) -> list[Row]:
    for row, key in zip(rows, keys, strict=True):
        for vmm, values in results.items():
            row.record(vmm, values[key])
    return rows


def startup(runs: int, qemu: bool) -> list[Row]:
    """Process start to the probe's first serial byte and to the process's exit, and the VMM's
    peak RSS (guest RAM the probe touched included: the same on both)."""

    def make(argv_for: ArgvFor) -> Callable[[], dict[str, float]]:
        def job() -> dict[str, float]:
            run = run_vmm(argv_for(PROBE, ["probe=cmdline"]))
            assert run.first_byte_s is not None
            return {
                "first": run.first_byte_s * 1e3,
                "exit": run.wall_s * 1e3,
                "rss": run.peak_rss_mib,
            }

        return job

    rows = [
        Row("startup", "to first serial byte", "ms", False),
        Row("startup", "to process exit", "ms", False),
        Row("startup", "peak RSS", "MiB", False),
    ]
    return _fill(rows, interleave(runs, _jobs(make, qemu)), ["first", "exit", "rss"])


def exits(runs: int, count: int, qemu: bool) -> list[Row]:
    """The probe's `outloop`: `count` writes to port 0x80 from CPL3, each a VM exit handled by
    the VMM. Wall time and VMM CPU time (all its threads) per exit, taken between the loop's
    `start` and `ok` lines, so the VMM's start-up and exit stay out of the figures."""

    def make(argv_for: ArgvFor) -> Callable[[], dict[str, float]]:
        def job() -> dict[str, float]:
            argv = argv_for(PROBE, ["probe=outloop", f"probe.count={count}"])
            wall, cpu = _timed_between(argv, "PROBE outloop start", "PROBE outloop ok")
            return {"wall": wall / count * 1e6, "cpu": cpu / count * 1e6}

        return job

    rows = [
        Row("exit", "port write round trip", "us", False),
        Row("exit", "VMM CPU per exit", "us", False),
    ]
    return _fill(rows, interleave(runs, _jobs(make, qemu)), ["wall", "cpu"])


def _timed_between(argv: list[str], start: str, end: str) -> tuple[float, float]:
    """`_between` of a run of argv, run again (up to UNTIMED_TRIES in all) while the two lines
    arrive in one read."""
    for _ in range(UNTIMED_TRIES - 1):
        try:
            return _between(run_vmm(argv), start, end)
        except Untimed:
            pass
    return _between(run_vmm(argv), start, end)


def _between(run: Run, start: str, end: str) -> tuple[float, float]:
    """(wall seconds, VMM CPU seconds) between the serial lines starting with `start` and with
    `end`."""
    first = next(i for i, (_, _, text) in enumerate(run.lines) if text.startswith(start))
    last = next(i for i, (_, _, text) in enumerate(run.lines) if text.startswith(end))
    if run.reads[first] == run.reads[last]:
        raise Untimed(f"{start!r} and {end!r} came in one read of the output")
    return run.lines[last][0] - run.lines[first][0], run.lines[last][1] - run.lines[first][1]


def host_preadv(image: Path, seq_bytes: int, rand_reqs: int) -> tuple[float, float]:
    """(sequential 64 KiB MB/s, random 4 KiB IOPS) of one host thread's os.preadv on the file."""
    fd = os.open(image, os.O_RDONLY)
    try:
        view = memoryview(bytearray(SEQ_BLOCK))
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
    return seq, iops


def blk(runs: int, image_bytes: int, rand_bytes: int, qemu: bool) -> list[Row]:
    """The probe's `blkbench` on raw images held in the page cache: sequential 64 KiB reads (8
    in flight) over the whole image and random 4 KiB reads at queue depth 1 and 32, the guest
    spinning on the used ring; then sequential and QD32 again with the guest halting until a
    used-buffer interrupt (as a real driver waits, leaving the CPU to the VMM), on one disk and
    on two disks busy at once (the totals over both): whether two devices scale past one.
    Timed between its `start` and `ok` lines. The host column: one thread's os.preadv on the
    same file."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("PYVMM_BENCH_DIR", "/var/tmp")) as d:
        images = [Path(d) / "bench0.img", Path(d) / "bench1.img"]
        chunk = os.urandom(1 << 20)
        for image in images:
            with open(image, "wb") as f:
                for _ in range(image_bytes >> 20):
                    f.write(chunk)
        host_preadv(images[1], image_bytes, 0)  # into the page cache
        host_seq, host_iops = host_preadv(images[0], image_bytes, 20000)

        def make(argv_for: ArgvFor) -> Callable[[], dict[str, float]]:
            def job() -> dict[str, float]:
                out: dict[str, float] = {}
                for key, mode, wait, ndisks in BLK_RUNS:
                    seq = mode == "seq"
                    nbytes = image_bytes if seq else rand_bytes
                    params = [
                        "probe=blkbench",
                        f"probe.bench={mode}",
                        f"probe.bytes={nbytes}",
                        f"probe.wait={wait}",
                        f"probe.disks={ndisks}",
                    ]
                    run = run_vmm(argv_for(PROBE, params, disks=images[:ndisks]))
                    seconds, _ = _between(run, "PROBE blkbench start", "PROBE blkbench ok")
                    moved = nbytes * ndisks
                    out[key] = moved / seconds / 1e6 if seq else moved / RAND_BLOCK / seconds
                return out

            return job

        results = interleave(runs, _jobs(make, qemu))
    rows = [
        Row("blk", "sequential 64 KiB read, polled", "MB/s", True, host=host_seq),
        Row("blk", "random 4 KiB read, QD1, polled", "IOPS", True, host=host_iops),
        Row("blk", "random 4 KiB read, QD32, polled", "IOPS", True, host=host_iops),
        Row("blk", "sequential 64 KiB read, irq, 1 disk", "MB/s", True),
        Row("blk", "sequential 64 KiB read, irq, 2 disks at once", "MB/s", True),
        Row("blk", "random 4 KiB read, QD32, irq, 1 disk", "IOPS", True),
        Row("blk", "random 4 KiB read, QD32, irq, 2 disks at once", "IOPS", True),
    ]
    return _fill(rows, results, [key for key, *_ in BLK_RUNS])


# (result key, probe.bench, probe.wait, disks), in the order of blk()'s rows.
BLK_RUNS = [
    ("seq", "seq", "poll", 1),
    ("rand1", "rand1", "poll", 1),
    ("rand32", "rand32", "poll", 1),
    ("seq_irq", "seq", "irq", 1),
    ("seq_irq2", "seq", "irq", 2),
    ("rand32_irq", "rand32", "irq", 1),
    ("rand32_irq2", "rand32", "irq", 2),
]


@dataclass(frozen=True)
class ProbeCase:
    """One case of a probe benchmark test (netbench, vsockbench) in a run, from its serial
    lines: `PROBE <test> start <dir> <n>` and the `ok` line after it."""

    direction: str
    amount: int  # the start line's number: a datagram's size, bytes, connections
    cpu_s: float  # the VMM's CPU time (its process tree) from the `start` line to the `ok` line
    details: list[str]  # the `ok` line's words after "ok"


def probe_cases(test: str, lines: list[tuple[float, float, str]]) -> list[ProbeCase]:
    """Each `PROBE <test> start <dir> <n>` line of `lines` paired with the `ok` line after it."""
    out: list[ProbeCase] = []
    start: tuple[str, int, float] | None = None
    for _, cpu, text in lines:
        words = text.split()
        if words[:3] == ["PROBE", test, "start"]:
            start = (words[3], int(words[4]), cpu)
        elif words[:3] == ["PROBE", test, "ok"] and start is not None:
            direction, amount, begin = start
            out.append(ProbeCase(direction, amount, cpu - begin, words[3:]))
            start = None
    return out
