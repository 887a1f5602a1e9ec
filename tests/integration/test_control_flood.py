"""The control socket of a running VM stays usable while many idle connections are held."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import needs_kvm
from tests.integration.test_virtio_probe import SpinningVm, ctl
from tests.unit.control.conftest import connect

pytestmark = needs_kvm

HELD = 200
CONNECT_TIMEOUT = 10.0


@pytest.fixture
def flooded(probe_elf: Path, tmp_path: Path) -> Iterator[SpinningVm]:
    """A spinning VM with HELD idle connections open on its control socket."""
    vm = SpinningVm(probe_elf, tmp_path / "ctl.sock")
    held: list[socket.socket] = []
    try:
        vm.wait_for_spins(2)
        held.extend(connect(vm.sock) for _ in range(HELD))
        yield vm
    finally:
        for sock in held:
            sock.close()
        vm.close()


def test_stop_works_while_idle_connections_are_held(flooded: SpinningVm) -> None:
    r = ctl(flooded.sock, "stop")
    assert (r.returncode, r.stderr) == (0, "")
    assert flooded.proc.wait(timeout=20) == 0
    assert not flooded.sock.exists()


def test_suspend_and_resume_work_while_idle_connections_are_held(flooded: SpinningVm) -> None:
    r = ctl(flooded.sock, "suspend")
    assert (r.returncode, r.stderr) == (0, "")
    r = ctl(flooded.sock, "resume")
    assert (r.returncode, r.stderr) == (0, "")
    flooded.wait_for_spins(flooded.spins() + 2)
    r = ctl(flooded.sock, "stop")
    assert (r.returncode, r.stderr) == (0, "")
    assert flooded.proc.wait(timeout=20) == 0
