"""The host's end of the Linux guest's `balloon` check (guest/linux/init), run where the VMM runs
through its control socket:

    python -m pyvmm.harness.balloonpeer cycle SOCKET MIB     on "GUEST balloon ready"
    python -m pyvmm.harness.balloonpeer done SOCKET          on "GUEST balloon filled"

`cycle` sets the balloon to MIB MiB, waits until the guest holds it (the `actual` it writes
back), then sets it to 0 and waits again; it records what the guest's memory held on the host
(the memfd's allocated size) before, inflated and deflated, how long each took, and the guest's
statistics while inflated. `done` records the same figure once the guest has written its memory
again, then gives the guest the sign that the host is done: the balloon at DONE_MIB MiB, then 0.
Each prints one JSON object (with "error" when something failed); every wait is bounded by
--timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pyvmm.control.client import send_command
from pyvmm.control.protocol import ControlError

MiB = 1 << 20
DONE_MIB = 4  # BALLOON_DONE_MIB in guest/linux/init
POLL_S = 0.1
DEFAULT_TIMEOUT_S = 120.0


class PeerError(Exception):
    """The exchange with the VM did not complete; the message says where."""


def _command(socket_path: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = send_command(socket_path, request)
    except ControlError as e:
        raise PeerError(f"{request['cmd']}: {e}") from None
    if not reply.get("ok"):
        raise PeerError(f"{request['cmd']}: the VM answered {reply}")
    return reply


def stats(socket_path: str) -> dict[str, Any]:
    balloon: dict[str, Any] = _command(socket_path, {"cmd": "balloon_stats"})["balloon"]
    return balloon


def resize(socket_path: str, num_bytes: int, deadline: float) -> tuple[float, dict[str, Any]]:
    """Set the balloon to `num_bytes` and wait until the guest holds that much; the seconds it
    took and the stats then."""
    start = time.monotonic()
    _command(socket_path, {"cmd": "balloon", "bytes": num_bytes})
    while True:
        now = stats(socket_path)
        if now["actual"] == num_bytes:
            return time.monotonic() - start, now
        if time.monotonic() > deadline:
            raise PeerError(f"the guest holds {now['actual']} bytes, not {num_bytes}, in time")
        time.sleep(POLL_S)


def cycle(socket_path: str, mib: int, deadline: float) -> dict[str, Any]:
    before = stats(socket_path)
    inflate_s, inflated = resize(socket_path, mib * MiB, deadline)
    deflate_s, deflated = resize(socket_path, 0, deadline)
    return {
        "before": before["guest_memory_on_host"],
        "inflated": inflated["guest_memory_on_host"],
        "deflated": deflated["guest_memory_on_host"],
        "inflate_s": inflate_s,
        "deflate_s": deflate_s,
        "stats": inflated["stats"],
        "stats_fresh": inflated["stats_fresh"],
    }


def done(socket_path: str, deadline: float) -> dict[str, Any]:
    filled = stats(socket_path)["guest_memory_on_host"]
    resize(socket_path, DONE_MIB * MiB, deadline)
    resize(socket_path, 0, deadline)
    return {"filled": filled}


def peer_argv(mode: str, socket_path: str, timeout_s: float, *extra: str) -> list[str]:
    """This program for BootSpec.on_line: `cycle` with extra [MIB], `done` with none."""
    return [
        *[sys.executable, "-m", "pyvmm.harness.balloonpeer", mode, socket_path, *extra],
        *["--timeout", f"{timeout_s:g}"],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.harness.balloonpeer")
    parser.add_argument("mode", choices=["cycle", "done"])
    parser.add_argument("socket", help="the VM's control socket")
    parser.add_argument("mib", type=int, nargs="?", default=0, help="cycle: the balloon's MiB")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    report: dict[str, Any] = {"mode": args.mode}
    try:
        if args.mode == "cycle":
            report.update(cycle(args.socket, args.mib, deadline))
        else:
            report.update(done(args.socket, deadline))
    except PeerError as e:
        report["error"] = str(e)
    print(json.dumps(report), flush=True)
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
