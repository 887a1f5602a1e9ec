"""A listening Unix socket that a VM owns (its control socket, its vsock host socket): made with
mode 0600, a stale socket at its path replaced and a live one refused, and at the end removed
only if the file there is still the one it made."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
PROBE_TIMEOUT = 2.0


class ListenerError(Exception):
    """The socket cannot be made at its path; the message says why."""


class SocketInUseError(ListenerError):
    """Another process listens on the socket path."""


class SocketBindError(ListenerError):
    """The socket could not be created at its path."""


def socket_is_live(path: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if something accepts connections on the socket at `path`, False if the socket is
    stale (connection refused). Other failures (no such file, permission) raise OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            return False
        except (BlockingIOError, TimeoutError):
            return True  # a full accept queue: a listener exists but is busy
    return True


class UnixListener:
    """A non-blocking listening socket at `path`."""

    def __init__(self, path: str, backlog: int, flag: str = "") -> None:
        """`flag`: what errors name before the path (the command-line flag that gave it)."""
        self.path = path
        self.sock, self._ident = _bind(path, backlog, f"{flag} {path}" if flag else path)

    def unlink_if_ours(self) -> None:
        """Remove the socket file, unless something else has replaced it since."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError as e:
            log.debug("socket %s: not removed: %s", self.path, e)

    def close(self) -> None:
        self.unlink_if_ours()
        self.sock.close()


def _bind(path: str, backlog: int, what: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path` with mode 0600 and the (st_dev, st_ino) of its file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the mode of an unbound socket's inode is the mode bind() gives the file
        # (less the umask), so the file is never wider than 0600, even for an instant.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise SocketBindError(f"{what}: cannot create the socket: {_reason(e)}") from None
            _remove_stale(path, what)
            sock.bind(path)
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) != SOCKET_MODE:
            # Narrower than 0600 because of the umask: nobody can connect before listen().
            os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise SocketBindError(f"{what}: cannot create the socket: {_reason(e)}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _remove_stale(path: str, what: str) -> None:
    """Unlink a socket nobody listens on; raise SocketInUseError if someone does."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SocketBindError(f"{what}: exists and is not a socket")
    if socket_is_live(path):
        raise SocketInUseError(f"{what}: another VM is listening there")
    os.unlink(path)


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
