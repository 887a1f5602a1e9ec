"""Crosvm's low-memory balloon policy: take memory back from the guest while the host is short.

`LowMemoryPolicy` decides the balloon size; it owns no thread and no device. The VMM runs it
with `run_policy` in a thread of its own and forwards each new size to the balloon device. The
host's memory state comes from a `MemorySource` (`pick_source` chooses one).

Sizes. The largest balloon is the guest's memory minus 1 GiB when the guest has more than
1.5 GiB, half of it when the guest has at least 500 MiB, else 0 (and the policy then does
nothing). The increment is 1/16 of the largest balloon. Both are whole 4 KiB pages: the maximum
is rounded down and the increment up, so 16 steps still go exactly from 0 to the maximum and
back (the balloon device works in 4 KiB pages).

Timeline, with the default `PolicyTimes`:
- The source is sampled every second while no timer is due.
- A low sample grows the balloon by one increment at once (never past the maximum) and
  restarts two timers: the low-memory re-check after 1 s + up to 1/16 s (low samples before it
  are ignored) and the "no longer low" check after 60 s + up to 1.5 s, then every 30 s + up to
  1.5 s, each of which shrinks the balloon by one increment if memory is not low then.
- Under constant pressure the first increment comes with the first low sample and the 16th
  (the maximum) 15 re-checks later, within 15 * (1 + 1/16) = 15.94 s, inside 16 s.
- Once memory is plentiful the 16th decrement comes at most 60 + 15 * 30 + 16 * 1.5 = 534 s
  after the last growth, inside 9 minutes. The 9 minutes leave 30 s for 16 jitters, so the
  leave jitter must stay under 30 / 16 = 1.875 s; 1.5 s keeps room for a late thread.

Where this differs from crosvm (`run_control` in src/linux.rs, commit bae7078a8 of 2018, with
d5f6608f3 for several margins; crosvm replaced this policy in 2019, 0bf8a5590):
- crosvm waits on the Chrome OS kernel's /dev/chromeos-low-mem event and stops waiting on it
  until the re-check. Generic hosts have no such event, so the source is sampled; low
  samples inside the re-check window are ignored. Without Chrome OS crosvm had no policy at
  all; here MemAvailable in /proc/meminfo stands in.
- crosvm shrinks only when available memory is at least the margin plus two increments (a
  hysteresis); here the balloon shrinks whenever the source says memory is not low.
- crosvm's thresholds are at least 1.5 GiB (not more than) and at least 512 MiB (its
  `ONE_GB / 2`, though its comment says 500 MB); these follow the 500 MiB / more than 1.5 GiB of
  the policy's description. Both rules jump at the 1.5 GiB boundary.
- crosvm draws 0-199 ms of jitter for the re-check, 0-11 s for the first "no longer low" check
  and 0-5 s once for the whole interval that follows, so its worst fall takes 71 + 15 * 35 =
  596 s, not the 9 minutes its commit message promises, and its worst rise 15 * 1.199 = 18 s.
  Here every check draws its own jitter, bounded as above.
- crosvm does not round the increment to pages (its balloon device truncates bytes to pages).
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30
STEPS_TO_MAX = 16

CHROMEOS_LOW_MEM_DIR = Path("/sys/kernel/mm/chromeos-low_mem")
PROC_MEMINFO = Path("/proc/meminfo")

# Margin for MemAvailable when none is given. Chrome OS sets its critical margin to 5.2% of RAM
# (platform2 init/swap.sh), about 200 MiB on the 4 GiB machines this policy was written for;
# MemAvailable also counts file cache that Chrome OS's figure holds back (min_filelist_kbytes,
# about 100 MB), so a little more is allowed. On a large host pass a larger margin.
DEFAULT_LOW_MEM_MARGIN_MIB = 256

_WHOLE_NUMBER = re.compile(r"[0-9]+")


class MemorySourceError(Exception):
    """The host's memory state could not be read from `path`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read the host's memory state from {path}: {reason}")
        self.path = path


class MemorySource(Protocol):
    def is_low(self) -> bool:
        """Whether the host is low on memory now; raises MemorySourceError."""
        ...

    def describe(self) -> str:
        """One line saying what is read and what counts as low, for the log."""
        ...


class ChromeOsLowMemSource:
    """Chrome OS's own test: `available` below the first (critical) value in `margin`.

    Both files are in MiB. `margin` lists the margins from the most critical up; the Chrome OS
    kernel signals low memory below the first one, as crosvm read it. A `margin_mib` given here
    replaces the file's margin.
    """

    def __init__(
        self, directory: Path = CHROMEOS_LOW_MEM_DIR, margin_mib: int | None = None
    ) -> None:
        if margin_mib is not None and margin_mib < 0:
            raise ValueError(f"low-memory margin must be at least 0 MiB, not {margin_mib}")
        self.directory = directory
        self.margin_mib = margin_mib

    def available_bytes(self) -> int:
        path = self.directory / "available"
        values = _read_mib_values(path)
        if len(values) != 1:
            raise MemorySourceError(path, f"expected one number of MiB, found {len(values)}")
        return values[0] * MIB

    def margin_bytes(self) -> int:
        if self.margin_mib is not None:
            return self.margin_mib * MIB
        return _read_mib_values(self.directory / "margin")[0] * MIB

    def is_low(self) -> bool:
        return self.available_bytes() < self.margin_bytes()

    def describe(self) -> str:
        if self.margin_mib is None:
            margin = f"the first margin in {self.directory / 'margin'}"
        else:
            margin = f"{self.margin_mib} MiB"
        return f"{self.directory / 'available'} below {margin}"


class MemAvailableSource:
    """MemAvailable in /proc/meminfo (Linux 3.14 and later) below a margin given in MiB."""

    def __init__(
        self, margin_mib: int = DEFAULT_LOW_MEM_MARGIN_MIB, meminfo: Path = PROC_MEMINFO
    ) -> None:
        if margin_mib < 0:
            raise ValueError(f"low-memory margin must be at least 0 MiB, not {margin_mib}")
        self.margin_mib = margin_mib
        self.meminfo = meminfo

    def available_bytes(self) -> int:
        for line in _read_text(self.meminfo).splitlines():
            name, _, value = line.partition(":")
            if name != "MemAvailable":
                continue
            fields = value.split()
            if len(fields) == 2 and _WHOLE_NUMBER.fullmatch(fields[0]) and fields[1] == "kB":
                return int(fields[0]) * 1024
            raise MemorySourceError(self.meminfo, f"garbled line {_excerpt(line)}")
        raise MemorySourceError(self.meminfo, "no MemAvailable line (Linux older than 3.14?)")

    def margin_bytes(self) -> int:
        return self.margin_mib * MIB

    def is_low(self) -> bool:
        return self.available_bytes() < self.margin_bytes()

    def describe(self) -> str:
        return f"MemAvailable in {self.meminfo} below {self.margin_mib} MiB"


def pick_source(
    margin_mib: int | None = None,
    *,
    chromeos_dir: Path = CHROMEOS_LOW_MEM_DIR,
    meminfo: Path = PROC_MEMINFO,
) -> MemorySource:
    """Chrome OS's low-memory files where the kernel has them, else MemAvailable.

    The source is read once here, so a missing or garbled file is reported when the VM starts
    rather than later from the policy's thread. `margin_mib` (None: the source's own margin)
    applies to either source.
    """
    source: MemorySource
    if chromeos_dir.is_dir():
        source = ChromeOsLowMemSource(chromeos_dir, margin_mib)
    elif margin_mib is None:
        source = MemAvailableSource(DEFAULT_LOW_MEM_MARGIN_MIB, meminfo)
    else:
        source = MemAvailableSource(margin_mib, meminfo)
    source.is_low()
    return source


@dataclass(frozen=True)
class PolicyTimes:
    """The policy's timer lengths and jitter bounds, in seconds.

    Only tests should change them: the defaults are what keeps the rise within 16 s and the fall
    within 9 minutes (see the module docstring).
    """

    recheck_s: float = 1.0
    recheck_jitter_s: float = 1 / 16
    leave_first_s: float = 60.0
    leave_every_s: float = 30.0
    leave_jitter_s: float = 1.5
    # How often the source is read while no timer is due. Crosvm's later policy polled memory
    # once a second too; a read costs microseconds.
    sample_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("recheck_s", "leave_first_s", "leave_every_s", "sample_s"):
            value = getattr(self, name)
            if not (0 < value < math.inf):
                raise ValueError(f"PolicyTimes.{name} must be a positive time, not {value}")
        for name in ("recheck_jitter_s", "leave_jitter_s"):
            value = getattr(self, name)
            if not (0 <= value < math.inf):
                raise ValueError(f"PolicyTimes.{name} must be at least 0, not {value}")


def random_jitter(bound: float) -> float:
    return random.uniform(0.0, bound)


def max_balloon_bytes(guest_bytes: int) -> int:
    """The largest balloon the policy inflates in a guest of `guest_bytes`, in whole pages."""
    if guest_bytes < 0:
        raise ValueError(f"guest memory size must be at least 0 bytes, not {guest_bytes}")
    if guest_bytes > GIB * 3 // 2:
        largest = guest_bytes - GIB
    elif guest_bytes >= 500 * MIB:
        largest = guest_bytes // 2
    else:
        largest = 0
    return largest // PAGE_SIZE * PAGE_SIZE


def balloon_increment_bytes(max_bytes: int) -> int:
    """1/16 of `max_bytes`, rounded up to a whole page so that 16 steps reach it."""
    max_pages = max_bytes // PAGE_SIZE
    return -(-max_pages // STEPS_TO_MAX) * PAGE_SIZE


class LowMemoryPolicy:
    """The balloon size for a guest of `guest_bytes` as the host's memory comes and goes.

    Call `step()` at (or after) `next_wakeup()`, both in `clock` time; `jitter(bound)` returns
    a delay in [0, bound] that spreads the timers of several VMs apart.
    """

    def __init__(
        self,
        guest_bytes: int,
        source: MemorySource,
        *,
        times: PolicyTimes = PolicyTimes(),
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float], float] = random_jitter,
    ) -> None:
        self.max_bytes = max_balloon_bytes(guest_bytes)
        self.increment = balloon_increment_bytes(self.max_bytes)
        self.source = source
        self.times = times
        self.clock = clock
        self._jitter = jitter
        self._target = 0
        # The next read that may find memory low; the first step reads the source at once.
        self._low_check_at = clock()
        self._leave_check_at: float | None = None

    @property
    def target(self) -> int:
        """The balloon size, in bytes, the device should be asked for."""
        return self._target

    def next_wakeup(self) -> float:
        """The `clock` time at which `step()` should next be called (inf: never)."""
        if self.max_bytes == 0:
            return math.inf
        if self._leave_check_at is None:
            return self._low_check_at
        return min(self._low_check_at, self._leave_check_at)

    def step(self) -> int | None:
        """Run the checks due at `clock()`; the new target if it changed, else None.

        Raises MemorySourceError when the source cannot be read.
        """
        if self.max_bytes == 0:
            return None
        now = self.clock()
        low_check_due = now >= self._low_check_at
        leave_check_due = self._leave_check_at is not None and now >= self._leave_check_at
        if not (low_check_due or leave_check_due):
            return None
        before = self._target
        if self.source.is_low():
            if low_check_due:
                self._grow(now)
            else:
                # Still low, but inside the re-check window: neither grow nor shrink.
                self._leave_check_at = now + self._delay(
                    self.times.leave_every_s, self.times.leave_jitter_s
                )
        else:
            if low_check_due:
                self._low_check_at = now + self.times.sample_s
            if leave_check_due:
                self._shrink(now)
        return self._target if self._target != before else None

    def _grow(self, now: float) -> None:
        self._target = min(self._target + self.increment, self.max_bytes)
        self._low_check_at = now + self._delay(self.times.recheck_s, self.times.recheck_jitter_s)
        self._leave_check_at = now + self._delay(
            self.times.leave_first_s, self.times.leave_jitter_s
        )

    def _shrink(self, now: float) -> None:
        self._target = max(self._target - self.increment, 0)
        if self._target == 0:
            self._leave_check_at = None
        else:
            self._leave_check_at = now + self._delay(
                self.times.leave_every_s, self.times.leave_jitter_s
            )

    def _delay(self, base: float, jitter_bound: float) -> float:
        jitter = self._jitter(jitter_bound)
        if not (0.0 <= jitter <= jitter_bound):
            raise ValueError(f"jitter {jitter} s is outside [0, {jitter_bound}] s")
        return base + jitter


def run_policy(
    policy: LowMemoryPolicy,
    set_target: Callable[[int], None],
    stop: threading.Event,
    wait: Callable[[float | None], bool] | None = None,
) -> None:
    """Step `policy` at each of its wakeups and pass every new target to `set_target`.

    Returns once `stop` is set. `wait(timeout)` (default `stop.wait`, which measures time as
    `time.monotonic` does) waits up to `timeout` seconds, or for ever when it is None, and
    returns True when `stop` is set. Exceptions from the source or `set_target` end the loop.
    """
    wait_for_stop = stop.wait if wait is None else wait
    while not wait_for_stop(_seconds_until_wakeup(policy)):
        new_target = policy.step()
        if new_target is not None:
            set_target(new_target)


def _seconds_until_wakeup(policy: LowMemoryPolicy) -> float | None:
    wakeup = policy.next_wakeup()
    if math.isinf(wakeup):
        return None
    return max(0.0, wakeup - policy.clock())


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MemorySourceError(path, error.strerror or str(error)) from error
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as error:
        raise MemorySourceError(path, f"not ASCII text: {_excerpt(data)}") from error


def _read_mib_values(path: Path) -> list[int]:
    text = _read_text(path)
    fields = text.split()
    if not fields:
        raise MemorySourceError(path, "the file is empty")
    if not all(_WHOLE_NUMBER.fullmatch(field) for field in fields):
        raise MemorySourceError(path, f"expected whole numbers of MiB, found {_excerpt(text)}")
    return [int(field) for field in fields]


def _excerpt(content: str | bytes, limit: int = 40) -> str:
    """`content` quoted on one line, shortened to `limit` characters."""
    return repr(content[:limit]) + ("..." if len(content) > limit else "")
