"""The VM side of the control socket: a 0600 Unix socket served by background threads.

One thread accepts and each admitted connection gets a thread of its own, rather than one poll
loop serving them all: a command may block (suspend waits for the vCPUs to park) and a client may
be slow to read its reply, and with a thread each either holds up only its own connection while
every conversation stays straight-line code. The connection limit bounds the threads (an evicted
connection's thread exits as soon as it wakes).

A connection is busy while one of its requests is being handled (waiting for or running its
command) and idle otherwise, including while its reply is sent. A connection idle for
`idle_timeout`, since it was admitted or its last request was handled, is closed; when the limit
is reached a newcomer takes the slot of the one idle longest, so it is refused only when every
slot is busy.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyvmm.control.protocol import (
    MAX_ECHOED_COMMAND,
    MAX_REQUEST_BYTES,
    NEWLINE,
    RequestError,
    encode_message,
    error_reply,
    ok_reply,
    one_line,
    parse_request,
)
from pyvmm.unix_listener import UnixListener

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 64
MAX_CONNECTIONS = 64
# How long a connection may stay idle (see the module docstring) before it is closed.
IDLE_TIMEOUT = 30.0
RECV_SIZE = 4096
# A client that stops reading its replies is dropped after this long.
SEND_TIMEOUT = 5.0
# How long close() lets a command in progress finish sending its reply.
CLOSE_GRACE = 2.0
# How long close() waits for the accept thread, and for the others once their sockets are
# shut down.
CLOSE_JOIN = 2.0
# Pause before accepting again when out of file descriptors or memory.
ACCEPT_BACKOFF = 0.1
ROOT_UID = 0
_PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ControlHandler(Protocol):
    """What the VM does for each command. Calls are serialised; an exception's message is
    sent back as the error reply."""

    def stop(self) -> None:
        """Request the VM's exit and return at once (the reply is sent after this returns)."""

    def suspend(self) -> None:
        """Pause the vCPUs and device workers."""

    def resume(self) -> None:
        """Continue the vCPUs and device workers."""

    def balloon(self, num_bytes: int) -> None:
        """Set the size the balloon should hold, in bytes (absolute)."""

    def balloon_stats(self, fresh: bool) -> dict[str, Any]:
        """The balloon's size and the guest's memory statistics (asked for anew if `fresh`)."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """The connecting process's credentials (SO_PEERCRED, taken at connect time)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def peer_allowed(peer: PeerCredentials, server_uid: int) -> bool:
    """Only the VM's own user and root may control it."""
    return peer.uid in (server_uid, ROOT_UID)


@dataclass(eq=False)
class _Connection:
    """An admitted connection; its fields change under the server's lock (`idle_since` and
    `busy` only from the connection's own thread)."""

    sock: socket.socket
    idle_since: float
    busy: bool = False
    evicted: bool = False


class ControlServer:
    """Serves the control protocol on a Unix socket at `path` until `close()`.

    The socket file is created with mode 0600; peers are also checked by uid. At most
    `max_connections` are served at once; one idle for `idle_timeout` seconds is closed."""

    def __init__(
        self,
        path: str,
        handler: ControlHandler,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._commands: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
            "stop": lambda _: handler.stop(),
            "suspend": lambda _: handler.suspend(),
            "resume": lambda _: handler.resume(),
            "balloon": lambda request: handler.balloon(_balloon_bytes(request)),
            "balloon_stats": lambda request: {
                "balloon": handler.balloon_stats(request.get("fresh", True) is not False)
            },
        }
        self._uid = os.geteuid()
        self._closing = threading.Event()
        self._lock = threading.Lock()  # guards _conns, their state and closing their sockets
        self._dispatch_lock = threading.Lock()  # one command at a time across connections
        self._conns: dict[_Connection, threading.Thread] = {}
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._listener = UnixListener(path, LISTEN_BACKLOG)
        except BaseException:
            os.close(self._stop_r)
            os.close(self._stop_w)
            raise
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, let a command in progress send its reply, drop every connection and
        remove the socket file if it is still the one this server created. Idempotent."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
        os.write(self._stop_w, b"x")  # never read: wakes every poller, now and later
        me = threading.current_thread()
        if self._thread is not me:
            self._thread.join(CLOSE_JOIN)
        self._listener.unlink_if_ours()
        if not self._thread.is_alive():
            self._listener.sock.close()  # else leave it open: its poller must not see a reused fd

        with self._lock:
            threads = [t for t in self._conns.values() if t is not me]
        _join_all(threads, CLOSE_GRACE)
        with self._lock:
            for conn in self._conns:
                _shutdown(conn.sock)
        _join_all(threads, CLOSE_JOIN)
        if any(t.is_alive() for t in threads) or self._thread.is_alive():
            log.warning("control socket %s: threads still running after close", self.path)
            return  # leave the stop pipe open rather than let a live poller see a reused fd
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not self._closing.is_set():
            poller.poll()
            if self._closing.is_set():
                return
            try:
                conn, _ = self._listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                log.warning("control socket %s: accept failed: %s", self.path, e)
                if e.errno in _ACCEPT_RESOURCE_ERRORS:
                    self._closing.wait(ACCEPT_BACKOFF)
                continue
            try:
                self._admit(conn)
            except Exception:
                log.exception("control socket %s: dropping a connection", self.path)
                conn.close()

    def _admit(self, sock: socket.socket) -> None:
        peer = peer_credentials(sock)
        if not peer_allowed(peer, self._uid):
            log.warning("control socket %s: refused pid %d uid %d", self.path, peer.pid, peer.uid)
            _send_nowait(sock, error_reply("permission denied"))
            sock.close()
            return
        sock.settimeout(SEND_TIMEOUT)
        with self._lock:
            if self._closing.is_set():
                sock.close()
                return
            if not self._make_room():
                log.debug("control socket %s: all busy, refused pid %d", self.path, peer.pid)
                _send_nowait(sock, error_reply("too many connections"))
                sock.close()
                return
            conn = _Connection(sock, idle_since=time.monotonic())
            thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"control-{peer.pid}", daemon=True
            )
            self._conns[conn] = thread
            try:
                thread.start()
            except BaseException:
                del self._conns[conn]
                raise

    def _make_room(self) -> bool:
        """Whether one more connection fits, evicting the one idle longest if none would.
        Called with the lock held."""
        live = [c for c in self._conns if not c.evicted]
        if len(live) < self._max_connections:
            return True
        idle = [c for c in live if not c.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        victim.evicted = True
        # Its thread wakes, or fails the send it is blocked in, and exits; until then it is not
        # counted.
        _shutdown(victim.sock)
        log.debug("control socket %s: closed the longest idle connection", self.path)
        return True

    def _serve(self, conn: _Connection) -> None:
        try:
            self._serve_lines(conn)
        except OSError as e:
            log.debug("control socket %s: connection dropped: %s", self.path, e)
        except Exception:
            log.exception("control socket %s: connection failed", self.path)
        finally:
            with self._lock:
                del self._conns[conn]
                conn.sock.close()

    def _serve_lines(self, conn: _Connection) -> None:
        sock = conn.sock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        buf = bytearray()
        while True:
            if not self._wait_for_input(conn, poller):
                return
            data = sock.recv(RECV_SIZE)
            if not data:
                return  # the client hung up, perhaps mid-line: nothing to do
            buf += data
            while (end := buf.find(NEWLINE)) >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                if len(line) > MAX_REQUEST_BYTES:
                    sock.sendall(encode_message(_too_long()))
                    return
                reply = self._run(conn, line)
                if reply is None:
                    return
                sock.sendall(encode_message(reply))
                if self._closing.is_set():
                    return
            if len(buf) > MAX_REQUEST_BYTES:
                sock.sendall(encode_message(_too_long()))
                return

    def _wait_for_input(self, conn: _Connection, poller: select.poll) -> bool:
        """Wait until the connection has input; False if it is to be closed instead."""
        remaining = conn.idle_since + self._idle_timeout - time.monotonic()
        if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
            log.debug("control socket %s: closed a connection idle too long", self.path)
            return False
        return not (self._closing.is_set() or conn.evicted)

    def _run(self, conn: _Connection, line: bytes) -> dict[str, Any] | None:
        """The reply to one request line, handled with the connection marked busy; None if it
        was evicted before it could start."""
        with self._lock:
            if conn.evicted:
                return None
            conn.busy = True
        try:
            return self._handle(line)
        finally:
            # Idle again before the client sees the reply, so a client that then connects anew
            # finds this one idle; and one that is slow to read its replies holds no slot.
            with self._lock:
                conn.busy = False
                conn.idle_since = time.monotonic()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except RequestError as e:
            return error_reply(str(e))
        cmd = request["cmd"]
        action = self._commands.get(cmd)
        if action is None:
            name = one_line(cmd[:MAX_ECHOED_COMMAND])
            return error_reply(f"unknown command {name!r}")
        with self._dispatch_lock:
            if self._closing.is_set():
                return error_reply("the VM is shutting down")
            try:
                fields = action(request)
            except Exception as e:
                log.debug("control command %s failed", cmd, exc_info=True)
                return error_reply(one_line(str(e)) or type(e).__name__)
        return ok_reply(**(fields or {}))


def _balloon_bytes(request: dict[str, Any]) -> int:
    value = request.get("bytes")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"balloon: 'bytes' must be a whole number of bytes, not {value!r}")
    return value


def _too_long() -> dict[str, Any]:
    return error_reply(f"request longer than {MAX_REQUEST_BYTES} bytes")


def _send_nowait(conn: socket.socket, message: dict[str, Any]) -> None:
    """Best effort: a short reply to a fresh connection fits its empty send buffer."""
    with contextlib.suppress(OSError):
        conn.send(encode_message(message), socket.MSG_DONTWAIT)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
