"""Shared fixtures for the control-socket tests: a recording handler and a live server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.control.server import ControlServer

# The longest a gated command waits for the test to open its gate.
GATE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0


def connect(path: str | Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connection to the control socket at `path`, retried while its accept queue is full
    (Linux then refuses a Unix-socket connect at once rather than waiting)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


class Gate:
    """Holds a command inside the handler: `entered` is set when it starts, and it returns
    once `release` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


class FakeHandler:
    """Records the commands it gets; `failures` maps a command to the exception it raises and
    `gates` a command to the Gate that holds it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.failures: dict[str, Exception] = {}
        self.gates: dict[str, Gate] = {}
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def gate(self, cmd: str) -> Gate:
        gate = self.gates[cmd] = Gate()
        return gate

    def _record(self, cmd: str) -> None:
        with self._lock:
            self.calls.append(cmd)
        gate = self.gates.get(cmd)
        if gate is not None:
            gate.entered.set()
            gate.release.wait(GATE_TIMEOUT)
        if cmd in self.failures:
            raise self.failures[cmd]

    def stop(self) -> None:
        self._record("stop")
        self.stopped.set()

    def suspend(self) -> None:
        self._record("suspend")

    def resume(self) -> None:
        self._record("resume")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "ctl.sock")


@pytest.fixture
def handler() -> FakeHandler:
    return FakeHandler()


@pytest.fixture
def server(path: str, handler: FakeHandler) -> Iterator[ControlServer]:
    srv = ControlServer(path, handler)
    yield srv
    srv.close()
