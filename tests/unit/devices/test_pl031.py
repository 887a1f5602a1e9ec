"""The PL031 RTC: the ids Linux's AMBA bus checks, the count, setting the clock."""

from __future__ import annotations

import pytest

from pyvmm.devices.pl031 import Pl031, Reg


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _read(rtc: Pl031, offset: int, size: int = 4) -> int:
    buf = bytearray(size)
    rtc.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def _write(rtc: Pl031, offset: int, value: int) -> None:
    rtc.write(offset, value.to_bytes(4, "little"))


def test_the_ids_say_pl031_primecell() -> None:
    rtc = Pl031()
    periph = sum(_read(rtc, 0xFE0 + 4 * i) << (8 * i) for i in range(4))
    cell = sum(_read(rtc, 0xFF0 + 4 * i) << (8 * i) for i in range(4))
    assert periph & 0x000F_FFFF == 0x0004_1031  # what rtc-pl031 matches
    assert cell == 0xB105_F00D


def test_the_count_is_the_host_time_in_seconds() -> None:
    clock = Clock(1_800_000_000.7)
    rtc = Pl031(clock)
    assert _read(rtc, Reg.DR) == 1_800_000_000
    clock.now += 5
    assert _read(rtc, Reg.DR) == 1_800_000_005
    assert _read(rtc, Reg.CR) == 1


def test_loading_sets_the_guests_clock_which_keeps_counting() -> None:
    clock = Clock(1_800_000_000)
    rtc = Pl031(clock)
    _write(rtc, Reg.LR, 1_000)
    assert _read(rtc, Reg.DR) == 1_000
    clock.now += 61
    assert _read(rtc, Reg.DR) == 1_061


def test_match_and_mask_read_back_but_no_alarm_fires() -> None:
    clock = Clock(100)
    rtc = Pl031(clock)
    _write(rtc, Reg.MR, 101)
    _write(rtc, Reg.IMSC, 0xFF)
    clock.now = 200
    assert _read(rtc, Reg.MR) == 101
    assert _read(rtc, Reg.IMSC) == 1
    assert _read(rtc, Reg.RIS) == 0
    assert _read(rtc, Reg.MIS) == 0


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 2), (2, 4), (0, 8)])
def test_accesses_other_than_aligned_words_read_zero_and_write_nothing(
    offset: int, size: int
) -> None:
    rtc = Pl031(Clock(50))
    assert _read(rtc, offset, size) == 0
    rtc.write(Reg.LR + offset, b"\x01" * size)
    assert _read(rtc, Reg.DR) == 50
