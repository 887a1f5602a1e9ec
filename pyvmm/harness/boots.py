"""Boot Linux guests and record what they report: the part of the Linux suite that runs on a KVM
host, natively or inside the test VM (`python -m pyvmm.harness.boots SPEC.json RESULT.json`).

A boot is a VMM command line (pyvmm, or QEMU for comparison) whose serial output carries
`GUEST <check> ok|FAIL ...` lines from the kit's init. Each boot's output, exit status and timings
are written to the result file for the host-side tests and benchmarks to judge. A boot can also
run commands when a line appears on the console (`pyvmm stop SOCKET` once the guest is ready),
and record the state of files before and after it (a disk image's allocated bytes, a socket),
seen from where the VMM ran.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GUEST_LINE = re.compile(r"GUEST (\S+) (ok|FAIL)(?: (.*))?$")
INPUT_READY = b"GUEST input ready"
DEFAULT_TIMEOUT = 180.0
STACKS_SIGNAL = signal.SIGUSR2  # pyvmm dumps its threads' stacks on this (pyvmm/cli.py)
TRIPLE_FAULT = "triple fault"  # what pyvmm logs when the guest's vCPU shuts down
# A guest booted with BEAT_PARAM prints BEAT every BEAT_S while its checks run. Once it has, a
# console silent for BEAT_STALL_S means the guest stopped (as nested KVM under emulation has
# been seen to, after a check began): the boot is a hang then, not at its whole timeout.
BEAT_S = 10
BEAT_PARAM = f"pyvmm.beat={BEAT_S}"
BEAT = b"GUEST-BEAT"
BEAT_STALL_S = 9 * BEAT_S
DONE = b"GUEST done"  # the checks have ended, and with them the beat
STACK_DUMP_WAIT_S = 3.0
# unshare execs the VMM in a new network namespace (so the VMM keeps its pid).
NEW_NETNS = ["unshare", "--net", "--"]


@dataclass(frozen=True)
class BootSpec:
    name: str
    argv: list[str]
    timeout: float = DEFAULT_TIMEOUT
    # A line to type on the console once the guest says "GUEST input ready".
    type_line: str | None = None
    # Commands to run while the VMM runs: marker -> argv, run once when the marker first appears
    # in the console output (with the timeout that is left), beside the console's reading.
    on_line: dict[str, list[str]] = field(default_factory=dict)
    # Paths whose state is recorded just before the VMM starts and just after it exits.
    watch: list[str] = field(default_factory=list)
    # Run the VMM, and the on_line commands, in a network namespace of their own (needs root):
    # for boots that make TAPs, whose packets must stay there (DESIGN.md, "Tests that use the
    # network").
    netns: bool = False


@dataclass(frozen=True)
class FileState:
    size: int
    allocated: int  # bytes of storage the file holds (st_blocks * 512)
    kind: str  # "file", "socket", "dir" or "other"


@dataclass
class CommandResult:
    """A command an `on_line` marker started."""

    marker: str
    argv: list[str]
    returncode: int | None  # None: it did not finish before the boot's timeout
    output: str  # its stdout and stderr
    at_s: float  # when it started, seconds after the VMM
    # The boot's watched paths just before the command started.
    watched: dict[str, FileState | None] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CommandResult:
        fields = dict(data)
        fields["watched"] = {
            path: None if s is None else FileState(**s)
            for path, s in data.get("watched", {}).items()
        }
        return cls(**fields)


@dataclass
class BootResult:
    name: str
    argv: list[str]
    returncode: int | None
    output: str
    stderr: str
    wall_s: float
    # Wall time from starting the VMM to the guest's first GUEST line (its init running).
    to_init_s: float | None
    timed_out: bool = False  # or stopped: silent for BEAT_STALL_S after a BEAT
    checks: dict[str, list[str]] = field(default_factory=dict)
    commands: list[CommandResult] = field(default_factory=list)
    # path -> [state before, state after]; None where the path did not exist.
    watched: dict[str, list[FileState | None]] = field(default_factory=dict)
    # When the boot hung (or, in the test VM, its guest triple-faulted) and was run again: the
    # first attempt's console tail and pyvmm's stderr (thread stacks after a hang), so a flaky
    # failure is reported, not hidden.
    hung_attempt: str | None = None
    # (wall seconds since the VMM started, the check's name) as each check's GUEST line came:
    # where a slow boot spent its time.
    timeline: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BootResult:
        """The inverse of dataclasses.asdict (results come back from the test VM as JSON)."""
        fields = dict(data)
        fields["commands"] = [CommandResult.from_dict(c) for c in data.get("commands", [])]
        fields["watched"] = {
            path: [None if s is None else FileState(**s) for s in states]
            for path, states in data.get("watched", {}).items()
        }
        fields["timeline"] = [(float(t), str(name)) for t, name in data.get("timeline", [])]
        return cls(**fields)


def command_report(commands: list[CommandResult], marker: str, name: str) -> dict[str, Any]:
    """The JSON object the last line of the command `marker` started printed (a peer's report):
    {} when it never ran or did not finish, {"error": ...} when it said something else."""
    command = next((c for c in commands if c.marker == marker), None)
    if command is None or command.returncode is None:
        return {}
    output = command.output.strip()
    try:
        report = json.loads(output.splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"{name} said: {output}"}
    return report if isinstance(report, dict) else {"error": f"{name} said: {output}"}


def file_state(path: str) -> FileState | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
    else:
        kind = "other"
    return FileState(st.st_size, st.st_blocks * 512, kind)


def run_command(
    marker: str, argv: list[str], timeout: float, at_s: float, watch: list[str]
) -> CommandResult:
    watched = {path: file_state(path) for path in watch}
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=max(timeout, 1.0),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else ""
        return CommandResult(marker, argv, None, output, at_s, watched)
    except OSError as e:
        why = f"cannot run {argv[0]}: {e.strerror}"
        return CommandResult(marker, argv, None, why, at_s, watched)
    output = proc.stdout.decode(errors="replace")
    return CommandResult(marker, argv, proc.returncode, output, at_s, watched)


class _Commands:
    """The on-line commands of one boot, run one after another (each in the order its marker
    came, as the guest's checks expect) in a thread of their own, so that the console is read
    while they run: a guest printing meanwhile must not fill the pipe and stall its VMM."""

    def __init__(self, watch: list[str]) -> None:
        self._watch = watch
        self._queue: queue.SimpleQueue[tuple[str, list[str], float, float] | None] = (
            queue.SimpleQueue()
        )
        self._results: list[CommandResult] = []
        self._thread: threading.Thread | None = None

    def add(self, marker: str, argv: list[str], deadline: float, at_s: float) -> None:
        """Run `argv` once those before it have ended, until time.monotonic() `deadline`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="on-line", daemon=True)
            self._thread.start()
        self._queue.put((marker, argv, deadline, at_s))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            marker, argv, deadline, at_s = item
            timeout = deadline - time.monotonic()
            self._results.append(run_command(marker, argv, timeout, at_s, self._watch))

    def results(self) -> list[CommandResult]:
        """Every command's result, once the last has ended (each is bounded by its deadline)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        return self._results


def in_netns_of(pid: int, argv: list[str]) -> list[str]:
    """`argv`, to be run in the network namespace of the process `pid`."""
    return ["nsenter", f"--target={pid}", "--net", "--", *argv]


def parse_checks(output: str) -> dict[str, list[str]]:
    checks: dict[str, list[str]] = {}
    for line in output.splitlines():
        m = GUEST_LINE.search(line.strip())
        if m:
            checks[m.group(1)] = [m.group(2), m.group(3) or ""]
    return checks


def run_boot(spec: BootSpec) -> BootResult:
    """Run one boot, reading its console as it comes so the guest can be typed at."""
    master = slave = -1
    if spec.type_line is not None:
        master, slave = os.openpty()
        stdin: int = slave
    else:
        stdin = subprocess.DEVNULL
    before = {path: file_state(path) for path in spec.watch}
    pending = {marker.encode(): (marker, argv) for marker, argv in spec.on_line.items()}
    commands = _Commands(spec.watch)
    start = time.monotonic()
    argv = [*NEW_NETNS, *spec.argv] if spec.netns else spec.argv
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    to_init: float | None = None
    timeline: list[tuple[float, str]] = []
    seen = 0  # how much of `out` has been searched for GUEST lines
    typed = False
    timed_out = False
    heard = start  # when the console last said something
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    try:
        while streams:
            remaining = spec.timeout - (time.monotonic() - start)
            if remaining <= 0:
                timed_out = True
                break
            if time.monotonic() - heard > BEAT_STALL_S and BEAT in out and DONE not in out:
                err.extend(f"boots: the guest stopped beating {BEAT_STALL_S} s ago\n".encode())
                timed_out = True
                break
            ready, _, _ = select.select(list(streams), [], [], min(remaining, 1.0))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                    continue
                streams[fd].extend(chunk)
                if fd == proc.stdout.fileno():
                    heard = time.monotonic()
            end = out.rfind(b"\n") + 1
            if end > seen:
                now = time.monotonic() - start
                timeline += [(now, name) for name in _guest_line_names(out[seen:end])]
                seen = end
                if to_init is None and timeline:
                    to_init = timeline[0][0]
            if spec.type_line is not None and not typed and INPUT_READY in out:
                os.write(master, spec.type_line.encode() + b"\n")
                typed = True
            for key in sorted((k for k in pending if k in out), key=out.find):
                marker, command = pending.pop(key)
                if spec.netns:
                    command = in_netns_of(proc.pid, command)
                commands.add(marker, command, start + spec.timeout, time.monotonic() - start)
    finally:
        if proc.poll() is None and timed_out:
            # Ask pyvmm for every thread's stack (on stderr) before killing it: a hung VMM
            # should leave evidence of where it hung.
            proc.send_signal(STACKS_SIGNAL)
            err.extend(_drain(proc.stderr.fileno(), STACK_DUMP_WAIT_S))
            proc.kill()
        returncode = proc.wait()
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
    after = {path: file_state(path) for path in spec.watch}
    text = out.decode(errors="replace")
    return BootResult(
        spec.name,
        spec.argv,
        None if timed_out else returncode,
        text,
        err.decode(errors="replace"),
        time.monotonic() - start,
        to_init,
        timed_out,
        parse_checks(text),
        commands.results(),
        {path: [before[path], after[path]] for path in spec.watch},
        timeline=timeline,
    )


def _guest_line_names(text: bytes | bytearray) -> list[str]:
    """The check names (second word) of the GUEST lines in `text`, in order."""
    names = []
    for line in text.split(b"\n"):
        at = line.find(b"GUEST ")
        if at >= 0:
            words = line[at:].decode(errors="replace").split()
            names.append(" ".join(words[1:3]))
    return names


def _drain(fd: int, seconds: float) -> bytes:
    """What arrives on `fd` within `seconds`."""
    data = bytearray()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data.extend(chunk)
    return bytes(data)


def run_boots(specs: list[BootSpec], emulated: bool = False) -> list[BootResult]:
    """Run each boot; a boot that hangs (times out) is run once more, and the hang is kept in
    the result's `hung_attempt`. Nested KVM under software emulation has shown rare hangs of
    a secondary vCPU (an RCU stall in the guest) that did not come back on a rerun. So has a
    guest's triple fault while a balloon gave its memory back (in about one in five such
    boots, never on a KVM host): with `emulated` (the boots run in the test VM), such a boot
    is run once more too, and the first attempt kept the same way."""
    results = []
    for spec in specs:
        result = _run_reporting(spec)
        faulted = emulated and TRIPLE_FAULT in result.stderr
        if result.timed_out or faulted:
            what = "triple fault" if faulted else "hang"
            console, stderr = result.output[-1500:], result.stderr[-6000:]
            hung = f"{what}; console: ...{console}\nstderr: ...{stderr}"
            result = _run_reporting(spec)
            result.hung_attempt = hung
        results.append(result)
    return results


def _run_reporting(spec: BootSpec) -> BootResult:
    """run_boot, saying on stderr when each boot starts and ends: inside the test VM that is
    the evidence the host shows if the test VM stops."""
    print(f"boots: {spec.name} started", file=sys.stderr, flush=True)
    result = run_boot(spec)
    how = "timed out" if result.timed_out else f"status {result.returncode}"
    print(f"boots: {spec.name} {how} after {result.wall_s:.1f} s", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pyvmm.harness.boots SPEC.json RESULT.json", file=sys.stderr)
        return 2
    specs = [BootSpec(**s) for s in json.loads(Path(args[0]).read_text())]
    results = run_boots(specs, emulated=True)  # only the test VM runs this
    tmp = Path(args[1] + ".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in results], indent=1))
    tmp.replace(args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
