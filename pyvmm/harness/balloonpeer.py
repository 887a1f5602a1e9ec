"""The host's end of the Linux guest's `balloon` check (guest/linux/init), run where the VMM runs
through its control socket:

    python -m pyvmm.harness.balloonpeer cycle SOCKET MIB     on "GUEST balloon ready"
    python -m pyvmm.harness.balloonpeer done SOCKET          on "GUEST balloon filled"

`cycle` sets the balloon to MIB MiB, waits until the guest holds it (the `actual` it writes
back), then sets it to 0 and waits again; it records what the guest's memory held on the host
(the memfd's allocated size) before, inflated and deflated, how long each took, and the guest's
statistics while inflated. `done` records the same figure once the guest has written its memory
again, then gives the guest the sign that the host is done: the balloon at DONE_MIB MiB.
With --qmp-ram-mib it drives QEMU's virtio-balloon through QMP instead (the benchmark's peer),
where the host-side figures are absent. Each prints one JSON object (with "error" when
something failed); every wait is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import json
import socket
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


class PyvmmBalloon:
    """pyvmm's balloon, through the VM's control socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = send_command(self.socket_path, request)
        except ControlError as e:
            raise PeerError(f"{request['cmd']}: {e}") from None
        if not reply.get("ok"):
            raise PeerError(f"{request['cmd']}: the VM answered {reply}")
        return reply

    def set(self, num_bytes: int) -> None:
        self._command({"cmd": "balloon", "bytes": num_bytes})

    def stats(self, fresh: bool = True) -> dict[str, Any]:
        request = {"cmd": "balloon_stats", "fresh": fresh}
        balloon: dict[str, Any] = self._command(request)["balloon"]
        return balloon


class QemuBalloon:
    """QEMU's virtio-balloon, through QMP: QEMU speaks of the memory the guest keeps (`value`,
    `actual`), not of the balloon's size."""

    def __init__(self, qmp_path: str, ram_bytes: int, deadline: float) -> None:
        self.ram_bytes = ram_bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(deadline - time.monotonic(), 1.0))
        try:
            self.sock.connect(qmp_path)
        except OSError as e:
            raise PeerError(f"QMP {qmp_path}: {e}") from None
        self.lines = self.sock.makefile("rb")
        self.lines.readline()  # the greeting
        self._execute("qmp_capabilities")

    def _execute(self, command: str, **arguments: Any) -> Any:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self.lines.readline()
            if not line:
                raise PeerError(f"QMP {command}: QEMU closed the socket")
            reply = json.loads(line)
            if "error" in reply:
                raise PeerError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]  # anything else is an event

    def set(self, num_bytes: int) -> None:
        self._execute("balloon", value=self.ram_bytes - num_bytes)

    def stats(self, fresh: bool = True) -> dict[str, Any]:
        kept = self._execute("query-balloon")["actual"]
        return {"actual": self.ram_bytes - kept, "guest_memory_on_host": None, "stats": None,
                "stats_fresh": None}  # fmt: skip


Balloon = PyvmmBalloon | QemuBalloon


def resize(balloon: Balloon, num_bytes: int, deadline: float) -> tuple[float, dict[str, Any]]:
    """Set the balloon to `num_bytes` and wait until the guest holds that much; the seconds it
    took and the sizes then (with the statistics the guest last sent)."""
    start = time.monotonic()
    balloon.set(num_bytes)
    while True:
        now = balloon.stats(fresh=False)  # the size only: asking the guest would slow it
        if now["actual"] == num_bytes:
            return time.monotonic() - start, now
        if time.monotonic() > deadline:
            raise PeerError(f"the guest holds {now['actual']} bytes, not {num_bytes}, in time")
        time.sleep(POLL_S)


def fresh_stats(balloon: Balloon, deadline: float) -> dict[str, Any]:
    """The sizes and the guest's statistics asked for now: asked again while the driver has not
    answered within the VMM's wait (its work item can take longer to run under emulation)."""
    while True:
        now = balloon.stats()
        if now["stats_fresh"] is not False or time.monotonic() > deadline:
            return now


def cycle(balloon: Balloon, mib: int, deadline: float) -> dict[str, Any]:
    before = balloon.stats()
    inflate_s, _ = resize(balloon, mib * MiB, deadline)
    inflated = fresh_stats(balloon, deadline)  # the guest's own numbers, asked for now
    deflate_s, deflated = resize(balloon, 0, deadline)
    return {
        "before": before["guest_memory_on_host"],
        "inflated": inflated["guest_memory_on_host"],
        "deflated": deflated["guest_memory_on_host"],
        "inflate_s": inflate_s,
        "deflate_s": deflate_s,
        "stats": inflated["stats"],
        "stats_fresh": inflated["stats_fresh"],
    }


def done(balloon: Balloon, deadline: float) -> dict[str, Any]:
    filled = balloon.stats()["guest_memory_on_host"]
    # Held until the VM ends, so the guest cannot miss it; it may end as soon as it sees it, so
    # nothing is asked after.
    balloon.set(DONE_MIB * MiB)
    return {"filled": filled}


def peer_argv(
    mode: str, socket_path: str, timeout_s: float, *extra: str, python: str = sys.executable
) -> list[str]:
    """This program for BootSpec.on_line: `cycle` with extra [MIB], `done` with none (and, for
    QEMU, extra ["--qmp-ram-mib", N]: `socket_path` is then its QMP socket); `python` runs it
    where the boots run (LinuxHarness.python)."""
    return [
        *[python, "-m", "pyvmm.harness.balloonpeer", mode, socket_path, *extra],
        *["--timeout", f"{timeout_s:g}"],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.harness.balloonpeer")
    parser.add_argument("mode", choices=["cycle", "done"])
    parser.add_argument("socket", help="the VM's control socket (QEMU's QMP socket with --qmp)")
    parser.add_argument("mib", type=int, nargs="?", default=0, help="cycle: the balloon's MiB")
    parser.add_argument(
        "--qmp-ram-mib", type=int, metavar="MIB", help="QEMU: the socket is QMP's; the VM's MiB"
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    report: dict[str, Any] = {"mode": args.mode}
    try:
        balloon: Balloon = (
            PyvmmBalloon(args.socket)
            if args.qmp_ram_mib is None
            else QemuBalloon(args.socket, args.qmp_ram_mib * MiB, deadline)
        )
        if args.mode == "cycle":
            report.update(cycle(balloon, args.mib, deadline))
        else:
            report.update(done(balloon, deadline))
    except (PeerError, OSError) as e:
        report["error"] = str(e)
    print(json.dumps(report), flush=True)
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
