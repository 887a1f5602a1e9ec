"""The vsock muxer under random interleavings (hypothesis's stateful testing), with real sockets:
the guest's packets (good, late, out of credit, to reused ports), host programs (connecting to
the listener, writing, reading slowly, leaving), the dialer's answers (in any order, late ones
after the guest gave up or the transport was reset), handle_events, to_guest with receive
buffers of any size, and reset.

After every step the muxer has raised nothing and holds nothing it has no use for: each stream's
socket is open, every fd it watches, registers in its epoll or means to read is a socket it
holds, and the process has no fd more than the sockets alive. Each stream's bytes arrive whole
and in order both ways, and a host program's end of stream reaches the guest only after it ends
its stream. Bugs it found have plain regression tests in test_muxer.py.
"""

from __future__ import annotations

import array
import errno
import functools
import gc
import logging
import os
import random
import select
import shutil
import socket
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pyvmm.ratelimit import GuestLog
from pyvmm.vsock.connection import BUF_ALLOC, Connection, State
from pyvmm.vsock.dialer import REPLY, REQUEST, DialRequests
from pyvmm.vsock.muxer import FIRST_HOST_PORT, MAX_LINE, MAX_PAYLOAD, Muxer
from pyvmm.vsock.packet import HEADER_SIZE, HOST_CID, TYPE_STREAM, Header, Op, Shutdown

GUEST_CID = 3
GUEST_PORTS = (1000, 1001, 1002)  # few: host programs and the guest reuse them
MISADDRESSED_PORT = 2000
# Host ports the guest connects to: two listeners', and the one the muxer gives the next host
# program's stream (a guest may dial it, and from the port the program connects to).
DIAL_PORTS = (5000, 5001, "next host program's")
ROOMS = (HEADER_SIZE, HEADER_SIZE + 1, HEADER_SIZE + 7, 4096, HEADER_SIZE + MAX_PAYLOAD)
GUEST_BUF_ALLOCS = (0, 1, 100, 4096, 256 * 1024, 0xFFFFFFFF)
MAX_PROGRAMS = 12
U32 = 0xFFFFFFFF
_SAME_EVENTS = ~(select.EPOLLERR | select.EPOLLHUP)  # epoll adds these to every registration

Key = tuple[int, int]  # (host port, guest port), as the muxer keys its streams
any_index = st.integers(min_value=0, max_value=1000)


class Program:
    """A host program's end of a stream: a client of the listener, or the socket a host listener
    accepted for the guest's dial. Bound to an abstract address of its own, which the muxer's
    socket has as its peer's: how a stream in the muxer is matched to its program."""

    def __init__(self, number: int, sock: socket.socket, *, dialed: bool) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name: bytes = sock.getsockname()
        self._data = random.Random(number)
        self.line_rest = b""  # the end of a CONNECT line not sent yet
        self.awaiting_ok = not dialed
        self.ok_line = bytearray()
        self.conn: Connection | None = None  # the muxer's stream for it, once there is one
        self.written = bytearray()  # stream bytes it wrote (after its CONNECT line)
        self.delivered = 0  # of those, how many reached the guest
        self.expected = bytearray()  # what the guest sent it within credit
        self.got = 0  # of those, how many it read
        self.shut_wr = False
        self.closed = False
        self.eof = False

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:  # the muxer closed its end
            self.eof = True
            return 0

    def write(self, size: int) -> None:
        data = self._data.randbytes(size)
        self.written += data[: self.send(data)]

    def read(self, most: int) -> bool:
        """Read up to `most` bytes and check them; whether there were any."""
        try:
            data = self.sock.recv(most)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self._ended()
            return False
        if self.awaiting_ok:
            end = data.find(b"\n")
            self.ok_line += data if end < 0 else data[: end + 1]
            data = b"" if end < 0 else data[end + 1 :]
            if end >= 0:
                self.awaiting_ok = False
                assert self.conn is not None, f"{bytes(self.ok_line)!r} without a stream"
                assert self.ok_line == f"OK {self.conn.host_port}\n".encode()
        assert data == self.expected[self.got : self.got + len(data)], "guest data corrupted"
        self.got += len(data)
        return True

    def read_all(self) -> bool:
        progress = False
        while not self.closed and not self.eof and self.read(1 << 20):
            progress = True
        return progress

    def _ended(self) -> None:
        self.eof = True
        if self.conn is not None and not self.awaiting_ok:
            # Before the stream ends, the muxer shuts the program's socket only once the guest
            # shut its sending side and everything it sent was passed on.
            alive = self.conn.sock.fileno() >= 0
            assert not alive or (
                self.conn.guest_shutdown & Shutdown.SEND and self.got == len(self.expected)
            ), "the program saw its stream end while the stream goes on"

    def close(self) -> None:
        self.sock.close()
        self.closed = True


@dataclass
class GuestStream:
    """What the guest knows of one stream (from the REQUEST or RESPONSE that began it)."""

    buf_alloc: int = 256 * 1024
    received: int = 0  # payload bytes the guest received on it
    consumed: int = 0  # of those, what its reader took: the fwd_cnt it tells
    told_buf_alloc: int = 0  # the credit it last told the muxer
    told_fwd_cnt: int = 0


class MuxerStates(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vsock-states-")
        self.path = os.path.join(self.dir, "v.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        # The dialer's end is the test's: it reads the requests and answers as it pleases.
        self.dial_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dial_end.setblocking(False)
        self.requests = DialRequests(device_end)
        self.muxer = Muxer(
            GUEST_CID, self.listener, self.requests, GuestLog(logging.getLogger(__name__), "vsock")
        )
        self.pending_dials: list[tuple[int, int]] = []  # (port, token) not answered yet
        self.programs: list[Program] = []
        self.by_name: dict[bytes, Program] = {}
        self.owner: dict[int, tuple[Connection, Program]] = {}  # id(conn) -> it, its program
        self.keys: list[Key] = [(5000, GUEST_PORTS[0])]  # every key seen
        self.streams: dict[Key, GuestStream] = {}
        self.incoming: list[Key] = []  # host programs' REQUESTs the guest has not answered
        self.guest_data = random.Random(0)
        self.base_fds = _open_fds()

    def teardown(self) -> None:
        self.muxer.close()
        self.requests.close()
        self.dial_end.close()
        for program in self.programs:
            program.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the guest ----

    def _note(self, key: Key) -> None:
        if key not in self.keys:
            self.keys.append(key)

    def _key(self, which: int) -> Key:
        """Mostly an established stream's (their packets go deepest), else any seen."""
        conns = self.muxer._conns
        streams = [k for k, c in conns.items() if c.state is State.ESTABLISHED] or list(conns)
        if streams and which % 4:
            return streams[which % len(streams)]
        return self.keys[which % len(self.keys)]

    def _stream(self, key: Key) -> GuestStream:
        return self.streams.setdefault(key, GuestStream())

    def _guest_sends(
        self,
        op: int,
        key: Key,
        payload: bytes = b"",
        flags: int = 0,
        buf_alloc: int | None = None,
        fwd_cnt: int | None = None,
        cut: int = 0,
    ) -> None:
        stream = self._stream(key)
        buf_alloc = stream.buf_alloc if buf_alloc is None else buf_alloc
        fwd_cnt = stream.consumed if fwd_cnt is None else fwd_cnt
        stream.told_buf_alloc, stream.told_fwd_cnt = buf_alloc, fwd_cnt
        hdr = Header(GUEST_CID, HOST_CID, key[1], key[0], len(payload), TYPE_STREAM, op, flags,
                     buf_alloc, fwd_cnt)  # fmt: skip
        view = memoryview(payload)
        views = [view[:cut], view[cut:]] if payload else []
        before = self.muxer._conns.get(key)
        self.muxer.from_guest(hdr, views)
        if op == Op.RW and before is not None and self.muxer._conns.get(key) is before:
            self.owner[id(before)][1].expected += payload  # taken: it must reach the program

    def _begin(self, key: Key, buf_alloc: int = 256 * 1024) -> None:
        """A new stream on `key`, as far as the guest knows."""
        self.streams[key] = GuestStream(buf_alloc)
        if key in self.incoming:
            self.incoming.remove(key)

    @rule(
        host_port=st.sampled_from(DIAL_PORTS),
        guest_port=st.sampled_from(GUEST_PORTS),
        buf_alloc=st.sampled_from(GUEST_BUF_ALLOCS),
    )
    def guest_connects(self, host_port: int | str, guest_port: int, buf_alloc: int) -> None:
        if isinstance(host_port, str):
            host_port = FIRST_HOST_PORT + self.muxer._next_host_port
        key = (host_port, guest_port)
        self._note(key)
        self._begin(key, buf_alloc)
        self._guest_sends(Op.REQUEST, key)

    @precondition(lambda self: self.incoming)
    @rule(which=any_index, accept=st.booleans())
    def guest_answers(self, which: int, accept: bool) -> None:
        key = self.incoming.pop(which % len(self.incoming))
        self._guest_sends(Op.RESPONSE if accept else Op.RST, key)

    @rule(
        which=any_index,
        size=st.sampled_from(["zero", "small", "credit", "past credit"]),
        cut=st.integers(0, 100),
    )
    def guest_writes(self, which: int, size: str, cut: int) -> None:
        key = self._key(which)
        conn = self.muxer._conns.get(key)
        credit = BUF_ALLOC - (conn.in_flight_from_guest if conn is not None else 0)
        length = {"zero": 0, "small": min(credit, 100), "credit": credit, "past credit": credit + 1}
        self._guest_sends(Op.RW, key, self.guest_data.randbytes(length[size]), cut=cut)

    @rule(which=any_index, how=st.sampled_from(["RST", 0, 1, 2, 3]))
    def guest_ends(self, which: int, how: str | int) -> None:
        """An RST, or a SHUTDOWN with these flags."""
        key = self._key(which)
        if how == "RST":
            self._guest_sends(Op.RST, key)
            self._begin(key)
        else:
            self._guest_sends(Op.SHUTDOWN, key, flags=int(how))

    @rule(
        which=any_index,
        action=st.sampled_from(["ask", "its reader catches up", "tell"]),
        buf_alloc=st.sampled_from(GUEST_BUF_ALLOCS),
        fwd_cnt=st.sampled_from(["consumed", "received", "ahead", "zero", "max"]),
    )
    def guest_credit(self, which: int, action: str, buf_alloc: int, fwd_cnt: str) -> None:
        key = self._key(which)
        stream = self._stream(key)
        if action == "ask":
            self._guest_sends(Op.CREDIT_REQUEST, key)
        elif action == "its reader catches up":  # told with its next packet
            stream.consumed = stream.received
        else:
            stream.buf_alloc = buf_alloc
            counts = {"consumed": stream.consumed, "received": stream.received,
                      "ahead": stream.received + 1000, "zero": 0, "max": U32}  # fmt: skip
            self._guest_sends(Op.CREDIT_UPDATE, key, fwd_cnt=counts[fwd_cnt] & U32)

    @rule(
        which=any_index,
        op=st.integers(0, 9),
        flags=st.integers(0, 7),
        wrong=st.sampled_from(["", "src_cid", "dst_cid", "type"]),
    )
    def guest_sends_odd_packet(self, which: int, op: int, flags: int, wrong: str) -> None:
        """Any op on a stream, or a packet not for the host."""
        key = self._key(which)
        if not wrong:
            self._guest_sends(op, key, self.guest_data.randbytes(10 if op == Op.RW else 0),
                              flags=flags)  # fmt: skip
            if op in (Op.REQUEST, Op.RST):
                self._begin(key)
            return
        # From a port of its own: the muxer's RST says it comes from the host, as to a stream.
        fields = dict(src_cid=GUEST_CID, dst_cid=HOST_CID, type=TYPE_STREAM)
        fields[wrong] += 7
        hdr = Header(fields["src_cid"], fields["dst_cid"], MISADDRESSED_PORT, key[0], 0,
                     fields["type"], op, flags, 0, 0)  # fmt: skip
        self.muxer.from_guest(hdr, [])

    @rule(room=st.sampled_from(ROOMS), cut=st.integers(1, 100))
    def to_guest(self, room: int, cut: int) -> None:
        self._to_guest(room, cut)

    def _to_guest(self, room: int, cut: int = 20) -> int:
        """The muxer's next packet for the guest, checked and taken in; its length."""
        buf = bytearray(room)
        cut = min(cut, room - 1)
        length = self.muxer.to_guest([memoryview(buf)[:cut], memoryview(buf)[cut:]], room)
        if length == 0:
            return 0
        assert HEADER_SIZE <= length <= room
        hdr = Header.unpack(memoryview(buf))
        assert hdr.len == length - HEADER_SIZE
        assert (hdr.src_cid, hdr.dst_cid, hdr.type) == (HOST_CID, GUEST_CID, TYPE_STREAM)
        key = (hdr.src_port, hdr.dst_port)
        self._note(key)
        conn = self.muxer._conns.get(key)
        if hdr.op == Op.REQUEST:
            self._begin(key)
            self.incoming.append(key)
        elif hdr.op == Op.RST and conn is None and key not in self._dialing():
            self._begin(key)  # else an earlier stream's, late
        elif hdr.op == Op.RW:
            self._data_for_guest(key, conn, bytes(buf[HEADER_SIZE:length]))
        elif hdr.op == Op.SHUTDOWN and hdr.flags & Shutdown.SEND and conn is not None:
            program = self.owner[id(conn)][1]
            assert program.shut_wr or program.closed, "EOF for a program still writing"
            assert program.delivered == len(program.written), "EOF before the program's data"
        return length

    def _dialing(self) -> set[Key]:
        return {(hdr.dst_port, hdr.src_port) for hdr in self.muxer._dialing.values()}

    def _data_for_guest(self, key: Key, conn: Connection | None, data: bytes) -> None:
        assert conn is not None, f"data on {key}, a stream the muxer does not have"
        stream = self._stream(key)
        if stream.told_fwd_cnt <= stream.received:  # a guest that told the truth
            in_flight = stream.received - stream.told_fwd_cnt
            assert in_flight + len(data) <= stream.told_buf_alloc, "past the guest's credit"
        stream.received += len(data)
        program = self.owner[id(conn)][1]
        start = program.delivered
        assert data == program.written[start : start + len(data)], "host data out of order"
        program.delivered += len(data)

    @rule()
    def reset(self) -> None:
        self.muxer.reset()
        self.streams.clear()
        self.incoming.clear()

    # ---- host programs ----

    def _live(self, which: int) -> Program | None:
        """Mostly one with a stream (which goes deepest), else any not closed."""
        live = [p for p in self.programs if not p.closed]
        streaming = [p for p in live if p.conn is not None and p.conn.sock.fileno() >= 0]
        if streaming and which % 4:
            return streaming[which % len(streaming)]
        return live[which % len(live)] if live else None

    def _add(self, sock: socket.socket, *, dialed: bool) -> Program:
        program = Program(len(self.programs) + 1, sock, dialed=dialed)
        self.programs.append(program)
        self.by_name[program.name] = program
        return program

    @precondition(lambda self: len(self.programs) < MAX_PROGRAMS)
    @rule(
        port=st.sampled_from(GUEST_PORTS),
        line=st.sampled_from(
            ["full", "with data", "partial", "garbage", "overlong", "port too big", "no newline"]
        ),
    )
    def program_connects(self, port: int, line: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("")  # an abstract name of its own: see Program
        sock.setblocking(False)
        sock.connect(self.path)  # the backlog has room for MAX_PROGRAMS
        program = self._add(sock, dialed=False)
        full = f"CONNECT {port}\n".encode()
        lines = {
            "full": full, "with data": full, "partial": full, "garbage": b"HELLO\n",
            "overlong": b"C" * (MAX_LINE + 1), "port too big": b"CONNECT 4294967296\n",
            "no newline": full[:-1],
        }  # fmt: skip
        text = lines[line]
        if line == "partial":
            text, program.line_rest = full[:4], full[4:]
        assert program.send(text) == len(text)
        if line == "with data":
            program.write(50)

    @rule(which=any_index, size=st.sampled_from([1, 100, 4096, 70000]))
    def program_writes(self, which: int, size: int) -> None:
        """The end of its CONNECT line if it has not sent it all, else stream data."""
        program = self._live(which)
        if program is None or program.shut_wr:
            return
        if program.line_rest:
            assert program.send(program.line_rest) in (0, len(program.line_rest))
            program.line_rest = b""
        else:
            program.write(size)

    @rule(which=any_index, most=st.sampled_from([1, 7, 4096, 1 << 20]))
    def program_reads(self, which: int, most: int) -> None:
        program = self._live(which)
        if program is not None and not program.eof:
            program.read(most)

    @rule(which=any_index)
    def program_shuts_down(self, which: int) -> None:
        program = self._live(which)
        if program is not None and not program.line_rest:
            try:
                program.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return
            program.shut_wr = True

    @rule(which=any_index)
    def program_closes(self, which: int) -> None:
        program = self._live(which)
        if program is not None:
            program.close()

    # ---- the dialer ----

    @rule(
        which=any_index,
        how=st.sampled_from(
            ["connect", "connect", "refuse", "refuse with a socket", "ok without a socket"]
        ),
    )
    def dialer_answers(self, which: int, how: str) -> None:
        """Answer a request, any one of those not answered: late ones too (the guest gave up,
        or the transport was reset since)."""
        while True:
            try:
                self.pending_dials.append(REQUEST.unpack(self.dial_end.recv(REQUEST.size)))
            except BlockingIOError:
                break
        if not self.pending_dials:
            return
        _, token = self.pending_dials.pop(which % len(self.pending_dials))
        error = 0 if how in ("connect", "ok without a socket") else errno.ECONNREFUSED
        if how == "connect" or how == "refuse with a socket":
            if len(self.programs) >= MAX_PROGRAMS:
                how, error = "refuse", errno.EAGAIN
            else:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ours.bind("")
                # The muxer's writes stop at a few KB: what the guest sends past that waits.
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                self._add(ours, dialed=True)
                fds = array.array("i", [theirs.fileno()])
                self.dial_end.sendmsg(
                    [REPLY.pack(token, error)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                )
                theirs.close()
                return
        self.dial_end.send(REPLY.pack(token, error))

    # ---- the common ways to a stream, in one step ----

    @initialize()
    def streams_both_ways(self) -> None:
        """A stream from a host program and one from the guest, to start with."""
        self.program_gets_a_stream(GUEST_PORTS[0])
        self.guest_gets_a_stream(5000, GUEST_PORTS[1], 256 * 1024)

    def _take_control(self) -> None:
        while self.muxer.has_control():
            self._to_guest(4096)

    @precondition(lambda self: len(self.programs) < MAX_PROGRAMS)
    @rule(port=st.sampled_from(GUEST_PORTS))
    def program_gets_a_stream(self, port: int) -> None:
        """A host program connects, the guest accepts."""
        self.program_connects(port, "full")
        self.handle_events()
        self._take_control()
        conn = self.programs[-1].conn
        if conn is not None and conn.key in self.incoming:
            self.incoming.remove(conn.key)
            self._guest_sends(Op.RESPONSE, conn.key)

    @precondition(lambda self: len(self.programs) < MAX_PROGRAMS)
    @rule(
        host_port=st.sampled_from(DIAL_PORTS),
        guest_port=st.sampled_from(GUEST_PORTS),
        buf_alloc=st.sampled_from(GUEST_BUF_ALLOCS),
    )
    def guest_gets_a_stream(self, host_port: int | str, guest_port: int, buf_alloc: int) -> None:
        """The guest connects to a host listener, which accepts."""
        self.guest_connects(host_port, guest_port, buf_alloc)
        self.dialer_answers(len(self.pending_dials), "connect")  # the newest request
        self.handle_events()
        self._take_control()

    @rule(
        which=any_index,
        host=st.sampled_from([0, 1, 5000, 200_000]),
        guest=st.sampled_from([0, 1, 5000, BUF_ALLOC]),
        read=st.sampled_from([0, 1, 4096, 1 << 20]),
        room=st.sampled_from(ROOMS),
    )
    def traffic(self, which: int, host: int, guest: int, read: int, room: int) -> None:
        """Both ends of a stream write (the guest within its credit), the device makes a round,
        the program reads."""
        program = self._live(which)
        conn = program.conn if program is not None else None
        if program is None or conn is None or conn.sock.fileno() < 0:
            return
        if not program.shut_wr:
            program.write(host)
        credit = BUF_ALLOC - conn.in_flight_from_guest
        if conn.state is State.ESTABLISHED and not conn.guest_shutdown & Shutdown.SEND:
            payload = self.guest_data.randbytes(min(guest, credit))
            self._guest_sends(Op.RW, conn.key, payload, cut=len(payload) // 2)
        self.device_round(room, 4)
        if read and not program.eof:
            program.read(read)

    # ---- the device's calls ----

    @rule()
    def handle_events(self) -> None:
        self.muxer.handle_events()
        self._match_streams()

    @rule(room=st.sampled_from(ROOMS), packets=st.integers(1, 4))
    def device_round(self, room: int, packets: int) -> None:
        """What the device's worker does when the muxer's epoll fd is readable."""
        self.handle_events()
        for _ in range(packets):
            if not self._to_guest(room):
                return

    @rule()
    def drain(self) -> None:
        """Everything moves that can: then every stream has passed on all the guest sent, and
        the guest has all the host program wrote, as far as its credit allows."""
        for _ in range(100):
            self.muxer.handle_events()
            self._match_streams()
            progress = False
            while self._to_guest(HEADER_SIZE + MAX_PAYLOAD):
                progress = True
            for program in self.programs:
                progress |= program.read_all()
            if not progress:
                break
        # Level-triggered: what is left readable is what the worker would come back for.
        poll = select.poll()
        poll.register(self.muxer.fileno(), select.POLLIN)
        assert not poll.poll(0), "the epoll fd stays readable with nothing to do: the worker spins"
        for conn in self.muxer._conns.values():
            program = self.owner[id(conn)][1]
            if program.closed or program.awaiting_ok:
                continue
            assert not conn.to_host and program.got == len(program.expected), "guest data lost"
            if conn.state is State.ESTABLISHED and not conn.guest_shutdown & Shutdown.RCV:
                assert conn.peer_credit == 0 or program.delivered == len(program.written), (
                    "host data stuck while the guest has credit"
                )

    def _match_streams(self) -> None:
        """Match streams new in the muxer to their programs."""
        for conn in self.muxer._conns.values():
            if id(conn) not in self.owner:
                program = self.by_name[conn.sock.getpeername()]
                assert program.conn is None, "one program's socket in two streams"
                program.conn = conn
                self.owner[id(conn)] = (conn, program)

    # ---- what must hold after every step ----

    @invariant()
    def muxer_holds_only_what_it_uses(self) -> None:
        muxer = self.muxer
        self._match_streams()
        streams: dict[int, Connection] = {}
        for key, conn in muxer._conns.items():
            assert conn.key == key
            assert conn.sock.fileno() >= 0, f"stream {key} kept with its socket closed"
            streams[conn.sock.fileno()] = conn
        for fd, handshake in muxer._handshakes.items():
            assert handshake.sock.fileno() == fd
        held = {*streams, *muxer._handshakes, self.listener.fileno(), self.requests.fileno()}
        assert set(muxer._watched) <= set(streams), "watching a socket that is not a stream's"
        for fd, conn in muxer._ready.items():
            assert streams.get(fd) is conn, f"fd {fd} ready to read, not its stream's"
        assert set(muxer._handlers) <= held, "a handler for an fd the muxer does not hold"
        registered = _epoll_registrations(muxer.fileno())
        assert set(registered) == set(muxer._handlers), "epoll and the handlers disagree"
        for fd, events in muxer._watched.items():
            assert registered[fd] & _SAME_EVENTS == events & _SAME_EVENTS
            handler = muxer._handlers[fd]
            assert isinstance(handler, functools.partial) and handler.args[0] is streams[fd]
        live = sum(not p.closed for p in self.programs)
        expected = self.base_fds + live + len(muxer._conns) + len(muxer._handshakes)
        assert _open_fds() == expected, "an fd leaked (or one the muxer holds is closed)"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # listdir's own


def _epoll_registrations(epfd: int) -> dict[int, int]:
    """The fds registered in the epoll `epfd` and their events, as the kernel lists them."""
    registered = {}
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                words = line.split()
                registered[int(words[1])] = int(words[3], 16)
    return registered


@pytest.fixture(autouse=True, scope="module")
def _collected() -> None:
    """Sockets earlier tests left in reference cycles close now, not while fds are counted."""
    gc.collect()


MuxerStates.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMuxerStates = MuxerStates.TestCase
