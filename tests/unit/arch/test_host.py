"""The architecture is chosen in one place, from the host's machine name."""

from __future__ import annotations

import os

import pytest

from pyvmm.arch import host
from pyvmm.arch.aarch64.machine import Aarch64
from pyvmm.arch.x86_64.machine import X86_64

REAL = os.uname()


def _uname(machine: str) -> os.uname_result:
    return os.uname_result((REAL.sysname, REAL.nodename, REAL.release, REAL.version, machine))


@pytest.mark.parametrize(("machine", "kind"), [("x86_64", X86_64), ("aarch64", Aarch64)])
def test_the_host_machine_picks_the_arch(
    monkeypatch: pytest.MonkeyPatch, machine: str, kind: type
) -> None:
    monkeypatch.setattr(host.os, "uname", lambda: _uname(machine))
    assert isinstance(host.host_arch(), kind)


def test_another_machine_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "uname", lambda: _uname("riscv64"))
    with pytest.raises(host.UnsupportedArchError, match="riscv64"):
        host.host_arch()
