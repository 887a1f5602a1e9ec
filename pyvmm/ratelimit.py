"""Log messages a guest can cause, rate-limited per source (a device) and kind.

A guest can make a device complain as often as it likes (an invalid register value, a bad
request) so such messages go through a `GuestLog`: a few of each kind per interval reach the
log, the rest are counted, and the count is logged with the next message of that kind that
gets through, or by `flush()` when the VM ends.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

# Messages of one kind logged per interval before the rest are only counted.
BURST = 5
INTERVAL_S = 60.0

_all_logs: weakref.WeakSet[GuestLog] = weakref.WeakSet()


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class GuestLog:
    """Rate-limited logging for one source (`name` starts every message)."""

    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        burst: int = BURST,
        interval: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.name = name
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, str], _Window] = {}
        _all_logs.add(self)

    def warning(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.ERROR, kind, message, *args)

    def info(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.INFO, kind, message, *args)

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log `message % args` unless this kind is over its burst for the current interval."""
        if not self._logger.isEnabledFor(level):
            return
        now = self._clock()
        with self._lock:
            window = self._windows.get((level, kind))
            if window is None or now - window.start >= self._interval:
                suppressed = window.suppressed if window else 0
                window = self._windows[(level, kind)] = _Window(now)
            else:
                suppressed = 0
            if window.logged >= self._burst:
                window.suppressed += 1
                return
            window.logged += 1
        text = message % args if args else message
        if suppressed:
            text += f" ({suppressed} more like this were not logged)"
        self._logger.log(level, "%s: %s", self.name, text)

    def flush(self) -> None:
        """Log how many messages of each kind were held back and not yet reported."""
        with self._lock:
            held = [(level, kind, w.suppressed) for (level, kind), w in self._windows.items()]
            self._windows.clear()
        for level, kind, count in held:
            if count:
                self._logger.log(
                    level, "%s: %d more %s messages were not logged", self.name, count, kind
                )


def flush_all() -> None:
    """`flush()` every GuestLog that exists (when the VM ends)."""
    for guest_log in list(_all_logs):
        guest_log.flush()
