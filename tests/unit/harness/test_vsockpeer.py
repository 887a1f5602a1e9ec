"""The host's end of the Linux guest's vsock checks, against a stand-in for pyvmm's device and
the guest (Unix sockets speaking `CONNECT <port>`): both data phases, the answers, how an old
stream's end is told, and how a boot's report is read back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvmm.harness import vsockpeer
from pyvmm.harness.boots import CommandResult
from pyvmm.harness.vsockpeer import DATA_READY, Guest, PeerError, how_they_ended, peer_report

MIB = 2
PORT = 5000


@contextlib.contextmanager
def _running(target: Callable[[], None]) -> Iterator[None]:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield
    thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture
def uds(tmp_path: Path) -> str:
    return str(tmp_path / "v.sock")


def _device(uds: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(uds)
    server.listen()
    return server


def _handshake(server: socket.socket, listens: Callable[[int], bool]) -> socket.socket:
    """pyvmm's device as host programs see it: `OK <host port>` when the guest listens on the
    port asked for, else the socket closed."""
    while True:
        conn, _ = server.accept()
        port = int(vsockpeer.read_line(conn).split()[1])
        if listens(port):
            conn.sendall(b"OK 1073741824\n")
            return conn
        conn.close()


def test_data_crosses_both_ways_and_each_side_answers(uds: str) -> None:
    server = _device(uds)
    got: dict[str, int] = {}

    def guest() -> None:  # as `vsock recv PORT`, then `vsock send 2 PORT+1 ...`
        with server, _handshake(server, lambda port: port == PORT) as conn:
            data = bytearray()
            while chunk := conn.recv(1 << 16):
                data += chunk
            got["crc"] = zlib.crc32(data)
            conn.sendall(f"{len(data)} {zlib.crc32(data):08x} 0.5\n".encode())
        payload = bytes(range(256)) * 4096
        got["sent_crc"] = zlib.crc32(payload)
        with socket.socket(socket.AF_UNIX) as out:
            out.connect(f"{uds}_{PORT + 1}")
            out.sendall(payload)
            out.shutdown(socket.SHUT_WR)
            got["answer"] = int(out.recv(256).split()[0])

    with _running(guest):
        report = vsockpeer.exchange_data(Guest(uds=uds), PORT, MIB, time.monotonic() + 30)
    sent, received = report["sent"], report["received"]
    assert sent["bytes"] == sent["guest"]["bytes"] == MIB * vsockpeer.MiB
    assert sent["crc32"] == sent["guest"]["crc32"] == f"{got['crc']:08x}"
    assert received["bytes"] == got["answer"] == 256 * 4096
    assert received["crc32"] == f"{got['sent_crc']:08x}"
    assert not Path(f"{uds}_{PORT + 1}").exists(), "the host listener's socket was left behind"


def test_connecting_tries_again_until_the_guest_listens(uds: str) -> None:
    server = _device(uds)
    listens_from = time.monotonic() + 0.3

    def device() -> None:
        with server, _handshake(server, lambda port: time.monotonic() > listens_from):
            pass

    with _running(device), Guest(uds=uds).connect(PORT, time.monotonic() + 30):
        assert time.monotonic() > listens_from


def test_a_guest_that_never_listens_is_an_error_in_time(uds: str) -> None:
    with pytest.raises(PeerError, match="cannot connect to the guest's port 5000"):
        Guest(uds=uds).connect(PORT, time.monotonic() + 0.3)


def test_conns_opens_each_stream_in_turn_and_waits_for_its_close(uds: str) -> None:
    server = _device(uds)
    accepted: list[int] = []

    def guest() -> None:  # `vsock accept`: takes each stream and closes it at once
        with server:
            for _ in range(3):
                with _handshake(server, lambda port: port == PORT + vsockpeer.CONNS_PORT):
                    accepted.append(len(accepted))

    with _running(guest):
        report = vsockpeer.exchange_conns(
            Guest(uds=uds), PORT + vsockpeer.CONNS_PORT, 3, time.monotonic() + 30
        )
    assert report["connections"] == 3 and report["seconds"] > 0
    assert accepted == [0, 1, 2]


def test_conns_fails_when_the_guest_talks_instead_of_closing(uds: str) -> None:
    server = _device(uds)

    def guest() -> None:
        with server, _handshake(server, lambda port: True) as conn:
            conn.sendall(b"hello")

    with _running(guest), pytest.raises(PeerError, match="connection 1: the guest sent data"):
        vsockpeer.exchange_conns(Guest(uds=uds), PORT, 2, time.monotonic() + 30)


def test_old_streams_end_closed_open_or_when_written_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vsockpeer, "QUIET_S", 0.2)
    closed, closed_end = socket.socketpair()
    closed_end.close()
    still, still_end = socket.socketpair()
    answered, answered_end = socket.socketpair()

    def answer() -> None:  # as a guest that no longer has the stream: it ends it when data come
        assert answered_end.recv(1) == b"x"
        answered_end.close()

    with closed, still, still_end, answered, _running(answer):
        how = how_they_ended({"closed": closed, "still": still, "answered": answered})
        assert how == {"closed": "closed", "still": "open", "answered": "closed when written to"}
        assert still_end.recv(1) == b"x", "the host should have written to the open stream"


def test_the_peer_report_is_found_by_its_marker() -> None:
    other = CommandResult("GUEST vsockreset ready", [], 0, '{"again": true}\n', 2.0)
    assert peer_report([other], DATA_READY) == {}
    unfinished = CommandResult(DATA_READY, [], None, "", 1.0)
    assert peer_report([unfinished, other], DATA_READY) == {}
    good = CommandResult(DATA_READY, [], 0, 'noise\n{"sent": {"bytes": 1}}\n', 1.0)
    assert peer_report([other, good], DATA_READY) == {"sent": {"bytes": 1}}
    bad = CommandResult(DATA_READY, [], 1, "Traceback: boom\n", 1.0)
    assert peer_report([bad], DATA_READY) == {"error": "vsockpeer said: Traceback: boom"}


def test_argv_names_the_way_to_the_guest() -> None:
    argv = vsockpeer.peer_argv("data", Guest(cid=7), PORT, 60, "64")
    assert argv[-7:] == ["data", "--cid", "7", "5000", "64", "--timeout", "60"]
    argv = vsockpeer.peer_argv("reset", Guest(uds="/u"), PORT, 60, "--control", "/c")
    assert argv[-8:] == ["reset", "--uds", "/u", "5000", "--control", "/c", "--timeout", "60"]


def _guest_opened_stream(ack: bytes) -> tuple[socket.socket, threading.Thread, threading.Event]:
    """The host's end of a stream the guest opened, the guest's `vsock hold` at the other end:
    it sends the line, reads the echo, then (a while later) sends `ack`, saying so first."""
    host, guest = socket.socketpair()
    acking = threading.Event()

    def run() -> None:
        with guest:
            guest.sendall(vsockpeer.HOLD_LINE)
            guest.recv(64)
            time.sleep(0.2)  # the echo's arrival, as through a slow device
            acking.set()
            guest.sendall(ack)

    thread = threading.Thread(target=run)
    thread.start()
    return host, thread, acking


def test_the_host_acts_on_a_guest_opened_stream_only_once_the_guest_has_the_echo() -> None:
    host, thread, acking = _guest_opened_stream(vsockpeer.HELD_LINE)
    with host:
        vsockpeer.hold_line(host, False, time.monotonic() + 10)
        assert acking.is_set(), "returned while the echo could still be on its way"
    thread.join()


def test_a_guest_that_does_not_say_it_has_the_echo_is_an_error() -> None:
    host, thread, _ = _guest_opened_stream(b"something else\n")
    with host, pytest.raises(PeerError, match="not b'pyvmm vsock held"):
        vsockpeer.hold_line(host, False, time.monotonic() + 10)
    thread.join()
