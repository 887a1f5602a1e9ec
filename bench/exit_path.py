"""The Python side of one VM exit, without KVM: how long pyvmm's own code takes per exit.

On a host whose KVM exits are cheap, or under emulation where every instruction is dear, this
is the part of an exit that pyvmm can shrink. The loop is the real vCPU loop (VcpuThreads.run_vcpu)
on a real VM with the probe guest loaded; only the KVM_RUN ioctl is replaced by a stand-in that
leaves the kvm_run page as it is, so every "exit" repeats the exit prepared there: a 4-byte read
of the PCI configuration data port (0xcfc) for a device that does not exist, as Linux's early
PCI scans do 16,384 times during boot, after a configuration-address write recorded in the
coalesced ring when the host's KVM has one.

`python -m bench.exit_path [--exits N]` prints microseconds per exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.vmms import PROBE
from pyvmm.cli import build_parser, config_from_args
from pyvmm.kvm import vcpu as vcpu_module
from pyvmm.kvm.abi import KVM_EXIT_IO_OUT, ExitReason, ffi
from pyvmm.kvm.coalesced import _ENTRY, _INDEXES, _RING_HEADER, RING_ENTRIES, CoalescedRing
from pyvmm.vmm import VmExit, Vmm

CONFIG_DATA_PORT = 0xCFC
ABSENT_DEVICE = 0x8001_0000  # bus 1, device 0: nothing there
KVM_EXIT_IO_IN = 0


def ring_recorder(ring: CoalescedRing) -> Callable[[], None]:
    """A function that appends a 4-byte write of ABSENT_DEVICE to port 0xcf8 to the ring, as
    KVM does when the guest writes it."""
    page = ring._page
    entry = _ENTRY.pack(0xCF8, 4, 1, ABSENT_DEVICE.to_bytes(4, "little") + bytes(4))
    header = _INDEXES

    def record() -> None:
        first, last = header.unpack_from(page, 0)
        at = _RING_HEADER + last * _ENTRY.size
        page[at : at + _ENTRY.size] = entry
        header.pack_into(page, 0, first, (last + 1) % RING_ENTRIES)

    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exit_path")
    parser.add_argument("--exits", type=int, default=200_000)
    args = parser.parse_args(argv)
    config = config_from_args(build_parser().parse_args(["run", str(PROBE)]))
    coalescing = False
    with open(os.devnull, "wb") as devnull:
        vmm = Vmm(config, console_out=devnull)
    try:
        vcpu = vmm.vcpus[0]
        run: Any = vcpu.run_struct
        run.exit_reason = ExitReason.IO
        run.io.direction = KVM_EXIT_IO_IN
        run.io.size = 4
        run.io.port = CONFIG_DATA_PORT
        run.io.count = 1
        run.io.data_offset = ffi.sizeof("struct kvm_run")
        assert KVM_EXIT_IO_OUT != KVM_EXIT_IO_IN
        vmm.io_bus.write(0xCF8, ABSENT_DEVICE.to_bytes(4, "little"))
        left = [args.exits]
        ring = vmm.coalesced
        coalescing = ring is not None
        record = ring_recorder(ring) if ring is not None else None

        def fake_kvm_run(fd: int, request: int, arg: Any) -> int:
            """KVM's part: the guest wrote the config address (into the ring, when there is
            one) and then read the data port (the exit the page already describes)."""
            left[0] -= 1
            if left[0] <= 0:
                vmm.request_exit(VmExit(0, "done"))
            if record is not None:
                record()
            return 0

        real = vcpu_module._libc_ioctl
        vcpu_module._libc_ioctl = fake_kvm_run
        try:
            start = time.perf_counter()
            vmm.vcpu_threads.run_vcpu(vcpu)
            seconds = time.perf_counter() - start
        finally:
            vcpu_module._libc_ioctl = real
    finally:
        vmm.close()
    report = {
        "exits": args.exits,
        "coalesced_address_writes": coalescing,
        "us_per_exit": round(seconds / args.exits * 1e6, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
