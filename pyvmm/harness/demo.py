"""What `bin/demo` runs: boot Debian's stock kernel under pyvmm and show what the guest reports.

Natively where this host's KVM can boot a stock kernel, else inside the test VM (saying so).
`--probe` boots the probe guest instead, which needs only this host's KVM.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from pyvmm.harness.boots import BootSpec
from pyvmm.harness.kit import KitError
from pyvmm.harness.linux import ROOT, LinuxHarness
from pyvmm.harness.testvm import TestVmError

PROBE_TESTS = "serial,cmos,e820,cpus,cmdline,timer"
DEMO_CHECKS = "uptime,mem,cpus,cmdline,rtc,dmesg"


def _say(line: str) -> None:
    print(f"demo: {line}", file=sys.stderr, flush=True)


def probe_demo() -> int:
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True)
    argv = ["-c", "2", "-m", "512", "-p", f"probe={PROBE_TESTS}"]
    argv += ["-p", "probe.cpus=2", "-p", "probe.mem=512", "guest/build/probe.elf"]
    _say("booting the probe guest (guest/build/probe.elf) with 2 vCPUs and 512 MiB")
    _say("$ pyvmm run " + " ".join(argv))
    os.chdir(ROOT)
    return subprocess.run([sys.executable, "-m", "pyvmm", "run", *argv]).returncode


def linux_demo() -> int:
    harness = LinuxHarness(progress=_say)
    _say(harness.placement.describe())
    _say("preparing the guest kit (Debian's kernel and an initramfs; cached after the first run)")
    files = harness.guest_files()
    argv = harness.pyvmm_argv(
        "-c", "2", "-m", "2048", "-i", str(files.initramfs), "-p", "quiet",
        "-p", f"pyvmm.check={DEMO_CHECKS}", "-p", "pyvmm.cpus=2", "-p", "pyvmm.mem=2048",
        str(files.bzimage),
    )  # fmt: skip
    _say("$ pyvmm run " + " ".join(argv[4:]))
    if not harness.placement.native:
        _say("booting the test VM, then pyvmm inside it (about half a minute under emulation)")
    [result] = harness.run([BootSpec("demo", argv)])
    sys.stdout.write(result.output)
    sys.stderr.write(result.stderr)
    if result.timed_out:
        _say("the guest did not finish in time")
        return 1
    _say(f"pyvmm exited with status {result.returncode}")
    return result.returncode or 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/demo", description=__doc__)
    parser.add_argument("--probe", action="store_true", help="boot the probe guest instead")
    args = parser.parse_args(argv)
    if args.probe:
        return probe_demo()
    try:
        return linux_demo()
    except (KitError, TestVmError) as e:
        _say(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
