"""A device process reports an exception nothing caught without reading any source file (its
seccomp policy kills it for the open() Python's own traceback printer makes), and a file it
opens in the jail is an exception that says where, not a kill."""

from __future__ import annotations

import linecache
import subprocess
import sys
import threading

import pytest

from pyvmm.devices import child
from pyvmm.devices.wire import Op, WireError


def _fail_deep() -> None:
    def inner() -> None:
        raise ValueError("the ring's index 70000 is past its size 256")

    try:
        {}["missing"]
    except KeyError:
        inner()


def _no_source(*args: object, **kwargs: object) -> list[str]:
    raise AssertionError("source lines were read")


def test_an_exception_is_reported_with_its_frames_and_no_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linecache, "getlines", _no_source)
    monkeypatch.setattr(linecache, "updatecache", _no_source)
    try:
        _fail_deep()
    except ValueError as exc:
        child._report_exception("vda", "serving", exc)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "pyvmm: virtio vda: serving: ValueError: the ring's index 70000 is past its size 256"
    )
    assert any(
        line.endswith(" in _fail_deep") and "test_child_errors.py:" in line for line in lines
    )
    assert lines[-2].endswith(" in inner")
    assert lines[-1] == "  after KeyError: 'missing'"


def test_uncaught_exceptions_in_threads_are_reported_the_same_way(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    child._report_uncaught("rng")
    worker = threading.Thread(target=_fail_deep, name="rng-queue")
    worker.start()
    worker.join()
    err = capsys.readouterr().err
    assert err.startswith("pyvmm: virtio rng: thread rng-queue: ValueError: the ring's index")


class _GoneVmm:
    """A channel to a VMM that asks once and is gone before the answer."""

    def __init__(self) -> None:
        self.asked = False

    def recv(self) -> tuple[Op, bytes, list[int]]:
        if self.asked:
            raise AssertionError("asked again after the VMM was gone")
        self.asked = True
        return Op.BAR_READ, b"", []

    def send(self, op: Op, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        if op is not Op.REPLY or payload:  # the first answer (start-up) goes through
            raise WireError(f"send {op.name}: Broken pipe")


def test_a_vmm_gone_before_the_answer_ends_the_process_quietly() -> None:
    server = child.DeviceServer.__new__(child.DeviceServer)
    server.channel = _GoneVmm()  # type: ignore[assignment]
    server.handle = lambda op, payload: b"\x01\x02\x03\x04"  # type: ignore[method-assign]
    server.serve()  # returns: no exception, so no traceback at the VM's end
    assert server.channel.asked  # type: ignore[attr-defined]


def test_a_file_opened_in_the_jail_is_an_exception_with_its_frames() -> None:
    # In a process of its own: an audit hook cannot be taken back.
    script = """
import gc
from pyvmm.devices import child
child._report_uncaught("vsock")
child._refuse_files("vsock")
def read_config():
    with open("/etc/hostname") as f:
        return f.read()
try:
    read_config()
except child.JailedOpenError as e:
    print("raised:", e)
class Leaky:
    def __del__(self):
        read_config()
Leaky()
gc.collect()
print("still here")
try:
    import csv
except child.JailedOpenError as e:
    print("import refused")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "raised: the jail refuses open '/etc/hostname'",
        "still here",
        "import refused",
    ]
    err = proc.stderr.splitlines()
    assert "pyvmm: virtio vsock: imports csv in the jail" in err
    assert err[0] == "pyvmm: virtio vsock: the jail refuses open '/etc/hostname'"
    assert any(line.endswith(" in read_config") for line in err), err
    assert (
        "pyvmm: virtio vsock: unraisable (in a finalizer): JailedOpenError: the jail refuses "
        "open '/etc/hostname'" in err
    ), err
