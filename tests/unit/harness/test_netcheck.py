"""The host's end of the Linux guest's `net` check: netpeer's two phases over loopback, and how a
boot's netpeer report is read back."""

from __future__ import annotations

import socket
import threading
import time

from pyvmm.harness import netpeer
from pyvmm.harness.boots import BootResult, CommandResult
from pyvmm.harness.netcheck import NET_READY, peer_report

MIB = 2


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_netpeer_sends_and_takes_back_the_same_bytes() -> None:
    rx, tx = _listener(), _listener()
    data = bytearray()

    def guest() -> None:  # as guest/linux/init does: take everything, then echo it
        with rx, rx.accept()[0] as c:
            while chunk := c.recv(1 << 16):
                data.extend(chunk)
        with tx, tx.accept()[0] as c:
            c.sendall(data)

    thread = threading.Thread(target=guest)
    thread.start()
    deadline = time.monotonic() + 30
    sent = netpeer.send("127.0.0.1", rx.getsockname()[1], MIB, deadline, "lo")
    received = netpeer.receive("127.0.0.1", tx.getsockname()[1], deadline, "lo")
    thread.join()
    assert sent.bytes == received.bytes == len(data) == MIB * netpeer.MiB
    assert sent.sha256 == received.sha256
    assert sent.seconds > 0 and received.seconds > 0


def _boot(commands: list[CommandResult]) -> BootResult:
    return BootResult("net", [], 0, "", "", 1.0, 1.0, commands=commands)


def test_a_boot_whose_peer_never_ran_or_finished_has_no_report() -> None:
    assert peer_report(_boot([])) == {}
    assert peer_report(_boot([CommandResult(NET_READY, [], None, "", 1.0)])) == {}


def test_the_peer_report_is_its_last_line_or_an_error_quoting_it() -> None:
    good = CommandResult(NET_READY, [], 0, 'warming up\n{"sent": {"bytes": 1}}\n', 1.0)
    assert peer_report(_boot([good])) == {"sent": {"bytes": 1}}
    bad = CommandResult(NET_READY, [], 1, "Traceback: boom\n", 1.0)
    assert peer_report(_boot([bad])) == {"error": "netpeer said: Traceback: boom"}
