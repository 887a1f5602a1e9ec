"""A stop signal while `pyvmm run` builds the VM: the VM is closed once built, nothing left."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmm import cli, vmm


@pytest.fixture(autouse=True)
def _handlers_restored() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in cli.STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class _SignalledWhileBuilt:
    """A Vmm that gets SIGTERM halfway through its building, after it made a file."""

    made: Path
    closed = False
    ran = False

    def __init__(self, config: Any, **kw: Any) -> None:
        self.made.touch()  # a socket, say
        os.kill(os.getpid(), signal.SIGTERM)
        self.recorded = self.made  # what close() removes: only now known

    def run(self) -> None:
        _SignalledWhileBuilt.ran = True

    def close(self) -> None:
        _SignalledWhileBuilt.closed = True
        self.recorded.unlink()


def test_a_stop_signal_while_the_vm_is_built_closes_it_once_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(100))
    _SignalledWhileBuilt.made = tmp_path / "made.sock"
    monkeypatch.setattr(vmm, "Vmm", _SignalledWhileBuilt)
    monkeypatch.setattr(sys, "stdin", None)
    args = cli.build_parser().parse_args(["run", "--disable-sandbox", str(kernel)])
    with (tmp_path / "console").open("w") as console, pytest.raises(cli.StoppedBySignal) as stopped:
        monkeypatch.setattr(sys, "stdout", console)
        cli.cmd_run(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _SignalledWhileBuilt.closed and not _SignalledWhileBuilt.ran
    assert not _SignalledWhileBuilt.made.exists()
