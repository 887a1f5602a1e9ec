"""The device zygote: one interpreter that has imported every device's code and forks a device
process for each spec the VMM sends it.

A fresh interpreter per device pays for its start and its imports every time: ~0.1 s on a KVM
host, ~3 s of CPU inside the emulated test VM, where a boot with eleven devices paid it eleven
times. Forked from here, a device process starts with all of it done. The VMM starts this
process (`spawner.py`) before it builds its devices and ends it, by closing its socket, once
they are started. It is single-threaded, so forking it is safe, and it holds nothing of the
VMM's but what each request hands over, which it closes once the device has it.

A request is one SEQPACKET message: a `DeviceSpec` as JSON, with the fds it names attached in
`DeviceSpec.fds()` order. The device process is forked twice over, so that its parent becomes
the VMM (a child subreaper: the process in between ends at once), which waits for it and learns
how it ended as for any child of its own. The answer is JSON: {"pid": N} or {"error": why}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

from pyvmm.devices.child import DeviceSpec, run
from pyvmm.sandbox.jail import JailError, close_all_but, die_with_parent, name_process

MAX_REQUEST = 64 * 1024
MAX_FDS = 16
ADOPTION_TIMEOUT_S = 30.0  # for the VMM to become the device process's parent


class ZygoteError(Exception):
    """A request that could not be carried out; one line."""


def serve(sock: socket.socket) -> int:
    """Answer the VMM's requests until it closes the socket."""
    while True:
        message, fds, flags, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        if not message and not fds:
            return 0
        answer: dict[str, object]
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ZygoteError("a request too long, or with too many fds")
            answer = {"pid": _fork_device(message, fds, sock)}
        except (ZygoteError, OSError, ValueError, KeyError, TypeError) as exc:
            answer = {"error": str(exc) or type(exc).__name__}
        finally:
            for fd in fds:
                os.close(fd)  # the device process has its own copies
        sock.send(json.dumps(answer).encode())


def _fork_device(message: bytes, fds: list[int], sock: socket.socket) -> int:
    if threading.active_count() != 1:  # never: but forking a threaded interpreter is unsafe
        raise ZygoteError(f"the zygote has {threading.active_count()} threads, cannot fork")
    spec = DeviceSpec.from_json(message.decode())
    named = spec.fds()
    if len(named) != len(fds):
        raise ZygoteError(f"the spec names {len(named)} fds, the request carried {len(fds)}")
    spec = spec.renumbered(dict(zip(named, fds, strict=True)))
    report_r, report_w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the process in between: fork the device, say its pid, end
        code = 1
        try:
            os.close(report_r)
            me = os.getpid()
            device = os.fork()
            if device == 0:
                os.close(report_w)
                sock.close()
                _become_device(spec, frozenset(fds), me)
            os.write(report_w, str(device).encode())
            code = 0
        except OSError as exc:
            os.write(report_w, f"!{exc.strerror or exc}".encode())
        finally:
            os._exit(code)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        said = report.read().decode()
    os.waitpid(middle, 0)  # once it is reaped, its child is the VMM's
    if not said or said.startswith("!"):
        raise ZygoteError(f"cannot fork a device process: {said[1:] or 'no pid came back'}")
    return int(said)


def _become_device(spec: DeviceSpec, fds: frozenset[int], middle: int) -> None:
    """Run the device process `spec` describes; never returns."""
    code = 1
    try:
        close_all_but(fds | {0, 1, 2})
        # Until the process in between has ended, this one is not yet the VMM's: its parent
        # death signal, set now, would fire at that end.
        deadline = time.monotonic() + ADOPTION_TIMEOUT_S
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.001)
        code = run(spec)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    sock_fd, vmm_pid = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the VMM decides when this process ends
    try:
        die_with_parent("device zygote", vmm_pid)
        name_process("device zygote", "pyvmm-zygote")
    except JailError:
        return 1  # the VMM is gone already
    with socket.socket(fileno=sock_fd) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
