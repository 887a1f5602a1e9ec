"""The host side of the guest console: a raw-mode terminal and a thread that pumps stdin.

Raw mode is full raw (as `cfmakeraw`): no echo, no line editing, no signals from ^C/^Z/^\\, and
no output post-processing. The guest runs its own tty layer: it echoes, edits lines, turns ^C into
SIGINT for its foreground job and already sends "\\r\\n" for a newline, so the host must pass bytes
through untouched both ways. Stop the VM with the control socket or from inside the guest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


class RawTerminal:
    """Puts a terminal in raw mode and puts it back. `restore()` is idempotent and never raises,
    so signal handlers and atexit hooks may call it as well as the normal exit path."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    @property
    def active(self) -> bool:
        """Whether the terminal is in raw mode because of us."""
        return self._saved is not None

    def enter(self) -> None:
        """Switch to raw mode; does nothing if `fd` is not a terminal or raw mode is already on."""
        if self._saved is not None or not os.isatty(self.fd):
            return
        saved = termios.tcgetattr(self.fd)
        # TCSADRAIN: output already written is processed under the old settings.
        tty.setraw(self.fd, termios.TCSADRAIN)
        self._saved = saved

    def restore(self) -> None:
        """Restore the saved settings, if any are still to be restored."""
        # Take the saved attributes first, so a signal handler that calls us again meanwhile
        # finds nothing to do (and doing it twice would be harmless anyway).
        saved, self._saved = self._saved, None
        if saved is None:
            return
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError) as e:
            logger.warning("could not restore terminal settings on fd %d: %s", self.fd, e)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[RawTerminal]:
    """Raw mode on `fd` for the `with` block (nothing happens if `fd` is not a terminal).

    The settings are restored however the block exits; the yielded `RawTerminal.restore` may
    also be registered with atexit or called from a signal handler.
    """
    term = RawTerminal(fd)
    term.enter()
    try:
        yield term
    finally:
        term.restore()


class StdinPump:
    """A thread that reads `fd` and hands each chunk to `sink` (e.g. `Serial.queue_input`).

    It waits in poll() on `fd` and an eventfd, so `stop()` ends it promptly from any thread.
    It ends by itself at end of file, or after logging an error from the read or from `sink`;
    nothing is raised out of the thread. `fd` is not closed.
    """

    def __init__(self, fd: int, sink: Callable[[bytes], None], *, chunk_size: int = 4096) -> None:
        self.fd = fd
        self._sink = sink
        self._chunk_size = chunk_size
        # The lock keeps stop() from writing to the eventfd after the thread closed it.
        self._lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="stdin-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end and wait for it (up to `timeout` seconds)."""
        with self._lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        elif not self._thread.is_alive() and self._thread.ident is None:
            self._close()  # never started

    def _close(self) -> None:
        with self._lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1

    def _run(self) -> None:
        try:
            self._pump()
        except Exception:
            logger.exception("stdin pump failed; console input stops")
        finally:
            self._close()

    def _pump(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self._wake_fd:
                    return
                if events & select.POLLNVAL:
                    raise OSError(f"fd {fd} is not open")
            try:
                data = os.read(self.fd, self._chunk_size)
            except BlockingIOError:
                continue  # a non-blocking fd that poll() called readable too early
            if not data:
                logger.debug("end of input on fd %d", self.fd)
                return
            self._sink(data)
