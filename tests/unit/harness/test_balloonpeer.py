"""The balloon check's host end against a stand-in for QEMU's QMP: sizes turned into the memory
the guest keeps and back, events skipped, errors named, and a balloon that never gets there
reported in time."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.harness import balloonpeer
from pyvmm.harness.balloonpeer import PeerError, QemuBalloon

MiB = 1 << 20
RAM = 512 * MiB


class FakeQmp:
    """QEMU's QMP as the peer uses it: the guest takes `lag` queries to reach a new size."""

    def __init__(self, path: str, lag: int = 2, stuck: bool = False) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.kept = RAM
        self.value = RAM
        self.lag = lag
        self.stuck = stuck
        self.requests: list[dict[str, object]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                request = json.loads(line)
                self.requests.append(request)
                f.write(b'{"event": "BALLOON_CHANGE", "data": {"actual": 1}}\n')  # noise
                answer = self._answer(request)
                f.write(json.dumps(answer).encode() + b"\n")
                f.flush()

    def _answer(self, request: dict[str, object]) -> dict[str, object]:
        command = request["execute"]
        if command == "balloon":
            arguments = request["arguments"]
            assert isinstance(arguments, dict)
            self.value = arguments["value"]
            return {"return": {}}
        if command == "query-balloon":
            if self.kept != self.value and not self.stuck:
                self.lag -= 1
                if self.lag <= 0:
                    self.kept = self.value
            return {"return": {"actual": self.kept}}
        if command == "qmp_capabilities":
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": f"{command}?"}}


@pytest.fixture
def qmp_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "qmp.sock")


def test_a_cycle_through_qmp_speaks_of_the_memory_the_guest_keeps(
    qmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(balloonpeer, "POLL_S", 0.01)
    qemu = FakeQmp(qmp_path)
    deadline = time.monotonic() + 30
    report = balloonpeer.cycle(QemuBalloon(qmp_path, RAM, deadline), 128, deadline)
    assert report["inflate_s"] > 0 and report["deflate_s"] > 0
    values = [r["arguments"]["value"] for r in qemu.requests if r["execute"] == "balloon"]
    assert values == [RAM - 128 * MiB, RAM]


def test_a_balloon_that_never_gets_there_is_an_error_in_time(
    qmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(balloonpeer, "POLL_S", 0.01)
    FakeQmp(qmp_path, stuck=True)
    deadline = time.monotonic() + 0.3
    with pytest.raises(PeerError, match=f"holds 0 bytes, not {64 * MiB}"):
        balloonpeer.resize(QemuBalloon(qmp_path, RAM, time.monotonic() + 5), 64 * MiB, deadline)


def test_done_leaves_the_sign_in_place(qmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balloonpeer, "POLL_S", 0.01)
    qemu = FakeQmp(qmp_path)
    deadline = time.monotonic() + 30
    balloonpeer.done(QemuBalloon(qmp_path, RAM, deadline), deadline)
    values = [r["arguments"]["value"] for r in qemu.requests if r["execute"] == "balloon"]
    assert values == [RAM - balloonpeer.DONE_MIB * MiB], "the guest watches for it to stay"
    assert qemu.requests[-1]["execute"] == "balloon", "nothing asked of a VM that may be gone"


def test_a_qmp_error_is_named(qmp_path: str) -> None:
    FakeQmp(qmp_path)
    balloon = QemuBalloon(qmp_path, RAM, time.monotonic() + 5)
    with pytest.raises(PeerError, match=r"QMP nonsense: .*CommandNotFound"):
        balloon._execute("nonsense")


def test_a_missing_qmp_socket_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(PeerError, match=f"QMP {path}"):
        QemuBalloon(path, RAM, time.monotonic() + 1)


class SlowDriver:
    """pyvmm's balloon whose guest driver answers the `answers_at`th request for statistics."""

    def __init__(self, answers_at: int) -> None:
        self.asked = 0
        self.answers_at = answers_at

    def stats(self, fresh: bool = True) -> dict[str, object]:
        self.asked += 1
        return {"actual": 0, "stats": {"free_memory": self.asked},
                "stats_fresh": self.asked >= self.answers_at}  # fmt: skip


def test_statistics_are_asked_for_again_until_the_driver_answers() -> None:
    balloon = SlowDriver(answers_at=3)
    now = balloonpeer.fresh_stats(balloon, time.monotonic() + 60)  # type: ignore[arg-type]
    assert (now["stats_fresh"], now["stats"], balloon.asked) == (True, {"free_memory": 3}, 3)
    never = SlowDriver(answers_at=10**9)
    stale = balloonpeer.fresh_stats(never, time.monotonic() - 1)  # type: ignore[arg-type]
    assert (stale["stats_fresh"], never.asked) == (False, 1)
