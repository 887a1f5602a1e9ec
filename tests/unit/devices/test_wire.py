"""The device-process protocol's framing: whole messages with their fds, and one-line errors
for what breaks it."""

from __future__ import annotations

import os

import pytest

from pyvmm.devices.wire import (
    BAR_OFFSET_LENGTH,
    Channel,
    Op,
    WireError,
    pack_windows,
    unpack,
    unpack_windows,
)


def test_a_message_arrives_whole_with_its_fds() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        a.send(Op.REGISTER_IRQFD, b"\x01\x00\x00\x00", (w,))
        op, payload, fds = b.recv(5)
        assert (op, payload, len(fds)) == (Op.REGISTER_IRQFD, b"\x01\x00\x00\x00", 1)
        os.write(fds[0], b"x")  # the received fd is the same pipe
        assert os.read(r, 1) == b"x"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_silence_and_a_closed_peer_are_wire_errors() -> None:
    a, b = Channel.pair()
    with pytest.raises(WireError, match=r"no answer within 0.05 s"):
        b.recv(0.05)
    a.close()
    with pytest.raises(WireError, match="closed the connection"):
        b.recv(1)
    b.close()


def test_an_unknown_message_and_a_short_payload_are_refused() -> None:
    a, b = Channel.pair()
    a.sock.send(b"\xee")
    with pytest.raises(WireError, match="unknown message 238"):
        b.recv(1)
    with pytest.raises(WireError, match="BAR_READ: 3 bytes, expected at least 13"):
        unpack(BAR_OFFSET_LENGTH, b"\x00\x01\x02", Op.BAR_READ)
    a.close()
    b.close()


def test_bar_windows_round_trip() -> None:
    windows = {0: (0xE000_0000, 0x4000), 2: (0x1_0000_0000, 1 << 30)}
    assert unpack_windows(pack_windows(windows)) == windows
    assert unpack_windows(pack_windows(None)) is None
    assert unpack_windows(pack_windows({})) == {}
