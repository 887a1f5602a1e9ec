"""`python -m bench` (or `bin/bench`): every benchmark on pyvmm and on QEMU, side by side.

Prints a table of medians with the pyvmm/QEMU ratio and the QEMU command lines used, and writes
the results as JSON (`--json`, default build/bench/latest.json, and one line appended to
build/bench/history.jsonl for tracking over time). Without QEMU the pyvmm numbers are still
measured, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import balloon as balloonbench
from bench import native, nested
from bench import net as netbench
from bench import vsock as vsockbench
from bench.measure import Row, table
from bench.vmms import PROBE, QEMU_MACHINE, ROOT, qemu_argv, qemu_available, qemu_version
from pyvmm.harness.linux import cpuinfo

GROUPS = ("startup", "exit", "blk", "net", "vsock", "balloon", "linux")
MiB = 1 << 20


def kvm_flavour() -> str:
    """Which KVM this host has: PVM (kvm_pvm: no VMX/SVM needed, so no stock kernel natively)
    or the hardware-assisted kind."""
    flags = cpuinfo("flags").split()
    if Path("/sys/module/kvm_pvm").exists():
        return "PVM (kvm_pvm)"
    if "vmx" in flags:
        return "KVM on Intel VT-x"
    if "svm" in flags:
        return "KVM on AMD-V"
    return "unknown"


def machine() -> dict[str, Any]:
    cpu = cpuinfo("model name") or "unknown"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "kvm": kvm_flavour(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs per VMM (median kept)")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated benchmarks to run, of: {','.join(GROUPS)}",
    )
    parser.add_argument("--exits", type=int, default=100_000, help="port writes per exit run")
    parser.add_argument("--image-mib", type=int, default=1024, help="virtio-blk image size")
    parser.add_argument("--rand-mib", type=int, default=64, help="bytes read at random")
    parser.add_argument(
        "--net-count", type=int, default=netbench.DEFAULT_COUNT, help="datagrams per net case"
    )
    parser.add_argument(
        "--vsock-mib",
        type=int,
        default=vsockbench.DEFAULT_BYTES // MiB,
        help="MiB per vsock stream case (at most 64)",
    )
    parser.add_argument(
        "--vsock-count", type=int, default=vsockbench.DEFAULT_COUNT, help="vsock connections"
    )
    parser.add_argument(
        "--linux",
        default=",".join(nested.PARTS),
        help=f"comma-separated parts of the linux benchmark to run, of: {','.join(nested.PARTS)}",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "latest.json")
    args = parser.parse_args(argv)
    only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        parser.error(f"--only: unknown benchmark {unknown[0]!r} (choose from {', '.join(GROUPS)})")
    linux_parts = [p.strip() for p in args.linux.split(",") if p.strip()]
    unknown = [p for p in linux_parts if p not in nested.PARTS]
    if unknown or not linux_parts:
        what = repr(unknown[0]) if unknown else "nothing"
        parser.error(f"--linux: {what} is not a part (choose from {', '.join(nested.PARTS)})")
    if args.runs < 1:
        parser.error("--runs: must be at least 1")
    if not 1 <= args.vsock_mib <= vsockbench.MAX_BYTES // MiB:
        parser.error(f"--vsock-mib: must be from 1 to {vsockbench.MAX_BYTES // MiB}")
    if not 1 <= args.vsock_count <= vsockbench.MAX_COUNT:
        parser.error(f"--vsock-count: must be from 1 to {vsockbench.MAX_COUNT:,}")

    no_qemu = qemu_available()
    qemu = no_qemu is None
    notes: list[str] = [no_qemu] if no_qemu else []
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True)
    commands: dict[str, str] = {}
    if qemu:
        commands["qemu"] = qemu_version()
        image_mib = args.image_mib * MiB
        probe_runs = {
            "startup": ["probe=cmdline"],
            "exit": ["probe=outloop", f"probe.count={args.exits}"],
            "blk": ["probe=blkbench", "probe.bench=seq", f"probe.bytes={image_mib}"],
        }
        for group, params in probe_runs.items():
            if group in only:
                disks = [Path("IMAGE")] if group == "blk" else []
                commands[f"qemu {group}"] = shlex.join(qemu_argv(PROBE, params, disks=disks))
        if "net" in only:
            argv = qemu_argv(
                PROBE, netbench.probe_params(args.net_count), extra=netbench.QEMU_NET_ARGS
            )
            commands["qemu net"] = shlex.join(["ip", "netns", "exec", "NS", *argv])

    benches: dict[str, Callable[[], list[Row]]] = {
        "startup": lambda: native.startup(args.runs, qemu),
        "exit": lambda: native.exits(args.runs, args.exits, qemu),
        "blk": lambda: native.blk(args.runs, args.image_mib * MiB, args.rand_mib * MiB, qemu),
        "net": lambda: netbench.net(args.runs, args.net_count, qemu),
        "vsock": lambda: vsockbench.vsock(args.runs, args.vsock_mib * MiB, args.vsock_count),
        "balloon": lambda: balloonbench.balloon(args.runs),
    }
    rows: list[Row] = []
    for group in only:
        if group == "linux":
            if not qemu:
                notes.append("linux: skipped, it needs QEMU (the peer, and the test VM)")
                continue
            linux_rows, linux_commands = nested.run(args.runs, linux_parts)
            rows += linux_rows
            commands.update(linux_commands)
            continue
        if group == "net" and (why := netbench.unavailable()):
            notes.append(why)
            continue
        if group == "vsock" and qemu:
            notes.append(vsockbench.NO_QEMU)
        if group == "balloon" and qemu:
            notes.append(balloonbench.NO_QEMU)
        print(f"bench: {group} ...", file=sys.stderr, flush=True)
        rows += benches[group]()

    report = {
        "machine": machine(),
        "qemu_machine": QEMU_MACHINE if qemu else None,
        "runs": args.runs,
        "rows": [r.to_json() for r in rows],
        "commands": commands,
        "notes": notes,
    }
    print(table(rows))
    for note in notes:
        print(f"note: {note}")
    for name, command in commands.items():
        print(f"{name}: {command}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    with open(args.json.parent / "history.jsonl", "a") as history:
        history.write(json.dumps(report) + "\n")
    return 0
