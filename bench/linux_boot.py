"""Boot time of Debian's stock kernel to its init: pyvmm beside QEMU on the same KVM.

Natively where this host's KVM boots a stock kernel, else both run inside one test VM, where
absolute times mean little (everything is emulated) and only the ratio carries over. Runs are
interleaved (pyvmm, QEMU, pyvmm, QEMU, ...) and medians reported.

`python -m bench.linux_boot [--runs N]` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from pyvmm.harness.boots import BootResult, BootSpec
from pyvmm.harness.linux import LinuxHarness

MEM_MIB = 1024
CHECKS = "pyvmm.check=uptime"


def qemu_argv(bzimage: str, initramfs: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", "pc", "-smp", "1",
        "-m", str(MEM_MIB), "-nodefaults", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-kernel", bzimage, "-initrd", initramfs,
        "-append", f"console=ttyS0 reboot=k panic=1 quiet {CHECKS}",
    ]  # fmt: skip


def _summary(results: list[BootResult]) -> dict[str, Any]:
    ok = [r for r in results if r.returncode == 0 and "uptime" in r.checks]
    if not ok:
        return {"error": (results[0].stderr or results[0].output)[-500:] if results else "no runs"}
    return {
        "runs": len(ok),
        "guest_uptime_at_init_s": round(
            statistics.median(float(r.checks["uptime"][1]) for r in ok), 2
        ),
        "wall_to_init_s": round(statistics.median(r.to_init_s or 0.0 for r in ok), 2),
        "wall_to_exit_s": round(statistics.median(r.wall_s for r in ok), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linux_boot")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    harness = LinuxHarness(progress=print)
    files = harness.guest_files()
    pyvmm = harness.pyvmm_argv(
        "-m", str(MEM_MIB), "-i", str(files.initramfs), "-p", "quiet", "-p", CHECKS,
        str(files.bzimage),
    )  # fmt: skip
    qemu = qemu_argv(str(files.bzimage), str(files.initramfs))
    specs: list[BootSpec] = []
    for i in range(args.runs):
        specs.append(BootSpec(f"pyvmm-{i}", pyvmm))
        specs.append(BootSpec(f"qemu-{i}", qemu))
    results = harness.run(specs)
    report = {
        "where": harness.placement.describe(),
        "kernel": harness.kit.kernel().version,
        "pyvmm": _summary([r for r in results if r.name.startswith("pyvmm")]),
        "qemu": _summary([r for r in results if r.name.startswith("qemu")]),
        "qemu_command": " ".join(qemu),
    }
    p, q = report["pyvmm"], report["qemu"]
    if "wall_to_init_s" in p and "wall_to_init_s" in q:
        report["pyvmm_over_qemu_wall_to_init"] = round(p["wall_to_init_s"] / q["wall_to_init_s"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
