"""The VMM's side of the device zygote (`zygote.py`): start it, send it device specs, and hold
each device process it forks as a child of the VMM's own.

`DeviceSpawner()` starts the zygote at once and returns: its interpreter imports while the VMM
goes on building. `spawn()` sends a request and returns a `DeviceProcess` without waiting; the
process's pid is read from the zygote's answer when first needed (answers come in request
order). `close()` takes the answers still due and ends the zygote. While a spawner is open the
VMM is a child subreaper, so each device process, whose own parent ends at once, becomes its
child: `DeviceProcess` waits for it and kills it through a pidfd, as `subprocess.Popen` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from typing import Any

from pyvmm.devices.child import DeviceSpec
from pyvmm.sandbox.jail import JailError, adopt_orphans

ANSWER_TIMEOUT_S = 180.0  # the zygote's imports: 0.2 s on a KVM host, up to a minute emulated
MAX_ANSWER = 4096
CLOSE_TIMEOUT_S = 5.0

_adopting = 0  # open spawners in this process: it is a subreaper while there are any
_adopting_lock = threading.Lock()


class SpawnError(Exception):
    """The zygote could not be started, or could not fork a device process; one line."""


class DeviceProcess:
    """A device process forked by the zygote, a child of this process once it is answered for.
    The part of `subprocess.Popen` that the proxy uses: pid, poll, wait, kill, returncode."""

    def __init__(self, spawner: DeviceSpawner, name: str) -> None:
        self._spawner = spawner
        self.name = name
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._waiters = 0  # threads waiting on the pidfd: it stays open while there are any
        self.error: str | None = None  # why there is no process, once the zygote said so
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _answered(self, answer: dict[str, Any]) -> None:
        pid = answer.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            self.error = str(answer.get("error", f"no pid in the zygote's answer {answer}"))
            return
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as exc:
            self.error = f"device process {pid}: {exc.strerror or exc}"
            return
        self._pid = pid

    @property
    def pid(self) -> int:
        """The process's pid; 0 if it never started (`error` says why)."""
        self._spawner.await_answer(self)
        return self._pid or 0

    def poll(self) -> int | None:
        """Its exit code (negative: the signal that killed it) if it has ended, else None."""
        self._ended(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end (a `subprocess.TimeoutExpired` after `timeout` seconds)."""
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(f"device process {self.name}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self._spawner.await_answer(self)
        with self._lock:
            if self._pidfd is not None and self.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # ended, not yet reaped
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _ended(self, timeout: float | None) -> bool:
        self._spawner.await_answer(self)
        with self._lock:
            if self.returncode is not None:
                return True
            if self._pidfd is None:  # never started (`error` says why)
                self.returncode = 1
                return True
            pidfd = self._pidfd
            self._waiters += 1
        ready = False
        try:
            # poll, not select: select refuses fds above 1023, and a process may hold more.
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            ready = bool(poller.poll(None if timeout is None else timeout * 1000))
        finally:
            with self._lock:
                self._waiters -= 1
                if ready:
                    self._reap()
                self._release()
        return self.returncode is not None

    def _reap(self) -> None:
        """Called with the lock held, once the pidfd says the process has ended."""
        if self.returncode is not None or self._pid is None:
            return
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:  # not adopted after all: it ended without serving
            self.returncode = 1
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def _release(self) -> None:
        """Called with the lock held: close the pidfd once it has nothing more to say."""
        if self.returncode is not None and not self._waiters and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class DeviceSpawner:
    """The zygote and the requests it has not answered yet."""

    def __init__(self) -> None:
        _adopt(True)
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._zygote = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyvmm.devices.zygote",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                close_fds=True,
            )
        except OSError as exc:
            self._sock.close()
            _adopt(False)
            raise SpawnError(f"cannot start the device zygote: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        self._lock = threading.Lock()
        self._pending: deque[DeviceProcess] = deque()
        self._closed = False
        self._gone: str | None = None  # why no more answers will come

    def spawn(self, spec: DeviceSpec) -> DeviceProcess:
        """Ask for the device process `spec` describes; the fds it names go along (the caller
        may close its copies at once)."""
        process = DeviceProcess(self, spec.name)
        with self._lock:
            if self._closed:
                raise SpawnError("the device zygote is closed")
            try:
                socket.send_fds(self._sock, [spec.to_json().encode()], spec.fds())
            except (BrokenPipeError, ConnectionResetError):
                raise SpawnError(f"the device zygote ended ({_how(self._zygote)})") from None
            except OSError as exc:
                raise SpawnError(f"the device zygote: {exc.strerror or exc}") from None
            self._pending.append(process)
        return process

    def await_answer(self, process: DeviceProcess) -> None:
        """Read the zygote's answers up to `process`'s (at once if it is in)."""
        with self._lock:
            while process in self._pending:
                self._answer_next()

    def close(self) -> None:
        """Take the answers still due, then end the zygote (bounded); once is enough."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._pending:
                self._answer_next()
            self._sock.close()
        try:
            self._zygote.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._zygote.kill()
            self._zygote.wait()
        _adopt(False)

    def _answer_next(self) -> None:
        """Called with the lock held: the next answer, to the oldest request."""
        process = self._pending.popleft()
        if self._gone is None:
            try:
                self._sock.settimeout(ANSWER_TIMEOUT_S)
                data = self._sock.recv(MAX_ANSWER)
            except TimeoutError:
                self._gone = f"the device zygote did not answer within {ANSWER_TIMEOUT_S:g} s"
                self._zygote.kill()
            except ConnectionResetError:  # it died with requests unread
                self._gone = f"the device zygote ended ({_how(self._zygote)})"
            except OSError as exc:
                self._gone = f"the device zygote: {exc.strerror or exc}"
            else:
                if data:
                    try:
                        answer = json.loads(data)
                    except ValueError:
                        answer = {"error": f"the device zygote answered {data[:80]!r}"}
                    process._answered(answer)
                    return
                self._gone = f"the device zygote ended ({_how(self._zygote)})"
        process.error = self._gone


def _how(zygote: subprocess.Popen[bytes]) -> str:
    try:
        code = zygote.wait(CLOSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"status {code}"


def _adopt(on: bool) -> None:
    """Count this process's open spawners: it adopts orphans while there are any."""
    global _adopting
    with _adopting_lock:
        if on and _adopting == 0:
            try:
                adopt_orphans(True)
            except JailError as exc:
                raise SpawnError(str(exc)) from None
        _adopting += 1 if on else -1
        if not on and _adopting == 0:
            with contextlib.suppress(JailError):
                adopt_orphans(False)
