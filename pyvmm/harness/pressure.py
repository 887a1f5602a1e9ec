"""Host memory pressure on several VMs at once, and the low-memory policy taking memory back:
the Linux balloon suite's "inflation under real pressure", run where the VMMs run.

    python -m pyvmm.harness.pressure --dir DIR --kernel BZIMAGE --initrd INITRD [options]

It starts --vms pyvmm VMs of --mem-mib MiB whose guests each write a file of --write-mib MiB and
delete it, then stay up --seconds more at most (the `pressure` check in guest/linux/init):
the guests have that memory free again, but the host holds it (the guests touched it), so the
host's MemAvailable has fallen, and only the balloons give it back. The policy of each VM
watches a low-memory directory laid out as Chrome OS's (`--low-mem-dir`): this program writes
the host's real MemAvailable into its `available` every MIRROR_S, and into its `margin` a level
set once every guest has written its file: MemAvailable then, plus --give-back of what it fell
by since the guests were ready. So the host is low from then on, by the same share of the fall
on any machine, however fast its guests write, until the balloons have given that much back.
The policies' timers are shortened (--timers). Once MemAvailable is back above the margin and
every balloon has been asked for SETTLED_STEPS sizes, the guests have shown what they are for:
this program types "enough" on their consoles, SETTLED_HOLD_S later, and they end.

Every SAMPLE_S it logs MemAvailable and each balloon's target and actual size. When the guests
are done it prints their lines (`GUEST <check>` as `GUEST vm<N>-<check>`), then one JSON object:
the margin, the timeline, each VMM's exit status, and how many processes the host's OOM killer
killed meanwhile (/proc/vmstat oom_kill).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyvmm.control.client import send_command
from pyvmm.control.protocol import ControlError

MiB = 1 << 20
SAMPLE_S = 0.5
MIRROR_S = 0.1
READY = b"GUEST pressure ready"
WRITTEN = b"GUEST-LOG pressure wrote"
FAILED = b"GUEST pressure FAIL"
DEFAULT_TIMERS = "0.5,20,2"  # re-check, first leave check, leave checks after it
BOOT_TIMEOUT_S = 300.0
WRITE_TIMEOUT_S = 400.0  # a bound on the guests' writing, two at once under emulation
PR_SET_PDEATHSIG = 1
SETTLED_STEPS = 3  # distinct balloon targets each VM's policy must have set
SETTLED_HOLD_S = 10.0  # how long the recovered state is watched before the guests are let go
ENOUGH = b"enough\n"


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def oom_kills() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


class Vm:
    """One pyvmm VM reading its disk, its console collected."""

    def __init__(self, index: int, args: argparse.Namespace, low_mem: Path) -> None:
        self.index = index
        directory = Path(args.dir)
        self.socket = str(directory / f"vm{index}.ctl")
        params = (
            f"pyvmm.check=pressure,dmesg pyvmm.pressure_mib={args.write_mib} "
            f"pyvmm.pressure_s={args.seconds}"
        )
        argv = [sys.executable, "-m", "pyvmm", "run", "-m", str(args.mem_mib), "-i", args.initrd]
        argv += ["-s", self.socket, "--low-mem-dir", str(low_mem)]
        argv += ["--balloon-policy-timers", args.timers, "-p", "quiet", "-p", params, args.kernel]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,  # its console: "enough" ends the guest's wait
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # a harness that kills this program kills its VMs
        )
        self.output = bytearray()
        self.stderr = b""
        self.ready = threading.Event()
        self.written = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output += line
            if READY in line:
                self.ready.set()
            elif WRITTEN in line or FAILED in line:
                self.written.set()
        self.written.set()  # a VM that ended writes no more

    def balloon(self) -> dict[str, Any] | None:
        try:
            request = {"cmd": "balloon_stats", "fresh": False}  # the sizes only
            reply = send_command(self.socket, request, timeout=5.0)
        except ControlError:
            return None
        balloon: dict[str, Any] | None = reply.get("balloon")
        return balloon

    def tell_enough(self) -> None:
        """Type "enough" on the guest's console: it stops waiting and ends."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(ENOUGH)
            self.proc.stdin.flush()
        except OSError:  # it has ended already
            pass

    def finish(self, timeout: float) -> int | None:
        try:
            _, err = self.proc.communicate(timeout=timeout)
            self.stderr = err
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stderr = self.proc.communicate()[1]
            return None
        self._reader.join(5)
        return self.proc.returncode

    def lines(self) -> list[str]:
        text = self.output.decode(errors="replace")
        return [line.replace("GUEST ", f"GUEST vm{self.index}-", 1) for line in text.splitlines()]


def sample(vms: list[Vm], start: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"t": round(time.monotonic() - start, 2)}
    entry["available_mib"] = mem_available_mib()
    for vm in vms:
        balloon = vm.balloon()
        if balloon is not None:
            entry[f"vm{vm.index}"] = {"target_mib": balloon["target"] / MiB,
                                      "actual_mib": balloon["actual"] / MiB}  # fmt: skip
    return entry


def settled(timeline: list[dict[str, Any]], margin: int, vms: int) -> float | None:
    """When (timeline seconds) MemAvailable first came back above `margin` after falling under
    it, with every VM's balloon asked for SETTLED_STEPS sizes by then; None if not yet."""
    low = False
    targets: list[set[float]] = [set() for _ in range(vms)]
    for entry in timeline:
        for i in range(vms):
            target = entry.get(f"vm{i}", {}).get("target_mib", 0)
            if target:
                targets[i].add(target)
        low = low or entry["available_mib"] < margin
        enough_steps = all(len(t) >= SETTLED_STEPS for t in targets)
        if low and enough_steps and entry["available_mib"] > margin:
            return float(entry["t"])
    return None


def _mirror_available(path: Path, stop: threading.Event) -> None:
    """The host's MemAvailable into `path`, as Chrome OS's kernel keeps its `available`."""
    while not stop.wait(MIRROR_S):
        write_whole(path, f"{mem_available_mib()}\n")


def write_whole(path: Path, text: str) -> None:
    """`text` into `path` so that a reader never sees it half written."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    temporary.rename(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.harness.pressure")
    parser.add_argument("--dir", required=True, help="where the sockets and files go")
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initrd", required=True)
    parser.add_argument("--vms", type=int, default=2)
    parser.add_argument("--mem-mib", type=int, default=1024)
    parser.add_argument("--write-mib", type=int, default=600)
    parser.add_argument(
        "--seconds", type=int, default=90, help="how long each guest stays up once it has written"
    )
    parser.add_argument("--give-back", type=float, default=0.25,
                        help="the share of MemAvailable's fall the host wants back")  # fmt: skip
    parser.add_argument("--timers", default=DEFAULT_TIMERS)
    args = parser.parse_args(argv)
    low_mem = Path(args.dir) / "low_mem"
    low_mem.mkdir(exist_ok=True)
    write_whole(low_mem / "available", f"{mem_available_mib()}\n")
    write_whole(low_mem / "margin", "0\n")  # never low until the guests run
    kills_before = oom_kills()
    stop = threading.Event()
    mirror = threading.Thread(target=_mirror_available, args=(low_mem / "available", stop))
    mirror.start()
    vms = [Vm(i, args, low_mem) for i in range(args.vms)]
    report: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        for vm in vms:
            if not vm.ready.wait(max(deadline - time.monotonic(), 0.0)):
                raise RuntimeError(f"vm{vm.index} never said {READY.decode()!r}")
        start_available = mem_available_mib()
        report.update(available_at_start_mib=start_available)
        start = time.monotonic()
        timeline = []
        while any(vm.proc.poll() is None for vm in vms):
            entry = sample(vms, start)
            if "margin_mib" not in report and all(vm.written.is_set() for vm in vms):
                fell = start_available - entry["available_mib"]
                margin = entry["available_mib"] + int(args.give_back * max(fell, 0))
                write_whole(low_mem / "margin", f"{margin}\n")
                report.update(margin_mib=margin, fell_mib=fell, low_from_s=entry["t"])
            timeline.append(entry)
            if "margin_mib" in report and "enough_at_s" not in report:
                at = settled(timeline, report["margin_mib"], len(vms))
                if at is not None and entry["t"] - at >= SETTLED_HOLD_S:
                    report["enough_at_s"] = entry["t"]
                    for vm in vms:
                        vm.tell_enough()
            time.sleep(SAMPLE_S)
        report["timeline"] = timeline
        if "margin_mib" not in report:
            raise RuntimeError("the guests ended before every one had written its file")
    except RuntimeError as e:
        report["error"] = str(e)
    report["exit"] = [vm.finish(BOOT_TIMEOUT_S + WRITE_TIMEOUT_S + args.seconds) for vm in vms]
    stop.set()
    mirror.join()
    report["oom_kills"] = oom_kills() - kills_before
    for vm in vms:
        print("\n".join(vm.lines()))
        if vm.proc.returncode:
            print(f"vm{vm.index} stderr: {vm.stderr.decode(errors='replace')[-2000:]}")
    print(json.dumps(report), flush=True)
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
