"""Every way `pyvmm run` can be told to stop leaves the terminal as it was and removes the
control socket; a stop signal at any moment is one line on stderr and status 128 + signal."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, needs_kvm


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} within {timeout} s; output so far: {seen[-500:]!r}"
        if select.select([fd], [], [], remaining)[0]:
            seen += os.read(fd, 4096)
    return seen


@needs_kvm
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_restores_the_terminal_and_removes_the_socket(
    probe_elf: Path, tmp_path: Path, signum: int
) -> None:
    master, slave = os.openpty()
    sock = tmp_path / "vm.sock"
    try:
        before = termios.tcgetattr(slave)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvmm",
                "run",
                "-s",
                str(sock),
                "-p",
                "probe=spin",
                *[str(probe_elf)],
            ],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,  # the pty is not our terminal: no stray SIGHUP for us
        )
        try:
            _read_until(master, b"PROBE spin", timeout=30)
            assert termios.tcgetattr(slave) != before, "the guest console is not in raw mode"
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        name = signal.Signals(signum).name
        assert (proc.returncode, stderr.decode()) == (128 + signum, f"pyvmm: stopped by {name}\n")
        assert termios.tcgetattr(slave) == before
        assert not sock.exists()
    finally:
        os.close(master)
        os.close(slave)


# Sends a signal to this very process when pyvmm starts importing `module`, then runs pyvmm's
# entry point as the `pyvmm` script does: a stop signal at a chosen moment of the start-up.
_SIGNAL_DURING_IMPORT = """
import os, signal, sys
from importlib.abc import MetaPathFinder

# As an interactive shell starts it: a background job of a script inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

module, signum = sys.argv[1], int(sys.argv[2])
sys.argv[1:3] = []

class Trip(MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signum)
        return None

sys.meta_path.insert(0, Trip())
from pyvmm.__main__ import main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("module", "signum", "status", "message"),
    [
        # While the CLI itself is imported: before pyvmm installs any handler of its own.
        ("pyvmm.kvm", signal.SIGINT, 130, "pyvmm: interrupted"),
        ("pyvmm.config", signal.SIGINT, 130, "pyvmm: interrupted"),
        # While `run` builds the VM: its handlers are installed, nothing is running yet.
        ("pyvmm.vmm", signal.SIGHUP, 129, "pyvmm: stopped by SIGHUP"),
        ("pyvmm.vmm", signal.SIGINT, 130, "pyvmm: stopped by SIGINT"),
        ("pyvmm.vmm", signal.SIGTERM, 143, "pyvmm: stopped by SIGTERM"),
    ],
)
def test_a_stop_signal_during_start_up_is_one_line(
    tmp_path: Path, module: str, signum: int, status: int, message: str
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(100))  # never loaded: the signal comes first
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _SIGNAL_DURING_IMPORT,
            module,
            str(int(signum)),
            "run",
            *[str(kernel)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert (r.returncode, r.stderr) == (status, message + "\n")
