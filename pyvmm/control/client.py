"""The client side of the control socket: send one request to a running VM, read its reply."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Any

from pyvmm.control.protocol import (
    MAX_REPLY_BYTES,
    NEWLINE,
    BadReplyError,
    ConnectionLostError,
    ControlError,
    ControlTimeoutError,
    NoSuchSocketError,
    NotASocketError,
    SocketPermissionError,
    StaleSocketError,
    encode_message,
    one_line,
)

DEFAULT_TIMEOUT = 10.0
RECV_SIZE = 4096
# The pause between connection attempts while the VM's accept queue is full.
CONNECT_RETRY = 0.01


def send_command(
    path: str, request: dict[str, Any], timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """Send `request` to the VM listening at `path` and return its reply, a dict whose "ok" is
    a bool and, when false, whose "error" is a string. Raises a ControlError subclass when no
    well-formed reply arrives within `timeout` seconds."""
    message = encode_message(request)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path, deadline, timeout)
        send_error: OSError | None = None
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(message)
        except TimeoutError:
            raise ControlTimeoutError(
                f"{path}: the VM did not take the request within {timeout:g} s"
            ) from None
        except OSError as e:
            send_error = e  # it may still have replied (e.g. "permission denied") before closing
        try:
            line = _read_line(sock, path, deadline, timeout)
        except ConnectionLostError:
            if send_error is not None:
                raise ConnectionLostError(
                    f"{path}: connection to the VM lost ({_reason(send_error)})"
                ) from None
            raise
    return _parse_reply(line, path)


def reply_error_message(path: str, reply: dict[str, Any]) -> str:
    """One line for a reply whose "ok" is false, naming the socket as ControlError messages do."""
    return f"{path}: {one_line(reply['error'])}"


def _connect(sock: socket.socket, path: str, deadline: float, timeout: float) -> None:
    timed_out = ControlTimeoutError(f"{path}: timed out after {timeout:g} s connecting to the VM")
    while True:
        try:
            sock.connect(path)
        except BlockingIOError:
            # The VM's accept queue is full (Linux refuses at once rather than wait when the
            # socket has a timeout): it is alive but busy, so try again until the deadline.
            if deadline - time.monotonic() <= CONNECT_RETRY:
                raise timed_out from None
            time.sleep(CONNECT_RETRY)
        except FileNotFoundError:
            raise NoSuchSocketError(f"{path}: no such socket (is the VM running?)") from None
        except ConnectionRefusedError:
            if _exists_not_socket(path):
                raise NotASocketError(f"{path}: not a socket") from None
            raise StaleSocketError(f"{path}: no VM is listening (stale socket)") from None
        except PermissionError:
            raise SocketPermissionError(f"{path}: permission denied") from None
        except TimeoutError:
            raise timed_out from None
        except OSError as e:
            raise ControlError(f"{path}: {_reason(e)}") from None
        else:
            return


def _remaining(deadline: float) -> float:
    """Seconds left until `deadline`; TimeoutError if there are none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _read_line(sock: socket.socket, path: str, deadline: float, timeout: float) -> bytes:
    buf = bytearray()
    while NEWLINE not in buf:
        if len(buf) > MAX_REPLY_BYTES:
            raise BadReplyError(f"{path}: reply from the VM longer than {MAX_REPLY_BYTES} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlTimeoutError(f"{path}: no reply from the VM within {timeout:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            raise ControlTimeoutError(
                f"{path}: no reply from the VM within {timeout:g} s"
            ) from None
        except OSError as e:
            raise ConnectionLostError(f"{path}: connection to the VM lost ({_reason(e)})") from None
        if not data:
            if buf:
                raise BadReplyError(f"{path}: malformed reply from the VM (no newline)")
            raise ConnectionLostError(f"{path}: the VM closed the connection without replying")
        buf += data
    return bytes(buf[: buf.index(NEWLINE)])


def _parse_reply(line: bytes, path: str) -> dict[str, Any]:
    bad = BadReplyError(f"{path}: malformed reply from the VM")
    try:
        reply = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise bad
    if not reply["ok"] and not isinstance(reply.get("error"), str):
        raise bad
    return reply


def _exists_not_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
