"""Boot a guest in this process and report the VMM's peak RSS beside the guest RAM it touched.

Run by bench/run.py as a child: `python -m bench.rss_child KERNEL [pyvmm run flags...]`.
Prints one JSON line on stderr after the guest exits.
"""

from __future__ import annotations

import json
import os
import sys

from pyvmm.cli import build_parser, config_from_args
from pyvmm.vmm import Vmm


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main() -> int:
    args = build_parser().parse_args(["run", *sys.argv[1:]])
    with open(os.devnull, "wb") as devnull:
        vmm = Vmm(config_from_args(args), console_out=devnull, console_in_fd=None)
        try:
            result = vmm.run()
            guest_touched = os.fstat(vmm.mem.memfd).st_blocks * 512
            peak = _status_kib("VmHWM") * 1024
            report = {
                "exit_code": result.code,
                "peak_rss_bytes": peak,
                "guest_ram_touched_bytes": guest_touched,
                "vmm_rss_beyond_guest_bytes": peak - guest_touched,
            }
        finally:
            vmm.close()
    print(json.dumps(report), file=sys.stderr)
    return result.code


if __name__ == "__main__":
    sys.exit(main())
