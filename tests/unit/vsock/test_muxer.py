"""The vsock muxer between the guest's packets and host Unix sockets: the CONNECT scheme, streams
both ways under credit, shutdown and reset, and what it does with bad input."""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.ratelimit import GuestLog
from pyvmm.vsock.connection import BUF_ALLOC
from pyvmm.vsock.dialer import REPLY, REQUEST, Dialer, DialRequests
from pyvmm.vsock.muxer import FIRST_HOST_PORT, MAX_CONTROL, MAX_LINE, Muxer
from pyvmm.vsock.packet import HEADER_SIZE, HOST_CID, TYPE_STREAM, Header, Op, Shutdown

GUEST_CID = 3
GUEST_PORT = 1234
RX_BUF = 4096
GUEST_BUF_ALLOC = 256 * 1024


class Guest:
    """The guest's end of a muxer: sends it packets, collects what it has for the guest."""

    def __init__(self, muxer: Muxer) -> None:
        self.muxer = muxer
        self.fwd_cnt = 0

    def send(
        self, op: Op, src_port: int, dst_port: int, payload: bytes = b"", flags: int = 0, **kw: int
    ) -> None:
        fields = dict(
            src_cid=GUEST_CID, dst_cid=HOST_CID, src_port=src_port, dst_port=dst_port,
            len=len(payload), type=TYPE_STREAM, op=op, flags=flags, buf_alloc=GUEST_BUF_ALLOC,
            fwd_cnt=self.fwd_cnt,
        )  # fmt: skip
        fields.update(kw)
        self.muxer.from_guest(Header(**fields), [memoryview(payload)] if payload else [])

    def receive(self, room: int = RX_BUF) -> list[tuple[Header, bytes]]:
        """Every packet the muxer has for the guest now (after handling host events)."""
        self.muxer.handle_events()
        out = []
        while True:
            buf = bytearray(room)
            # Two buffers, the header split across them, as a driver may post them.
            length = self.muxer.to_guest([memoryview(buf)[:20], memoryview(buf)[20:]], room)
            if length == 0:
                return out
            hdr = Header.unpack(buf)
            assert length == HEADER_SIZE + hdr.len
            out.append((hdr, bytes(buf[HEADER_SIZE:length])))


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "v.sock")


@pytest.fixture
def listener(path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def dialer(path: str) -> Iterator[Dialer]:
    d = Dialer(path)
    d.start()
    yield d
    d.close()


def _guest(listener: socket.socket, requests: DialRequests) -> Guest:
    return Guest(Muxer(GUEST_CID, listener, requests, GuestLog(logging.getLogger("test"), "vsock")))


@pytest.fixture
def guest(listener: socket.socket, dialer: Dialer) -> Iterator[Guest]:
    requests = DialRequests(dialer.device_end.dup())
    guest = _guest(listener, requests)
    yield guest
    guest.muxer.close()
    requests.close()


@pytest.fixture
def hand_dialed(listener: socket.socket) -> Iterator[tuple[socket.socket, Guest]]:
    """A guest whose dials the test answers itself, on the dialer's end it is given."""
    dialer_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    requests = DialRequests(device_end)
    guest = _guest(listener, requests)
    yield dialer_end, guest
    guest.muxer.close()
    requests.close()
    dialer_end.close()


def host_connect(path: str, line: bytes = b"CONNECT 1234\n") -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(line)
    client.settimeout(5)
    return client


def established(guest: Guest, path: str) -> tuple[socket.socket, int]:
    """A host program's stream to the guest's GUEST_PORT, accepted: (its socket, host port)."""
    client = host_connect(path)
    ((req, _),) = guest.receive()
    assert (req.op, req.dst_port, req.dst_cid, req.src_cid) == (Op.REQUEST, GUEST_PORT, 3, 2)
    guest.send(Op.RESPONSE, GUEST_PORT, req.src_port)
    assert client.recv(64) == f"OK {req.src_port}\n".encode()
    return client, req.src_port


def test_a_host_program_connects_and_data_flows_both_ways(guest: Guest, path: str) -> None:
    client, port = established(guest, path)
    assert port >= FIRST_HOST_PORT
    client.sendall(b"hello guest")
    ((rw, data),) = guest.receive()
    assert (rw.op, rw.src_port, rw.dst_port, data) == (Op.RW, port, GUEST_PORT, b"hello guest")
    assert rw.buf_alloc == BUF_ALLOC
    guest.send(Op.RW, GUEST_PORT, port, b"hello host")
    assert client.recv(64) == b"hello host"


def test_the_host_reads_no_more_than_the_guests_credit(guest: Guest, path: str) -> None:
    client, port = established(guest, path)
    guest.send(Op.CREDIT_UPDATE, GUEST_PORT, port, buf_alloc=1000)
    client.sendall(bytes(5000))
    got = guest.receive()
    assert sum(len(d) for _, d in got) == 1000  # the rest stays in the host socket
    guest.fwd_cnt = 1000  # the guest's reader took it all
    guest.send(Op.CREDIT_UPDATE, GUEST_PORT, port, buf_alloc=1000)
    assert sum(len(d) for _, d in guest.receive()) == 1000


def test_a_slow_host_reader_stops_the_guest_by_credit_and_loses_nothing(
    guest: Guest, path: str
) -> None:
    """The guest sends as its credit allows (as a driver does); the host reads slowly: the
    muxer holds what the host socket has no room for, within the credit, and all arrives."""
    client, port = established(guest, path)
    data = os.urandom(4 << 20)
    sent = fwd_cnt = 0
    received = bytearray()
    while len(received) < len(data):
        room = BUF_ALLOC - (sent - fwd_cnt)
        if room > 0 and sent < len(data):
            chunk = data[sent : sent + min(room, 64 * 1024)]
            guest.send(Op.RW, GUEST_PORT, port, chunk)
            sent += len(chunk)
        received += client.recv(8192)  # slowly: a little at a time
        for hdr, _ in guest.receive():
            assert hdr.op == Op.CREDIT_UPDATE
            fwd_cnt = hdr.fwd_cnt
    assert received == data


def test_past_its_credit_the_guests_stream_is_reset(guest: Guest, path: str) -> None:
    client, port = established(guest, path)
    guest.send(Op.RW, GUEST_PORT, port, bytes(BUF_ALLOC + 1))
    assert [h.op for h, _ in guest.receive()] == [Op.RST]
    assert closed(client)


def closed(client: socket.socket) -> bool:
    """Whether the other end closed `client` (in order, or dropping what it had not read)."""
    try:
        return client.recv(64) == b""
    except ConnectionResetError:
        return True


def test_credit_updates_tell_the_guest_of_room_made(guest: Guest, path: str) -> None:
    client, port = established(guest, path)
    guest.send(Op.RW, GUEST_PORT, port, bytes(100))
    assert client.recv(100) == bytes(100)
    assert guest.receive() == []  # a little room made: not worth a packet
    guest.send(Op.CREDIT_REQUEST, GUEST_PORT, port)
    ((hdr, _),) = guest.receive()
    assert (hdr.op, hdr.fwd_cnt) == (Op.CREDIT_UPDATE, 100)
    guest.send(Op.RW, GUEST_PORT, port, bytes(BUF_ALLOC // 4))
    assert [(h.op, h.fwd_cnt) for h, _ in guest.receive()] == [
        (Op.CREDIT_UPDATE, 100 + BUF_ALLOC // 4)
    ]


def test_host_eof_is_a_shutdown_and_the_guests_close_ends_in_rst(guest: Guest, path: str) -> None:
    client, port = established(guest, path)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    got = guest.receive()
    assert [(h.op, d) for h, d in got] == [(Op.RW, b"last words"), (Op.SHUTDOWN, b"")]
    assert got[1][0].flags == Shutdown.SEND
    guest.send(Op.RW, GUEST_PORT, port, b"reply")  # the other way still works
    assert client.recv(64) == b"reply"
    guest.send(Op.SHUTDOWN, GUEST_PORT, port, flags=Shutdown.RCV | Shutdown.SEND)
    assert [h.op for h, _ in guest.receive()] == [Op.RST]
    assert client.recv(64) == b""  # closed


def test_the_guests_rst_closes_the_host_socket(guest: Guest, path: str) -> None:
    client, port = established(guest, path)
    guest.send(Op.RST, GUEST_PORT, port)
    assert client.recv(64) == b""
    guest.send(Op.RW, GUEST_PORT, port, b"late")  # to a stream that is no more
    assert [h.op for h, _ in guest.receive()] == [Op.RST]


def test_a_refused_host_connection_sees_its_socket_closed(guest: Guest, path: str) -> None:
    client = host_connect(path, b"CONNECT 99\n")
    ((req, _),) = guest.receive()
    guest.send(Op.RST, 99, req.src_port)
    assert client.recv(64) == b""


@pytest.mark.parametrize(
    "line",
    [b"HELLO\n", b"CONNECT\n", b"CONNECT -1\n", b"CONNECT 99999999999\n", b"x" * (MAX_LINE + 1)],
)
def test_garbage_or_endless_first_lines_close_the_connection(
    guest: Guest, path: str, line: bytes
) -> None:
    client = host_connect(path, line)
    assert guest.receive() == []
    assert closed(client)


def test_a_host_program_that_leaves_before_the_answer_withdraws(guest: Guest, path: str) -> None:
    client = host_connect(path)
    ((req, _),) = guest.receive()
    client.close()
    assert [h.op for h, _ in guest.receive()] == [Op.RST]
    guest.send(Op.RESPONSE, GUEST_PORT, req.src_port)  # too late
    assert [h.op for h, _ in guest.receive()] == [Op.RST]


def test_the_guest_connects_to_a_host_listener(guest: Guest, path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}_5678")
    server.listen(1)
    server.settimeout(5)
    guest.send(Op.REQUEST, 40000, 5678)
    conn, _ = server.accept()
    got = wait_for(guest)  # the dialer answers from its thread
    assert [(h.op, h.src_port, h.dst_port) for h, _ in got] == [(Op.RESPONSE, 5678, 40000)]
    guest.send(Op.RW, 40000, 5678, b"from the guest")
    conn.settimeout(5)
    assert conn.recv(64) == b"from the guest"
    conn.sendall(b"from the host")
    assert [d for _, d in wait_for(guest)] == [b"from the host"]
    server.close()


def wait_for(guest: Guest, timeout: float = 10.0) -> list[tuple[Header, bytes]]:
    """The next packets for the guest, once there are any (an answer from another thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = guest.receive()
        if got:
            return got
        time.sleep(0.001)
    return []


def test_a_guest_connecting_to_no_listener_is_reset(guest: Guest) -> None:
    guest.send(Op.REQUEST, 40001, 4444)
    assert [(h.op, h.dst_port) for h, _ in wait_for(guest)] == [(Op.RST, 40001)]


def test_packets_not_for_the_host_are_reset(guest: Guest) -> None:
    guest.send(Op.REQUEST, 40002, 80, dst_cid=7)
    guest.send(Op.REQUEST, 40003, 80, src_cid=9)
    guest.send(Op.REQUEST, 40004, 80, type=2)
    assert [h.op for h, _ in guest.receive()] == [Op.RST] * 3


def test_a_flood_of_requests_is_bounded(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    """A guest that asks without posting receive buffers gets answers up to a bound only."""
    with caplog.at_level(logging.INFO):
        for port in range(MAX_CONTROL + 100):
            guest.send(Op.RW, port, 1)
    assert len(guest.receive()) == MAX_CONTROL
    assert "dropped" in caplog.text


def test_reset_closes_every_stream(guest: Guest, path: str) -> None:
    client, _ = established(guest, path)
    pending = host_connect(path, b"CONNECT 7\n")
    guest.muxer.reset()
    assert client.recv(64) == b""
    guest.receive()  # the pending program is handled after the reset: a new request
    new, _ = established(guest, path)
    new.close()
    pending.close()


def test_a_buffer_with_room_for_a_header_only_does_not_end_the_stream(
    guest: Guest, path: str
) -> None:
    """It takes a credit update, and the program's data the next buffer (reading 0 bytes into
    it was taken for the program's EOF: the guest was told the stream was shut)."""
    client, port = established(guest, path)
    client.sendall(b"hello guest")
    guest.muxer.handle_events()
    buf = bytearray(HEADER_SIZE)
    assert guest.muxer.to_guest([memoryview(buf)], HEADER_SIZE) == HEADER_SIZE
    hdr = Header.unpack(memoryview(buf))
    assert (hdr.op, hdr.src_port, hdr.len) == (Op.CREDIT_UPDATE, port, 0)
    assert [(h.op, d) for h, d in guest.receive()] == [(Op.RW, b"hello guest")]


def test_a_host_programs_stream_never_takes_the_key_of_a_dial_in_progress(
    hand_dialed: tuple[socket.socket, Guest], path: str
) -> None:
    """The guest dials the host port the next host program's stream would get, from the port
    that program connects to: the program's stream gets another host port, and each stream
    carries its own data (the dial's answer took the key from the program's stream, whose
    socket was left open and watched, its data sent as the dialed stream's)."""
    dialer_end, guest = hand_dialed
    guest.send(Op.REQUEST, GUEST_PORT, FIRST_HOST_PORT)  # the dialer answers later
    client, port = established(guest, path)
    assert port != FIRST_HOST_PORT
    _, token = REQUEST.unpack(dialer_end.recv(64))
    server, dialed = socket.socketpair()
    fds = array.array("i", [dialed.fileno()])
    dialer_end.sendmsg([REPLY.pack(token, 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    dialed.close()
    assert [(h.op, h.src_port) for h, _ in guest.receive()] == [(Op.RESPONSE, FIRST_HOST_PORT)]
    client.sendall(b"from the program")
    server.sendall(b"from the listener")
    assert {(h.src_port, d) for h, d in guest.receive()} == {
        (port, b"from the program"),
        (FIRST_HOST_PORT, b"from the listener"),
    }
    client.close()
    server.close()


def test_a_dialer_gone_with_requests_unread_leaves_the_device_quiet(
    hand_dialed: tuple[socket.socket, Guest],
) -> None:
    """The VMM's end closed before it read the guest's dial: the device neither fails nor
    keeps waking (its socket stays readable), and the guest's next dial is refused."""
    dialer_end, guest = hand_dialed
    guest.send(Op.REQUEST, GUEST_PORT, 5678)
    dialer_end.close()
    guest.muxer.handle_events()
    assert select.select([guest.muxer.fileno()], [], [], 0)[0] == []
    guest.send(Op.REQUEST, GUEST_PORT + 1, 5678)
    assert [(h.op, h.dst_port) for h, _ in guest.receive()] == [(Op.RST, GUEST_PORT + 1)]
