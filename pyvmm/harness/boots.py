"""Boot Linux guests and record what they report: the part of the Linux suite that runs on a KVM
host, natively or inside the test VM (`python -m pyvmm.harness.boots SPEC.json RESULT.json`).

A boot is a VMM command line (pyvmm, or QEMU for comparison) whose serial output carries
`GUEST <check> ok|FAIL ...` lines from the kit's init. Each boot's output, exit status and timings
are written to the result file for the host-side tests and benchmarks to judge.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GUEST_LINE = re.compile(r"GUEST (\S+) (ok|FAIL)(?: (.*))?$")
INPUT_READY = b"GUEST input ready"
DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class BootSpec:
    name: str
    argv: list[str]
    timeout: float = DEFAULT_TIMEOUT
    # A line to type on the console once the guest says "GUEST input ready".
    type_line: str | None = None


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
    timed_out: bool = False
    checks: dict[str, list[str]] = field(default_factory=dict)


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
    start = time.monotonic()
    proc = subprocess.Popen(spec.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    to_init: float | None = None
    typed = False
    timed_out = False
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    try:
        while streams:
            remaining = spec.timeout - (time.monotonic() - start)
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(list(streams), [], [], min(remaining, 1.0))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                    continue
                streams[fd].extend(chunk)
            if to_init is None and b"GUEST " in out:
                to_init = time.monotonic() - start
            if spec.type_line is not None and not typed and INPUT_READY in out:
                os.write(master, spec.type_line.encode() + b"\n")
                typed = True
    finally:
        if proc.poll() is None and timed_out:
            proc.kill()
        returncode = proc.wait()
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
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
    )


def run_boots(specs: list[BootSpec]) -> list[BootResult]:
    return [run_boot(spec) for spec in specs]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pyvmm.harness.boots SPEC.json RESULT.json", file=sys.stderr)
        return 2
    specs = [BootSpec(**s) for s in json.loads(Path(args[0]).read_text())]
    results = run_boots(specs)
    tmp = Path(args[1] + ".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in results], indent=1))
    tmp.replace(args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
