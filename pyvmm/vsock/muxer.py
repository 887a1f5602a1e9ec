"""The host side of virtio-vsock as Unix sockets (the scheme Firecracker and Kata use).

A host program connects to the listening socket (`--vsock-uds PATH`) and sends `CONNECT <port>\\n`;
the guest is asked to accept a stream on that port from a host port picked here, and once it
does the program reads `OK <host port>\\n` and the socket carries the stream. A guest that
connects to host port P is joined to a host listener at `PATH_P`: the `Dialer` connects there
(in the VMM, which can reach the file system; a jailed device process cannot) and hands back the
socket. A refused or unreachable port ends in RST; the host program sees its socket closed.

The muxer keeps every host socket on one epoll fd, which the device's worker watches. It never
blocks: host sockets are non-blocking, and what cannot be done now waits for its epoll event.
What it holds is bounded: `MAX_CONNECTIONS` streams (and handshakes and dials), each buffering
at most its credit, and `MAX_CONTROL` packets waiting for receive buffers (past that the guest's
requests go unanswered, as they would on a lossy link, and the guest times out).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.virtio.iov import views_at, write_at
from pyvmm.ratelimit import GuestLog
from pyvmm.vsock.connection import BUF_ALLOC, Connection, State
from pyvmm.vsock.dialer import DialReply, DialRequests
from pyvmm.vsock.packet import HEADER_SIZE, HOST_CID, TYPE_STREAM, Header, Op, Shutdown

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # streams, dials and handshakes together
MAX_HANDSHAKES = 64
# The fds the muxer may hold at once beyond those it starts with: a socket per stream, dial or
# handshake, and one more that accept() or a dialer reply may bring in before it is refused.
MAX_STREAM_FDS = MAX_CONNECTIONS + 1
MAX_CONTROL = 4096
MAX_LINE = 64  # "CONNECT 4294967295\n" and room to spare
MAX_PAYLOAD = 64 * 1024  # per packet to the guest
ACCEPTS_PER_EVENT = 16
EVENT_ROUNDS = 4
FIRST_HOST_PORT = 1 << 30  # host ports for host programs' streams: [2^30, 2^31)
HOST_PORTS = 1 << 30
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


@dataclass
class Handshake:
    """A host program that connected and has not finished its CONNECT line."""

    sock: socket.socket
    line: bytes = b""


@dataclass(frozen=True)
class Control:
    """A packet without payload for the guest; its credit fields are filled when it is sent."""

    op: Op
    host_port: int
    guest_port: int
    flags: int = 0


class Muxer:
    """All of one guest's streams with the host."""

    def __init__(
        self,
        guest_cid: int,
        listener: socket.socket | None,
        dialer: DialRequests | None,
        guest_log: GuestLog,
    ) -> None:
        self.guest_cid = guest_cid
        self._log = guest_log
        self._epoll = select.epoll()
        self._listener = listener
        self._dialer = dialer
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._listening = listener is not None
        if listener is not None:
            listener.setblocking(False)
            self._register(listener.fileno(), _IN, self._accept)
        if dialer is not None:
            self._register(dialer.fileno(), _IN, self._dialed)
        self._handshakes: dict[int, Handshake] = {}
        self._conns: dict[tuple[int, int], Connection] = {}
        self._watched: dict[int, int] = {}  # connection fd -> the events it is watched for
        self._dialing: dict[int, Header] = {}  # token -> the guest's REQUEST
        self._next_token = 1
        self._next_host_port = 0
        self._control: collections.deque[Control] = collections.deque()
        self._ready: dict[int, Connection] = {}  # fd -> a stream with host data to read, in turn

    # ---- what the device uses ----

    def fileno(self) -> int:
        """The epoll fd: readable when a host socket needs attention."""
        return self._epoll.fileno()

    def keep_fds(self) -> list[int]:
        fds = [self._epoll.fileno()]
        if self._listener is not None:
            fds.append(self._listener.fileno())
        if self._dialer is not None:
            fds.append(self._dialer.fileno())
        return fds

    def handle_events(self) -> None:
        """Do what the host sockets that are ready allow (never blocks)."""
        # A few rounds: what one round starts (a client accepted) is often ready for the next
        # (its CONNECT line); what is left keeps the epoll fd readable for the worker.
        for _ in range(EVENT_ROUNDS):
            ready = self._epoll.poll(0)
            if not ready:
                return
            for fd, events in ready:
                handler = self._handlers.get(fd)
                if handler is not None:
                    handler(events)

    def has_packets(self) -> bool:
        """Whether there is something for the guest's receive queue."""
        return bool(self._control or self._ready)

    def has_control(self) -> bool:
        """Whether a control packet (a credit update, an answer) waits for the guest."""
        return bool(self._control)

    def from_guest(self, hdr: Header, payload: list[memoryview]) -> None:
        """A packet the guest sent (its payload: `hdr.len` bytes in `payload`)."""
        op = hdr.op
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != HOST_CID or hdr.type != TYPE_STREAM:
            self._log.info(
                "bad packet", "%s from %d:%d to %d:%d of type %d: only streams to the host "
                "(CID %d) from CID %d", _op_name(op), hdr.src_cid, hdr.src_port, hdr.dst_cid,
                hdr.dst_port, hdr.type, HOST_CID, self.guest_cid,
            )  # fmt: skip
            if op != Op.RST:
                self._queue(Control(Op.RST, hdr.dst_port, hdr.src_port))
            return
        key = _key(hdr)
        conn = self._conns.get(key)
        if conn is None:
            self._unconnected(hdr, key)
            return
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        if op == Op.RW:
            self._guest_data(conn, hdr, payload)
        elif op == Op.RESPONSE and conn.state is State.CONNECTING:
            self._accepted_by_guest(conn)
        elif op == Op.RST:
            self._drop(conn)
            return
        elif op == Op.SHUTDOWN:
            conn.guest_shutdown |= Shutdown(hdr.flags & (Shutdown.RCV | Shutdown.SEND))
            if conn.guest_shutdown == Shutdown.RCV | Shutdown.SEND:
                conn.state = State.CLOSING
            self._flushed(conn)
        elif op == Op.CREDIT_REQUEST:
            self._queue(Control(Op.CREDIT_UPDATE, conn.host_port, conn.guest_port))
        elif op != Op.CREDIT_UPDATE:
            self._log.info(
                "bad packet", "unexpected %s on stream %d:%d in state %s", _op_name(op),
                conn.host_port, conn.guest_port, conn.state.value,
            )  # fmt: skip
            self._reset(conn)
            return
        if conn.key in self._conns:
            self._watch(conn)

    def to_guest(self, views: list[memoryview], room: int) -> int:
        """Write the next packet for the guest into `views` (`room` bytes of them, at least a
        header's); its length, 0 if there is none."""
        while self._control:
            ctl = self._control.popleft()
            conn = self._conns.get((ctl.host_port, ctl.guest_port))
            write_at(views, 0, self._header(ctl.op, ctl.host_port, ctl.guest_port, conn,
                                             flags=ctl.flags).pack())  # fmt: skip
            return HEADER_SIZE
        while self._ready:
            fd = next(iter(self._ready))
            conn = self._ready.pop(fd)
            if conn.key not in self._conns or not conn.wants_host_data():
                if conn.key in self._conns:
                    self._watch(conn)
                continue
            if room == HEADER_SIZE:
                # No room for data (reading 0 bytes would look like the program's EOF): the
                # buffer takes the stream's credit, which needs none; the data, the next one.
                self._ready[fd] = conn
                write_at(views, 0, self._header(Op.CREDIT_UPDATE, conn.host_port,
                                                conn.guest_port, conn).pack())  # fmt: skip
                return HEADER_SIZE
            length = self._read_host(conn, views, min(room - HEADER_SIZE, conn.peer_credit))
            if length is None:  # nothing there after all
                self._watch(conn)
                continue
            if conn.key in self._conns and conn.wants_host_data():
                self._ready[fd] = conn  # more may be there: its turn comes again after the others
            elif conn.key in self._conns:
                self._watch(conn)
            return length
        return 0

    def reset(self) -> None:
        """Forget every stream (the guest's transport was reset): their host sockets close."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        for fd, handshake in list(self._handshakes.items()):
            self._unregister(fd)
            handshake.sock.close()
        self._handshakes.clear()
        self._dialing.clear()  # their answers are closed when they come
        self._control.clear()
        self._ready.clear()

    def close(self) -> None:
        """Close every stream, the epoll fd and the listening socket (the device's to close)."""
        self.reset()
        self._epoll.close()
        if self._listener is not None:
            self._listener.close()

    # ---- the guest's side ----

    def _unconnected(self, hdr: Header, key: tuple[int, int]) -> None:
        op = hdr.op
        dialing = next(
            (t for t, h in self._dialing.items() if (h.dst_port, h.src_port) == key), None
        )
        if dialing is not None:
            del self._dialing[dialing]  # the answer is closed when it comes
            if op != Op.RST:
                self._queue(Control(Op.RST, hdr.dst_port, hdr.src_port))
            return
        if op == Op.REQUEST:
            self._dial(hdr)
        elif op != Op.RST:
            self._queue(Control(Op.RST, hdr.dst_port, hdr.src_port))

    def _dial(self, hdr: Header) -> None:
        """The guest connects to host port `hdr.dst_port`: ask the dialer for the socket."""
        if self._dialer is None or self._dialer.gone or self._streams() >= MAX_CONNECTIONS:
            self._queue(Control(Op.RST, hdr.dst_port, hdr.src_port))
            return
        token = self._next_token
        self._next_token += 1
        try:
            self._dialer.request(hdr.dst_port, token)
        except OSError as e:
            log.warning("vsock: asking for host port %d failed: %s", hdr.dst_port, e.strerror)
            self._queue(Control(Op.RST, hdr.dst_port, hdr.src_port))
            return
        self._dialing[token] = hdr

    def _dialed(self, events: int) -> None:
        assert self._dialer is not None
        for reply in self._dialer.replies():
            self._dial_answered(reply)
        if self._dialer.gone:
            # Its socket stays readable: watched, it would keep the worker spinning. Dials
            # still waiting are never answered; the guest times them out.
            self._unregister(self._dialer.fileno())

    def _dial_answered(self, reply: DialReply) -> None:
        hdr = self._dialing.pop(reply.token, None)
        if hdr is None:  # the guest gave up, or the transport was reset
            if reply.sock is not None:
                reply.sock.close()
            return
        if reply.sock is None:
            self._queue(Control(Op.RST, hdr.dst_port, hdr.src_port))
            return
        conn = Connection(reply.sock, hdr.dst_port, hdr.src_port, State.ESTABLISHED)
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self._conns[conn.key] = conn
        self._queue(Control(Op.RESPONSE, conn.host_port, conn.guest_port))
        self._watch(conn)

    def _accepted_by_guest(self, conn: Connection) -> None:
        """The guest accepted a host program's stream: tell the program, and let it flow."""
        try:
            reply = f"OK {conn.host_port}\n".encode()
            if conn.sock.send(reply) != len(reply):
                raise BlockingIOError(errno.EAGAIN, "partial write")
        except OSError:
            self._reset(conn)
            return
        conn.state = State.ESTABLISHED

    def _guest_data(self, conn: Connection, hdr: Header, payload: list[memoryview]) -> None:
        if conn.state is not State.ESTABLISHED or conn.guest_shutdown & Shutdown.SEND:
            self._log.info("bad packet", "data on stream %d:%d in state %s after shutdown %d",
                           conn.host_port, conn.guest_port, conn.state.value,
                           int(conn.guest_shutdown))  # fmt: skip
            self._reset(conn)
            return
        if not conn.accepts(hdr.len):
            self._log.info("bad packet", "stream %d:%d: %d bytes past the guest's credit",
                           conn.host_port, conn.guest_port, hdr.len)  # fmt: skip
            self._reset(conn)
            return
        conn.received = (conn.received + hdr.len) & 0xFFFFFFFF
        sent = 0
        if not conn.to_host:
            try:
                sent = conn.sock.sendmsg(payload) if payload else 0
            except BlockingIOError:
                sent = 0
            except OSError:
                self._reset(conn)
                return
            conn.forwarded(sent)
        if sent < hdr.len:
            _append_from(conn.to_host, payload, sent)
        self._credit(conn)

    # ---- the host's side ----

    def _accept(self, events: int) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as e:
                # Out of fds (EMFILE, ENFILE) or memory: the program waits in the listener's
                # queue until a stream ends; the listener is not watched until then (it would
                # stay readable, and the worker would spin on it).
                log.warning("vsock: accepting a host connection failed: %s; host programs wait "
                            "until a stream ends", e.strerror)  # fmt: skip
                self._unregister(self._listener.fileno())
                self._listening = False
                return
            if len(self._handshakes) >= MAX_HANDSHAKES or self._streams() >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._handshakes[fd] = Handshake(sock)
            self._register(fd, _IN, functools.partial(self._on_handshake_event, fd))

    def _on_handshake_event(self, fd: int, events: int) -> None:
        self._on_handshake(fd)

    def _on_handshake(self, fd: int) -> None:
        """A host program's CONNECT line, as much of it as has come (read up to its end only:
        what follows it is the stream's)."""
        handshake = self._handshakes[fd]
        try:
            data = handshake.sock.recv(MAX_LINE - len(handshake.line) + 1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        end = data.find(b"\n")
        if not data or (end < 0 and len(handshake.line) + len(data) > MAX_LINE):
            self._end_handshake(fd)
            return
        take = len(data) if end < 0 else end + 1
        handshake.line += handshake.sock.recv(take)
        if end < 0:
            return
        port = _connect_port(handshake.line)
        if port is None or self._streams() >= MAX_CONNECTIONS:
            self._end_handshake(fd)
            return
        self._unregister(fd)
        del self._handshakes[fd]
        host_port = self._free_host_port(port)
        conn = Connection(handshake.sock, host_port, port, State.CONNECTING)
        self._conns[conn.key] = conn
        self._queue(Control(Op.REQUEST, host_port, port))
        self._watch(conn)

    def _end_handshake(self, fd: int) -> None:
        self._unregister(fd)
        self._handshakes.pop(fd).sock.close()

    def _on_connection(self, conn: Connection, events: int) -> None:
        if conn.key not in self._conns:
            return
        if events & _OUT or (events & (select.EPOLLERR | select.EPOLLHUP) and conn.to_host):
            self._flush(conn)
            if conn.key not in self._conns:
                return
        if conn.state is State.CONNECTING and events & _GONE:
            self._reset(conn)  # the program went away before the guest answered
            return
        if events & (_IN | select.EPOLLHUP | select.EPOLLERR) and conn.wants_host_data():
            self._ready[conn.sock.fileno()] = conn
        self._watch(conn)

    def _read_host(self, conn: Connection, views: list[memoryview], most: int) -> int | None:
        """Read up to `most` bytes of `conn`'s host socket into a packet in `views`; the
        packet's length, None if there was nothing to read."""
        most = min(most, MAX_PAYLOAD)
        try:
            length = conn.sock.recvmsg_into(views_at(views, HEADER_SIZE, most))[0]
        except BlockingIOError:
            return None
        except OSError:
            length = -1
        if length < 0:  # the program's socket failed: the stream is over
            ctl = self._header(Op.RST, conn.host_port, conn.guest_port, conn)
            self._drop(conn)
            write_at(views, 0, ctl.pack())
            return HEADER_SIZE
        if length == 0:
            conn.host_eof = True
            if conn.guest_shutdown & Shutdown.SEND or conn.state is State.CLOSING:
                hdr = self._header(Op.RST, conn.host_port, conn.guest_port, conn)
                self._drop(conn)
            else:
                hdr = self._header(Op.SHUTDOWN, conn.host_port, conn.guest_port, conn,
                                   flags=Shutdown.SEND)  # fmt: skip
            write_at(views, 0, hdr.pack())
            return HEADER_SIZE
        conn.sent = (conn.sent + length) & 0xFFFFFFFF
        hdr = self._header(Op.RW, conn.host_port, conn.guest_port, conn, length=length)
        write_at(views, 0, hdr.pack())
        return HEADER_SIZE + length

    def _flush(self, conn: Connection) -> None:
        """Pass on what the guest sent that the host socket had no room for."""
        try:
            sent = conn.sock.send(conn.to_host)
        except BlockingIOError:
            return
        except OSError:
            self._reset(conn)
            return
        del conn.to_host[:sent]
        conn.forwarded(sent)
        self._credit(conn)
        self._flushed(conn)

    def _flushed(self, conn: Connection) -> None:
        """Once everything the guest sent is passed on: its shutdown takes effect."""
        if conn.to_host:
            return
        if conn.state is State.CLOSING:
            self._reset(conn)  # RST: the guest's close is done
            return
        if conn.guest_shutdown & Shutdown.SEND:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)

    # ---- bookkeeping ----

    def _credit(self, conn: Connection) -> None:
        if conn.owes_credit_update():
            conn.fwd_cnt_told = conn.fwd_cnt
            self._queue(Control(Op.CREDIT_UPDATE, conn.host_port, conn.guest_port))

    def _header(
        self,
        op: Op,
        host_port: int,
        guest_port: int,
        conn: Connection | None,
        *,
        flags: int = 0,
        length: int = 0,
    ) -> Header:
        fwd_cnt = 0
        if conn is not None:
            fwd_cnt = conn.fwd_cnt
            conn.fwd_cnt_told = fwd_cnt
        return Header(
            HOST_CID, self.guest_cid, host_port, guest_port, length, TYPE_STREAM, op, int(flags),
            BUF_ALLOC, fwd_cnt,
        )  # fmt: skip

    def _queue(self, ctl: Control) -> None:
        if len(self._control) >= MAX_CONTROL:
            self._log.info("vsock busy", "%d packets wait for receive buffers: %s to port %d "
                           "dropped", MAX_CONTROL, ctl.op.name, ctl.guest_port)  # fmt: skip
            return
        self._control.append(ctl)

    def _reset(self, conn: Connection) -> None:
        """End `conn` with an RST to the guest."""
        self._queue(Control(Op.RST, conn.host_port, conn.guest_port))
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        """Forget `conn` and close its host socket (the guest needs no word of it)."""
        self._conns.pop(conn.key, None)
        fd = conn.sock.fileno()
        self._ready.pop(fd, None)
        if fd in self._watched:
            self._unregister(fd)
            del self._watched[fd]
        conn.close()
        if not self._listening and self._listener is not None:
            self._register(self._listener.fileno(), _IN, self._accept)
            self._listening = True

    def _watch(self, conn: Connection) -> None:
        """Watch `conn`'s socket for what it can do next: data to read (when the guest has
        credit), room to write (when guest data waits). Level-triggered: a socket whose data
        waits for receive buffers keeps the epoll fd readable, so the device rests when it has
        none (and the worker comes back when it has)."""
        fd = conn.sock.fileno()
        events = 0
        if conn.state is State.CONNECTING:
            events = _GONE  # what it sends before OK stays in its socket until then
        elif conn.wants_host_data():
            events |= _IN
        if conn.to_host:
            events |= _OUT
        current = self._watched.get(fd)
        if current == events:
            return
        if events == 0:
            self._unregister(fd)
            self._watched.pop(fd, None)
            return
        if current is None:
            self._register(fd, events, functools.partial(self._on_connection, conn))
        else:
            self._epoll.modify(fd, events)
        self._watched[fd] = events

    def _register(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def _unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def _streams(self) -> int:
        return len(self._conns) + len(self._dialing) + len(self._handshakes)

    def _free_host_port(self, guest_port: int) -> int:
        # Not the key of a guest's dial either: its answer would take the key from this stream.
        dialing = {_key(hdr) for hdr in self._dialing.values()}
        while True:
            port = FIRST_HOST_PORT + self._next_host_port
            self._next_host_port = (self._next_host_port + 1) % HOST_PORTS
            if (port, guest_port) not in self._conns and (port, guest_port) not in dialing:
                return port


def _key(hdr: Header) -> tuple[int, int]:
    """The (host port, guest port) of a packet from the guest."""
    return hdr.dst_port, hdr.src_port


def _connect_port(line: bytes) -> int | None:
    """The port of a `CONNECT <port>\\n` line, None if it is not one."""
    words = line.rstrip(b"\r\n").split(b" ")
    if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit():
        return None
    port = int(words[1])
    return port if port <= 0xFFFFFFFF else None


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"


def _append_from(buffer: bytearray, views: list[memoryview], skip: int) -> None:
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        buffer += view[skip:]
        skip = 0
