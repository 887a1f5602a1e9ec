"""Crosvm's low-memory balloon policy on a simulated clock, and the sources it reads."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.balloon_policy import (
    DEFAULT_LOW_MEM_MARGIN_MIB,
    GIB,
    MIB,
    PAGE_SIZE,
    ChromeOsLowMemSource,
    LowMemoryPolicy,
    MemAvailableSource,
    MemorySourceError,
    PolicyTimes,
    max_balloon_bytes,
    pick_source,
    random_jitter,
    run_policy,
)

START = 1000.0
NINE_MINUTES = 540.0
DEFAULTS = PolicyTimes()


class Clock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Pressure:
    """A memory source that is low while `low` is set; counts its reads."""

    def __init__(self, low: bool = False) -> None:
        self.low = low
        self.reads = 0

    def is_low(self) -> bool:
        self.reads += 1
        return self.low

    def describe(self) -> str:
        return "test pressure"


def no_jitter(bound: float) -> float:
    return 0.0


def full_jitter(bound: float) -> float:
    return bound


def make_policy(
    guest_bytes: int = 8 * GIB,
    jitter: Callable[[float], float] = no_jitter,
    times: PolicyTimes = DEFAULTS,
) -> tuple[LowMemoryPolicy, Clock, Pressure]:
    clock = Clock()
    pressure = Pressure()
    policy = LowMemoryPolicy(guest_bytes, pressure, times=times, clock=clock, jitter=jitter)
    return policy, clock, pressure


def run_until(
    policy: LowMemoryPolicy,
    clock: Clock,
    end: float,
    pressure_at: Callable[[float], bool] | None = None,
    pressure: Pressure | None = None,
) -> list[tuple[float, int]]:
    """Step at every wakeup up to `end`; the (time, target) of every change."""
    changes = []
    while policy.next_wakeup() <= end:
        clock.t = policy.next_wakeup()
        if pressure_at is not None and pressure is not None:
            pressure.low = pressure_at(clock.t)
        new_target = policy.step()
        if new_target is not None:
            assert new_target == policy.target
            changes.append((clock.t, new_target))
    clock.t = end
    return changes


def grow_to_max(policy: LowMemoryPolicy, clock: Clock, pressure: Pressure) -> list[float]:
    """Step under pressure until the balloon is full, then lift it; the times of the growths."""
    pressure.low = True
    growths = []
    while policy.target < policy.max_bytes:
        clock.t = policy.next_wakeup()
        if policy.step() is not None:
            growths.append(clock.t)
    pressure.low = False
    return growths


# Sizes


@pytest.mark.parametrize(
    ("guest_bytes", "max_bytes", "increment"),
    [
        (499 * MIB, 0, 0),
        (500 * MIB, 250 * MIB, 250 * MIB // 16),
        (3 * GIB // 2, 768 * MIB, 48 * MIB),
        (3 * GIB // 2 + MIB, 513 * MIB, 513 * MIB // 16),
        (8 * GIB, 7 * GIB, 448 * MIB),
    ],
)
def test_max_and_increment_at_the_boundaries(
    guest_bytes: int, max_bytes: int, increment: int
) -> None:
    assert max_balloon_bytes(guest_bytes) == max_bytes
    policy, _, _ = make_policy(guest_bytes)
    assert (policy.max_bytes, policy.increment) == (max_bytes, increment)
    assert policy.increment % PAGE_SIZE == 0


def test_odd_sizes_round_to_pages_and_still_take_16_steps() -> None:
    # 17 pages and a few bytes over 1 GiB of balloon: 1/16 of it is not a whole page.
    guest_bytes = 2 * GIB + 17 * PAGE_SIZE + 100
    policy, _, _ = make_policy(guest_bytes)
    assert policy.max_bytes == GIB + 17 * PAGE_SIZE
    assert policy.increment % PAGE_SIZE == 0
    assert 15 * policy.increment < policy.max_bytes <= 16 * policy.increment


def test_negative_guest_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 0 bytes"):
        max_balloon_bytes(-1)


def test_a_guest_too_small_for_a_balloon_never_reads_the_source() -> None:
    policy, clock, pressure = make_policy(499 * MIB)
    pressure.low = True
    assert policy.next_wakeup() == float("inf")
    clock.t += 3600
    assert policy.step() is None
    assert (policy.target, pressure.reads) == (0, 0)


# The rise


@pytest.mark.parametrize("jitter", [no_jitter, full_jitter])
def test_constant_pressure_reaches_the_max_within_16_s_and_never_passes_it(
    jitter: Callable[[float], float],
) -> None:
    policy, clock, pressure = make_policy(2 * GIB + 17 * PAGE_SIZE, jitter)
    pressure.low = True
    changes = run_until(policy, clock, START + 16.0)

    times = [t for t, _ in changes]
    targets = [target for _, target in changes]
    assert times[0] == START  # the first low sample grows the balloon at once
    assert targets == [min(k * policy.increment, policy.max_bytes) for k in range(1, 17)]
    assert START + 15.0 <= times[-1] <= START + 16.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.0 <= gap <= 1.0 + DEFAULTS.recheck_jitter_s for gap in gaps)

    # Pressure goes on: the balloon stays at the max, and the "no longer low" checks that the
    # re-checks keep pushing back never come.
    assert run_until(policy, clock, START + 600.0) == []
    assert policy.target == policy.max_bytes


def test_low_samples_inside_the_recheck_window_are_ignored() -> None:
    times = PolicyTimes(recheck_s=5.0, leave_first_s=2.0, leave_every_s=2.0, sample_s=1.0)
    policy, clock, pressure = make_policy(times=times)
    pressure.low = True
    assert policy.step() == policy.increment
    assert policy.next_wakeup() == START + 2.0  # the leave check, inside the re-check window

    clock.t = START + 1.0
    assert policy.step() is None  # nothing due: the source is not even read
    assert pressure.reads == 1
    clock.t = START + 2.0
    assert policy.step() is None  # still low: no growth before the re-check, no shrinking
    assert (policy.target, pressure.reads) == (policy.increment, 2)
    clock.t = START + 5.0
    assert policy.step() == 2 * policy.increment


# The fall


@pytest.mark.parametrize("jitter", [no_jitter, full_jitter])
def test_plenty_of_memory_empties_the_balloon_a_step_at_a_time_within_9_minutes(
    jitter: Callable[[float], float],
) -> None:
    policy, clock, pressure = make_policy(jitter=jitter)
    last_growth = grow_to_max(policy, clock, pressure)[-1]

    fall = run_until(policy, clock, last_growth + NINE_MINUTES)

    assert [target for _, target in fall] == [
        policy.max_bytes - k * policy.increment for k in range(1, 17)
    ]
    first = DEFAULTS.leave_first_s + jitter(DEFAULTS.leave_jitter_s)
    every = DEFAULTS.leave_every_s + jitter(DEFAULTS.leave_jitter_s)
    expected = [last_growth + first + k * every for k in range(16)]
    assert [t for t, _ in fall] == pytest.approx(expected)
    assert fall[-1][0] - last_growth < NINE_MINUTES

    # Empty, the policy only samples the source, once a second.
    reads = pressure.reads
    assert run_until(policy, clock, clock.t + 3600.0) == []
    assert 3599 <= pressure.reads - reads <= 3601


def test_pressure_returning_during_the_fall_grows_the_balloon_again() -> None:
    policy, clock, pressure = make_policy()
    last_growth = grow_to_max(policy, clock, pressure)[-1]
    fall = run_until(policy, clock, last_growth + 60.0 + 30.0)
    assert [target for _, target in fall] == [
        policy.max_bytes - policy.increment,
        policy.max_bytes - 2 * policy.increment,
    ]

    back = last_growth + 100.5
    assert run_until(policy, clock, back) == []
    pressure.low = True
    grew = run_until(policy, clock, back + DEFAULTS.sample_s)
    assert len(grew) == 1
    grew_at, target = grew[0]
    assert back < grew_at <= back + DEFAULTS.sample_s  # found by the next sample
    assert target == policy.max_bytes - policy.increment

    # The "no longer low" timer starts again: nothing shrinks for another 60 s.
    pressure.low = False
    assert run_until(policy, clock, grew_at + 59.9) == []
    assert run_until(policy, clock, grew_at + 60.0) == [
        (grew_at + 60.0, policy.max_bytes - 2 * policy.increment)
    ]


def test_a_low_sample_at_a_leave_check_grows_instead_of_shrinking() -> None:
    policy, clock, pressure = make_policy()
    pressure.low = True
    policy.step()
    pressure.low = False
    run_until(policy, clock, START + 59.0)
    pressure.low = True
    assert run_until(policy, clock, START + 60.0) == [(START + 60.0, 2 * policy.increment)]


def test_the_source_is_sampled_every_sample_s_while_no_timer_is_due() -> None:
    times = PolicyTimes(sample_s=0.25)
    policy, clock, pressure = make_policy(times=times)
    assert policy.next_wakeup() == START
    run_until(policy, clock, START + 10.0)
    assert pressure.reads == 41  # at START and every 0.25 s after it
    assert policy.target == 0
    assert policy.next_wakeup() == START + 10.25


# Jitter and times


def test_default_jitter_stays_in_bounds() -> None:
    draws = [random_jitter(1.5) for _ in range(10_000)]
    assert all(0.0 <= draw <= 1.5 for draw in draws)
    assert len(set(draws)) > 9_000
    assert max(draws) > 1.4 and min(draws) < 0.1  # it spreads over the range


def test_default_jitter_keeps_the_timers_in_their_windows() -> None:
    clock = Clock()
    pressure = Pressure()
    policy = LowMemoryPolicy(8 * GIB, pressure, clock=clock)
    slack = 1e-9  # float rounding of clock times near START
    for _ in range(50):
        growths = grow_to_max(policy, clock, pressure)
        assert len(growths) == 16
        assert 15.0 <= growths[-1] - growths[0] <= 16.0 + slack
        last_growth = growths[-1]
        fall = run_until(policy, clock, last_growth + NINE_MINUTES)
        assert policy.target == 0
        first = fall[0][0] - last_growth
        assert 60.0 <= first <= 60.0 + DEFAULTS.leave_jitter_s + slack
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(fall)]
        assert len(gaps) == 15
        assert all(30.0 - slack <= gap <= 30.0 + DEFAULTS.leave_jitter_s + slack for gap in gaps)
        assert len({round(gap, 6) for gap in gaps}) > 1  # each check draws its own jitter


def test_default_times_keep_the_promises_at_the_worst_jitter() -> None:
    worst_rise = (16 - 1) * (DEFAULTS.recheck_s + DEFAULTS.recheck_jitter_s)
    worst_fall = DEFAULTS.leave_first_s + 15 * DEFAULTS.leave_every_s + 16 * DEFAULTS.leave_jitter_s
    assert worst_rise <= 16.0
    assert worst_fall < NINE_MINUTES


@pytest.mark.parametrize("bad", [lambda bound: bound + 0.01, lambda bound: -0.01])
def test_a_jitter_outside_its_bound_is_refused(bad: Callable[[float], float]) -> None:
    policy, _, pressure = make_policy(jitter=bad)
    pressure.low = True
    with pytest.raises(ValueError, match="outside"):
        policy.step()


@pytest.mark.parametrize(
    "field", ["recheck_s", "leave_first_s", "leave_every_s", "sample_s", "recheck_jitter_s"]
)
def test_policy_times_refuse_negative_times(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyTimes(**{field: -1.0})


def test_policy_times_refuse_a_zero_sample_interval() -> None:
    with pytest.raises(ValueError, match="sample_s"):
        PolicyTimes(sample_s=0.0)


# Sources


def chromeos_dir(tmp_path: Path, available: str, margin: str) -> Path:
    directory = tmp_path / "chromeos-low_mem"
    directory.mkdir()
    (directory / "available").write_text(available)
    (directory / "margin").write_text(margin)
    return directory


def meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        "MemTotal:        8000000 kB\n"
        "MemFree:          100000 kB\n"
        f"MemAvailable:    {available_kb:>8} kB\n"
        "Buffers:           20000 kB\n"
    )
    return path


@pytest.mark.parametrize(
    ("available", "low"),
    [("150\n", True), ("200\n", True), ("201\n", False), ("1000\n", False)],
)
def test_chromeos_source_compares_available_with_the_critical_margin(
    tmp_path: Path, available: str, low: bool
) -> None:
    # Chrome OS lists its margins most critical first: 201 MiB critical, 1548 MiB moderate.
    source = ChromeOsLowMemSource(chromeos_dir(tmp_path, available, "201 1548\n"))
    assert source.margin_bytes() == 201 * MIB
    assert source.available_bytes() == int(available) * MIB
    assert source.is_low() is low


def test_chromeos_source_with_a_margin_of_its_own(tmp_path: Path) -> None:
    directory = chromeos_dir(tmp_path, "300\n", "201 1548\n")
    assert ChromeOsLowMemSource(directory, margin_mib=400).is_low()
    assert not ChromeOsLowMemSource(directory, margin_mib=300).is_low()
    assert "400 MiB" in ChromeOsLowMemSource(directory, margin_mib=400).describe()
    assert str(directory / "margin") in ChromeOsLowMemSource(directory).describe()


@pytest.mark.parametrize(
    ("available_kb", "low"),
    [(100 * 1024, True), (256 * 1024 - 1, True), (256 * 1024, False), (4_000_000, False)],
)
def test_memavailable_source_compares_with_its_margin(
    tmp_path: Path, available_kb: int, low: bool
) -> None:
    source = MemAvailableSource(256, meminfo(tmp_path, available_kb))
    assert source.available_bytes() == available_kb * 1024
    assert source.is_low() is low
    assert source.describe() == f"MemAvailable in {tmp_path / 'meminfo'} below 256 MiB"


def test_memavailable_source_reads_the_real_meminfo() -> None:
    total_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    available = MemAvailableSource().available_bytes()
    assert 0 < available <= total_kb * 1024
    assert not MemAvailableSource(margin_mib=0).is_low()
    assert MemAvailableSource(margin_mib=total_kb // 1024 + 1).is_low()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("available", "", "empty"),
        ("available", "lots\n", "whole numbers"),
        ("available", "-5\n", "whole numbers"),
        ("available", "1_000\n", "whole numbers"),
        ("available", "300 400\n", "one number"),
        ("margin", "201 abc\n", "whole numbers"),
        ("margin", "\n", "empty"),
        ("margin", "20\xe91\n", "not ASCII"),
    ],
)
def test_garbled_chromeos_files_are_named(
    tmp_path: Path, name: str, content: str, reason: str
) -> None:
    directory = chromeos_dir(tmp_path, "300\n", "201 1548\n")
    (directory / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(MemorySourceError, match=reason) as raised:
        ChromeOsLowMemSource(directory).is_low()
    assert raised.value.path == directory / name
    assert str(directory / name) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_chromeos_file_is_named(tmp_path: Path) -> None:
    directory = chromeos_dir(tmp_path, "300\n", "201 1548\n")
    (directory / "margin").unlink()
    with pytest.raises(MemorySourceError, match="No such file") as raised:
        ChromeOsLowMemSource(directory).is_low()
    assert str(directory / "margin") in str(raised.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("MemTotal: 8000000 kB\nMemFree: 100000 kB\n", "no MemAvailable line"),
        ("MemAvailable: 12 MB\n", "garbled line"),
        ("MemAvailable: twelve kB\n", "garbled line"),
        ("MemAvailable:\n", "garbled line"),
    ],
)
def test_garbled_meminfo_is_named(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "meminfo"
    path.write_text(content)
    with pytest.raises(MemorySourceError, match=reason) as raised:
        MemAvailableSource(meminfo=path).is_low()
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_meminfo_is_named(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    with pytest.raises(MemorySourceError, match="No such file") as raised:
        MemAvailableSource(meminfo=path).is_low()
    assert raised.value.path == path


def test_pick_source_prefers_chromeos_files(tmp_path: Path) -> None:
    directory = chromeos_dir(tmp_path, "300\n", "201 1548\n")
    source = pick_source(None, chromeos_dir=directory, meminfo=tmp_path / "absent")
    assert isinstance(source, ChromeOsLowMemSource)
    assert source.directory == directory
    assert source.margin_mib is None
    given = pick_source(400, chromeos_dir=directory, meminfo=tmp_path / "absent")
    assert given.is_low()


def test_pick_source_falls_back_to_memavailable(tmp_path: Path) -> None:
    path = meminfo(tmp_path, 4_000_000)
    source = pick_source(None, chromeos_dir=tmp_path / "absent", meminfo=path)
    assert isinstance(source, MemAvailableSource)
    assert (source.margin_mib, source.meminfo) == (DEFAULT_LOW_MEM_MARGIN_MIB, path)
    given = pick_source(5000, chromeos_dir=tmp_path / "absent", meminfo=path)
    assert isinstance(given, MemAvailableSource)
    assert given.margin_mib == 5000
    assert given.is_low()


def test_pick_source_reports_an_unreadable_source_at_once(tmp_path: Path) -> None:
    directory = chromeos_dir(tmp_path, "garbage\n", "201\n")
    with pytest.raises(MemorySourceError, match="available"):
        pick_source(None, chromeos_dir=directory)
    with pytest.raises(MemorySourceError, match="meminfo"):
        pick_source(None, chromeos_dir=tmp_path / "absent", meminfo=tmp_path / "meminfo")


def test_negative_margins_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="margin"):
        MemAvailableSource(-1)
    with pytest.raises(ValueError, match="margin"):
        ChromeOsLowMemSource(tmp_path, margin_mib=-1)


# The runner


class FakeWait:
    """Stands for `stop.wait` on the simulated clock: time passes only here."""

    def __init__(self, clock: Clock, stop: threading.Event, end: float) -> None:
        self.clock = clock
        self.stop = stop
        self.end = end
        self.timeouts: list[float | None] = []

    def __call__(self, timeout: float | None) -> bool:
        self.timeouts.append(timeout)
        if self.stop.is_set():
            return True
        if timeout is None or self.clock.t + timeout > self.end:
            self.stop.set()
            return True
        self.clock.t += timeout
        return False


def test_runner_passes_on_changes_only() -> None:
    policy, clock, pressure = make_policy()
    pressure.low = True
    stop = threading.Event()
    sent: list[tuple[float, int]] = []

    def set_target(target: int) -> None:
        sent.append((clock.t, target))
        pressure.low = len(sent) < 3  # three increments, then memory is plentiful

    run_policy(policy, set_target, stop, wait=FakeWait(clock, stop, START + 200.0))

    inc = policy.increment
    assert sent == [
        (START, inc),
        (START + 1.0, 2 * inc),
        (START + 2.0, 3 * inc),
        (START + 62.0, 2 * inc),
        (START + 92.0, inc),
        (START + 122.0, 0),
    ]
    assert pressure.reads > 150  # sampled about once a second; most reads change nothing


def test_runner_stops_when_set_target_sets_the_event() -> None:
    policy, clock, pressure = make_policy()
    pressure.low = True
    stop = threading.Event()
    sent: list[int] = []

    def set_target(target: int) -> None:
        sent.append(target)
        if len(sent) == 2:
            stop.set()

    wait = FakeWait(clock, stop, START + 3600.0)
    run_policy(policy, set_target, stop, wait=wait)
    assert sent == [policy.increment, 2 * policy.increment]
    assert pressure.reads == 2
    assert clock.t == START + 1.0


def test_runner_does_nothing_once_stopped() -> None:
    policy, clock, pressure = make_policy()
    stop = threading.Event()
    stop.set()
    sent: list[int] = []
    run_policy(policy, sent.append, stop, wait=FakeWait(clock, stop, START + 3600.0))
    assert (sent, pressure.reads) == ([], 0)


def test_runner_waits_for_ever_on_an_idle_policy_until_stopped() -> None:
    policy, _, pressure = make_policy(100 * MIB)  # no balloon: nothing is ever due
    stop = threading.Event()
    sent: list[int] = []
    runner = threading.Thread(target=run_policy, args=(policy, sent.append, stop))
    runner.start()
    stop.set()
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert (sent, pressure.reads) == ([], 0)
