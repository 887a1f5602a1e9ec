"""The control-socket wire format (one JSON object per line each way) and its errors."""

from __future__ import annotations

import json
from typing import Any

# The commands a VM answers that take no argument; the CLI offers one subcommand per entry.
COMMANDS: dict[str, str] = {
    "stop": "stop a running VM",
    "suspend": "pause a running VM's vCPUs and devices",
    "resume": "continue a suspended VM",
}
# The balloon's: {"cmd": "balloon", "bytes": N} sets the size it should hold (absolute);
# {"cmd": "balloon_stats"} answers {"ok": true, "balloon": {...}} (see pyvmm.balloon_control);
# with "fresh": false it does not ask the guest for new statistics, and answers at once.
BALLOON_COMMANDS: dict[str, str] = {
    "balloon": "set the size of a running VM's balloon (absolute)",
    "balloon_stats": "print the guest's memory statistics and the balloon's size, as JSON",
}

MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 1024 * 1024
# How long probing an existing socket file may wait for a listener to accept.
# The longest command name echoed back in an "unknown command" reply.
MAX_ECHOED_COMMAND = 64
NEWLINE = b"\n"


class ControlError(Exception):
    """A control-socket operation failed; the message names the socket path."""


class NoSuchSocketError(ControlError):
    """No file exists at the socket path."""


class NotASocketError(ControlError):
    """The path exists but is not a Unix socket."""


class StaleSocketError(ControlError):
    """The socket file exists but nothing listens on it."""


class SocketPermissionError(ControlError):
    """The caller may not connect to the socket."""


class ControlTimeoutError(ControlError):
    """The VM did not answer in time."""


class ConnectionLostError(ControlError):
    """The VM closed the connection or it broke before a reply arrived."""


class BadReplyError(ControlError):
    """The VM's reply is not a well-formed reply line."""


class RequestError(Exception):
    """A request line is malformed; the message is sent back to the client."""


def encode_message(message: dict[str, Any]) -> bytes:
    """One JSON object on one line (ASCII, so no embedded newline can appear)."""
    return json.dumps(message, separators=(",", ":")).encode("ascii") + NEWLINE


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def parse_request(line: bytes) -> dict[str, Any]:
    """The request a line (without its newline) holds: a JSON object with a string "cmd"."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("malformed request: not UTF-8") from None
    if not text.strip():
        raise RequestError("malformed request: empty line")
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError("malformed request: not JSON") from None
    if not isinstance(request, dict):
        raise RequestError("malformed request: not a JSON object")
    if "cmd" not in request:
        raise RequestError("malformed request: no 'cmd'")
    cmd = request["cmd"]
    if not isinstance(cmd, str):
        raise RequestError("malformed request: 'cmd' is not a string")
    return request


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped, for a one-line message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
