"""balloon benchmark (native, with the probe's `balloon` driver): how soon memory leaves the host
once it is asked for, and how fast, with pyvmm's device jailed in its process.

- low-memory signal to the first MiB freed: the VM's low-memory policy watches a directory laid
  out as Chrome OS's (`--low-mem-dir`); at time 0 its `available` falls under its `margin`, and
  the clock stops when the guest's memfd holds 1 MiB less. The policy reads the directory once a
  second (its sampling; Chrome OS would wake it at once), so this is that wait plus the rest.
- balloon command to the first MiB freed: the same from the control socket's `balloon` command
  (what `pyvmm balloon` sends, without its interpreter's start-up): the VMM, the device process,
  the config interrupt, the guest's inflate, MADV_REMOVE.
- inflate rate: INFLATE_MIB MiB from the command to the memfd holding that much less.

The memfd's allocated size is read as the host sees it (`/proc/<pid>/fd/<n>`), every POLL_S.
pyvmm only: QEMU has no low-memory policy, and its virtio-balloon is compared with Linux in the
test VM (bin/bench --only linux).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.measure import PYVMM, Row
from bench.vmms import PROBE, ROOT, pyvmm_argv
from pyvmm.control.client import send_command

MiB = 1 << 20
MEM_MIB = 512  # the policy's balloon: half of it at most, in 16 MiB steps
POOL_MIB = 64  # the probe's pool: what it can give
INFLATE_MIB = 48
FIRST_MIB = 1
POLL_S = 0.0005
WAIT_S = 30.0
RAM_MEMFD = "/memfd:pyvmm-guest-ram"
NO_QEMU = "balloon: pyvmm only (QEMU has no low-memory policy; its balloon is in the linux rows)"


def _memfd(pid: int) -> str:
    """/proc/<pid>/fd/<n> of the VMM's guest memory."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith(RAM_MEMFD):
                return path
        except OSError:
            continue
    raise RuntimeError(f"pyvmm ({pid}) holds no {RAM_MEMFD}")


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _wait_for_drop(path: str, base: int, drop: int, start: float) -> float:
    """Seconds from `start` until the memfd holds `drop` bytes less than `base`."""
    while _allocated(path) > base - drop:
        if time.monotonic() - start > WAIT_S:
            raise RuntimeError(f"the guest's memory did not shrink by {drop >> 20} MiB in time")
        time.sleep(POLL_S)
    return time.monotonic() - start


class ProbeVm:
    def __init__(self, directory: Path) -> None:
        self.sock = directory / "ctl.sock"
        self.low_mem = directory / "low_mem"
        self.low_mem.mkdir()
        self._write("available", 1 << 20)
        self._write("margin", 0)
        params = ["probe=balloon", f"probe.balloon.mib={POOL_MIB}"]
        extra = ["-s", str(self.sock), "--low-mem-dir", str(self.low_mem)]
        argv = pyvmm_argv(PROBE, params, mem_mib=MEM_MIB, extra=extra)
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "PROBE balloon ready" in line:
                break
            if "FAIL" in line:
                raise RuntimeError(f"probe: {line.strip()}")
        else:
            raise RuntimeError(f"pyvmm exited {self.proc.wait()} before the probe was ready")
        self.memfd = _memfd(self.proc.pid)

    def _write(self, name: str, mib: int) -> None:
        temporary = self.low_mem / f"{name}.new"
        temporary.write_text(f"{mib}\n")
        temporary.rename(self.low_mem / name)

    def low_memory(self) -> None:
        self._write("margin", 100)
        self._write("available", 0)

    def balloon(self, num_bytes: int) -> None:
        """What `pyvmm balloon` sends (without its interpreter's start-up)."""
        reply = send_command(str(self.sock), {"cmd": "balloon", "bytes": num_bytes})
        if not reply["ok"]:
            raise RuntimeError(f"balloon: {reply['error']}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def balloon(runs: int) -> list[Row]:
    signal = Row("balloon", "low-memory signal to the first MiB freed", "ms", False)
    command = Row("balloon", "balloon command to the first MiB freed", "ms", False)
    rate = Row("balloon", f"inflate {INFLATE_MIB} MiB (probe guest)", "MiB/s", True)
    samples: dict[str, list[float]] = {"signal": [], "command": [], "rate": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pyvmm-bench-balloon-") as d:
            vm = ProbeVm(Path(d))
            try:
                base = _allocated(vm.memfd)
                start = time.monotonic()
                vm.low_memory()
                samples["signal"].append(_wait_for_drop(vm.memfd, base, FIRST_MIB * MiB, start))
            finally:
                vm.close()
        with tempfile.TemporaryDirectory(prefix="pyvmm-bench-balloon-") as d:
            vm = ProbeVm(Path(d))
            try:
                base = _allocated(vm.memfd)
                start = time.monotonic()
                vm.balloon(INFLATE_MIB * MiB)
                samples["command"].append(_wait_for_drop(vm.memfd, base, FIRST_MIB * MiB, start))
                whole = _wait_for_drop(vm.memfd, base, INFLATE_MIB * MiB, start)
                samples["rate"].append(INFLATE_MIB / whole)
            finally:
                vm.close()
    signal.record(PYVMM, [s * 1000 for s in samples["signal"]])
    command.record(PYVMM, [s * 1000 for s in samples["command"]])
    rate.record(PYVMM, samples["rate"])
    return [signal, command, rate]
