"""The messages between the VMM and a device process, over a SOCK_SEQPACKET socketpair.

The VMM asks (a register access, a BAR move, pause); the device process answers with one
REPLY, or FAILED and a reason. While it works on a request the device process may make
requests of its own of the VM (an MSI route, an irqfd or ioeventfd to register, with the
eventfd attached by SCM_RIGHTS); the VMM carries each out before it reads on, and answers those
that return something (a GSI). Only the device's register and configuration traffic takes this
path: queue work goes through the eventfds and guest memory the process holds.

A message is one packet: a one-byte `Op`, then that op's fields, packed little-endian.
"""

from __future__ import annotations

import enum
import os
import socket
import struct

MAX_PACKET = 4096
MAX_FDS = 4


class Op(enum.IntEnum):
    # VMM -> device process
    CONFIG_READ = 1  # offset u32, length u32 -> the bytes
    CONFIG_WRITE = 2  # offset u32, data -> the BAR windows if they changed
    BAR_READ = 3  # bar u8, offset u64, length u32 -> the bytes
    BAR_WRITE = 4  # bar u8, offset u64, data -> nothing
    BARS_CHANGED = 5  # (bar u8, address u64) * n -> nothing
    PAUSE = 8  # timeout f64 -> parked u8
    RESUME = 9  # -> nothing
    SHUTDOWN = 10  # -> nothing; the process then exits
    COMMAND = 11  # a JSON request for the device itself -> its JSON answer
    # device process -> VMM
    REPLY = 64
    FAILED = 65  # a one-line reason (UTF-8)
    ALLOCATE_GSI = 66  # -> REPLY with gsi u32
    REGISTER_IRQFD = 67  # gsi u32, with the eventfd
    SET_MSI_ROUTE = 68  # gsi u32, address u64, data u32
    REGISTER_IOEVENTFD = 69  # key u32, address u64, length u32, with the eventfd
    UNREGISTER_IOEVENTFD = 70  # key u32, address u64, length u32


class WireError(Exception):
    """The other side broke the protocol, went away, or did not answer in time."""


U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
F64 = struct.Struct("<d")
OFFSET_LENGTH = struct.Struct("<II")
BAR_OFFSET = struct.Struct("<BQ")
BAR_OFFSET_LENGTH = struct.Struct("<BQI")
BAR_ADDRESS = struct.Struct("<BQ")
BAR_WINDOW = struct.Struct("<BQQ")
MSI_ROUTE = struct.Struct("<IQI")
IOEVENTFD = struct.Struct("<IQI")


class Channel:
    """One end of the socketpair: whole messages, each with any fds attached."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: Op, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        message = bytes((op,)) + payload
        try:
            if fds:
                socket.send_fds(self.sock, [message], list(fds))
            else:
                self.sock.send(message)
        except OSError as exc:
            raise WireError(f"send {op.name}: {exc.strerror or exc}") from None

    def recv(self, timeout: float | None = None) -> tuple[Op, bytes, list[int]]:
        """The next message, its payload and the fds it carried (now this process's); waits at
        most `timeout` seconds (None: for ever)."""
        self.sock.settimeout(timeout)
        try:
            message, fds, flags, _ = socket.recv_fds(self.sock, MAX_PACKET, MAX_FDS)
        except TimeoutError:
            raise WireError(f"no answer within {timeout:g} s") from None
        except OSError as exc:
            raise WireError(f"receive: {exc.strerror or exc}") from None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise WireError("a message too long for the protocol")
        if not message:
            raise WireError("the other side closed the connection")
        try:
            op = Op(message[0])
        except ValueError:
            close_fds(fds)
            raise WireError(f"unknown message {message[0]}") from None
        return op, message[1:], fds

    def close(self) -> None:
        self.sock.close()


def unpack(layout: struct.Struct, payload: bytes, what: Op) -> tuple[int, ...]:
    """The fixed fields at the start of `payload`; a short payload is a WireError."""
    if len(payload) < layout.size:
        raise WireError(f"{what.name}: {len(payload)} bytes, expected at least {layout.size}")
    return layout.unpack_from(payload)


def pack_windows(windows: dict[int, tuple[int, int]] | None) -> bytes:
    """A CONFIG_WRITE reply: a flag, then each BAR window."""
    if windows is None:
        return b"\x00"
    return b"\x01" + b"".join(BAR_WINDOW.pack(bar, a, s) for bar, (a, s) in windows.items())


def unpack_windows(payload: bytes) -> dict[int, tuple[int, int]] | None:
    if not payload or payload[0] == 0:
        return None
    body = payload[1:]
    if len(body) % BAR_WINDOW.size:
        raise WireError(f"CONFIG_WRITE reply of {len(payload)} bytes")
    return {bar: (a, s) for bar, a, s in BAR_WINDOW.iter_unpack(body)}


def pack_addresses(mapped: dict[int, int]) -> bytes:
    return b"".join(BAR_ADDRESS.pack(bar, address) for bar, address in mapped.items())


def unpack_addresses(payload: bytes) -> dict[int, int]:
    if len(payload) % BAR_ADDRESS.size:
        raise WireError(f"BARS_CHANGED of {len(payload)} bytes")
    return dict(BAR_ADDRESS.iter_unpack(payload))


def close_fds(fds: list[int]) -> None:
    """Close fds received with a message (or kept from one)."""
    for fd in fds:
        os.close(fd)
