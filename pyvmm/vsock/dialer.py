"""Connecting to host listeners for the guest: `PATH_<port>` for a guest that connects to host
port <port>. The VMM does it (`Dialer`, a thread) and hands the socket over by SCM_RIGHTS, as a
jailed device process can reach no file system; the device asks through `DialRequests`, its end
of a SOCK_SEQPACKET pair, and never waits for the answer: it comes as an event.

Each request is (port u32, token u64); each reply is (token u64, errno i32) with the connected
socket when errno is 0.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

REQUEST = struct.Struct("<IQ")
REPLY = struct.Struct("<Qi")
# An AF_UNIX path holds at most this many bytes (sizeof(sun_path) - 1).
MAX_UNIX_PATH = 107
MAX_PORT_SUFFIX = len("_4294967295")
REPLIES_PER_EVENT = 64


class DialerError(Exception):
    """The host-side socket path cannot be used; the message names it."""


def check_path(path: str) -> None:
    """DialerError if `PATH_<port>` could be too long for a Unix socket address."""
    if len(os.fsencode(path)) + MAX_PORT_SUFFIX > MAX_UNIX_PATH:
        raise DialerError(
            f"--vsock-uds {path}: too long for a Unix socket with its _<port> suffix "
            f"(at most {MAX_UNIX_PATH - MAX_PORT_SUFFIX} bytes)"
        )


@dataclass
class DialReply:
    token: int
    sock: socket.socket | None  # None: the host port refused or is not there


class DialRequests:
    """The device's end: ask for host ports, collect the answers."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.gone = False
        """The dialer's end closed: no answer comes any more (its socket stays readable)."""

    def fileno(self) -> int:
        return self._sock.fileno()

    def request(self, port: int, token: int) -> None:
        self._sock.send(REQUEST.pack(port, token))

    def replies(self) -> Iterator[DialReply]:
        """The answers that have come (never waits)."""
        for _ in range(REPLIES_PER_EVENT):
            fds = array.array("i")
            try:
                data, ancdata, _, _ = self._sock.recvmsg(
                    REPLY.size, socket.CMSG_SPACE(fds.itemsize)
                )
            except BlockingIOError:
                return
            except OSError:  # ECONNRESET: the dialer closed with requests unread
                self.gone = True
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if len(data) != REPLY.size:  # the dialer is gone
                for fd in fds:
                    os.close(fd)
                self.gone = True
                return
            token, error = REPLY.unpack(data)
            sock = None
            if fds:
                # Named in full: a socket object left to find out asks the kernel
                # (getsockname, getsockopt), which a jailed device may not.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fds[0])
                for fd in fds[1:]:
                    os.close(fd)
            yield DialReply(token, sock if error == 0 else None)
            if sock is not None and error != 0:
                sock.close()

    def close(self) -> None:
        self._sock.close()


class Dialer:
    """The VMM's end: a thread that connects to `PATH_<port>` for each request."""

    def __init__(self, path: str) -> None:
        check_path(path)
        self.path = path
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self.device_end = theirs
        """The socket to give the device (DialRequests); the caller closes it once given."""
        self._thread = threading.Thread(target=self._serve, name="vsock-dialer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data = self._sock.recv(REQUEST.size + 1)
            except OSError:
                return
            if len(data) != REQUEST.size:
                return  # the device's end closed (or sent garbage): done
            port, token = REQUEST.unpack(data)
            sock, error = self._connect(port)
            try:
                fds = [sock.fileno()] if sock is not None else []
                self._sock.sendmsg(
                    [REPLY.pack(token, error)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [],
                )
            except OSError:
                return
            finally:
                if sock is not None:
                    sock.close()

    def _connect(self, port: int) -> tuple[socket.socket | None, int]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Non-blocking: a listener whose backlog is full refuses (EAGAIN) rather than
        # holding the dialer up.
        sock.setblocking(False)
        try:
            sock.connect(f"{self.path}_{port}")
        except OSError as e:
            sock.close()
            return None, e.errno or errno.ECONNREFUSED
        return sock, 0

    def close(self) -> None:
        """Stop serving: the thread ends when it sees the socket shut."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is not None:
            self._thread.join(timeout=1.0)
        self._sock.close()
        self.device_end.close()
