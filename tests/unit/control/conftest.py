"""Shared fixtures for the control-socket tests: a recording handler and a live server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.control.server import ControlServer


class FakeHandler:
    """Records the commands it gets; `failures` maps a command to the exception it raises."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.failures: dict[str, Exception] = {}
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def _record(self, cmd: str) -> None:
        with self._lock:
            self.calls.append(cmd)
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
