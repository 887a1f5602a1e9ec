"""The Linux guest's `net` check (guest/linux/init) as the tests and benchmarks drive it: the
addresses of both ends, the kernel parameters that start it, and its host end
(pyvmm.harness.netpeer), run in the boot's network namespace when the guest says it listens.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pyvmm.harness.boots import BootResult

HOST_IP, GUEST_IP, NETMASK, PREFIX = "192.0.2.1", "192.0.2.2", "255.255.255.0", 24
MAC = "52:54:00:12:34:56"
PORT = 5001  # the guest receives on it, and sends back on PORT + 1
NET_READY = "GUEST net ready"
# TCP at both ends builds segments of at least this many MSS (net.ipv4.tcp_min_tso_segs; 44 fill
# the 64 KiB a frame can hold), as a fast host does. Left to size them to ~1 ms at its pacing rate,
# TCP under the test VM's emulation sends 2-MSS frames, and each frame costs the same few ms to
# move whatever its size: 64 MiB then took 88 s one way and 49 s the other; with 44, 11 s and 8 s.
TSO_SEGS = 44


def pyvmm_net_args() -> list[str]:
    """pyvmm's flags for a NIC on a TAP it makes with the host's address."""
    return ["--host_ip", HOST_IP, "--netmask", NETMASK, "--mac", MAC]


def kernel_params(checks: list[str], mib: int, wait_s: int) -> str:
    """The guest's command line for `checks` (with `net`): `mib` MiB each way, each transfer
    bounded by `wait_s` seconds in the guest."""
    return (
        f"pyvmm.check={','.join(checks)} pyvmm.mac={MAC} pyvmm.net_ip={GUEST_IP}/{PREFIX} "
        f"pyvmm.net_host={HOST_IP} pyvmm.net_port={PORT} pyvmm.net_mib={mib} "
        f"pyvmm.net_wait={wait_s} pyvmm.net_tso_segs={TSO_SEGS}"
    )


def peer_argv(mib: int, timeout_s: float, python: str = sys.executable) -> list[str]:
    """netpeer for the guest's `net` check: BootSpec(on_line={NET_READY: ...}, netns=True);
    `python` runs it where the boots run (LinuxHarness.python)."""
    return [
        *[python, "-m", "pyvmm.harness.netpeer", GUEST_IP, str(PORT), str(mib)],
        *["--timeout", f"{timeout_s:g}", "--min-tso-segs", str(TSO_SEGS)],
    ]


def peer_report(result: BootResult) -> dict[str, Any]:
    """netpeer's JSON report from a boot: {} when it never ran or did not finish, else its
    report ({"error": ...} when it failed or said something else)."""
    if not result.commands or result.commands[0].returncode is None:
        return {}
    output = result.commands[0].output.strip()
    try:
        report: dict[str, Any] = json.loads(output.splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"netpeer said: {output}"}
    return report
