"""Raw mode on a pty and the stdin pump on a pipe."""

from __future__ import annotations

import contextlib
import logging
import os
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from pyvmm.terminal import StdinPump, raw_terminal

IFLAG, OFLAG, CFLAG, LFLAG = 0, 1, 2, 3


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_raw_mode_and_restore(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    assert before[LFLAG] & termios.ICANON  # a fresh pty is cooked
    with raw_terminal(slave) as term:
        attrs = termios.tcgetattr(slave)
        assert term.active
        assert not attrs[LFLAG] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not attrs[OFLAG] & termios.OPOST
        assert not attrs[IFLAG] & (termios.ICRNL | termios.IXON)
        assert attrs[CFLAG] & termios.CSIZE == termios.CS8
    assert termios.tcgetattr(slave) == before
    assert not term.active


def test_raw_mode_passes_bytes_through(pty: tuple[int, int]) -> None:
    master, slave = pty
    with raw_terminal(slave):
        os.write(slave, b"a\nb")
        os.write(master, b"\x03\r")  # ^C and CR reach the reader unchanged
        time.sleep(0.05)
        assert os.read(master, 100) == b"a\nb"
        assert os.read(slave, 100) == b"\x03\r"


def test_restored_after_exception(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError), raw_terminal(slave):
        raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before


def test_restore_early_and_twice(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    with raw_terminal(slave) as term:
        term.restore()  # what an atexit hook or signal handler would do
        assert termios.tcgetattr(slave) == before
        # Something else changes the terminal; a second restore must not undo it.
        changed = termios.tcgetattr(slave)
        changed[LFLAG] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, changed)
        term.restore()
    assert termios.tcgetattr(slave) == changed


def test_not_a_terminal_is_left_alone() -> None:
    r, w = os.pipe()
    try:
        with raw_terminal(r) as term:
            assert not term.active
        term.restore()
    finally:
        os.close(r)
        os.close(w)


class Collector:
    def __init__(self) -> None:
        self.data = bytearray()
        self.cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self.cond:
            self.data += chunk
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> bytes:
        with self.cond:
            self.cond.wait_for(lambda: len(self.data) >= n, timeout)
            return bytes(self.data)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):  # a test may have closed it already
            os.close(fd)


def test_pump_delivers_and_stops_at_eof(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = Collector()
    pump = StdinPump(r, sink)
    pump.start()
    os.write(w, b"hello ")
    os.write(w, b"world")
    assert sink.wait_for(11) == b"hello world"
    os.close(w)
    pump.join(5)
    assert not pump.is_alive()


def test_pump_stops_promptly_when_idle(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    pump = StdinPump(r, Collector())
    pump.start()
    time.sleep(0.05)
    assert pump.is_alive()
    start = time.monotonic()
    pump.stop(timeout=5)
    assert not pump.is_alive()
    assert time.monotonic() - start < 1.0
    pump.stop()  # stopping again is harmless


def test_pump_stop_before_start(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    pump = StdinPump(r, Collector())
    pump.stop()
    assert not pump.is_alive()


def test_pump_logs_and_stops_when_sink_fails(
    pipe: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    r, w = pipe
    calls = []

    def sink(chunk: bytes) -> None:
        calls.append(chunk)
        raise ValueError("sink broke")

    pump = StdinPump(r, sink)
    with caplog.at_level(logging.ERROR, logger="pyvmm.terminal"):
        pump.start()
        os.write(w, b"x")
        pump.join(5)
    assert not pump.is_alive()
    assert calls == [b"x"]
    assert "sink broke" in caplog.text


def test_pump_stops_when_fd_is_bad(caplog: pytest.LogCaptureFixture) -> None:
    r, w = os.pipe()
    pump = StdinPump(r, Collector())
    os.close(r)  # after the pump made its eventfd, so the number is not reused
    os.close(w)
    with caplog.at_level(logging.ERROR, logger="pyvmm.terminal"):
        pump.start()
        pump.join(5)
    assert not pump.is_alive()
    assert caplog.records
