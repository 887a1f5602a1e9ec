"""Behaviour of the CMOS RTC and NVRAM as a guest sees it, with the host clock injected."""

from __future__ import annotations

import calendar

import pytest

from pyvmm import ratelimit
from pyvmm.devices.cmos import (
    REG_A_DEFAULT,
    Cmos,
    Port,
    Reg,
    RegA,
    RegB,
    RegC,
    RegD,
)

MIB = 1024 * 1024
GIB = 1024 * MIB

# Tuesday 2024-02-27 13:45:56 UTC.
T0 = float(calendar.timegm((2024, 2, 27, 13, 45, 56)))


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rd(dev: Cmos, index: int) -> int:
    dev.write(Port.INDEX, bytes([index]))
    buf = bytearray(1)
    dev.read(Port.DATA, memoryview(buf))
    return buf[0]


def wr(dev: Cmos, index: int, value: int) -> None:
    dev.write(Port.INDEX, bytes([index]))
    dev.write(Port.DATA, bytes([value]))


def time_fields(dev: Cmos) -> tuple[int, ...]:
    regs = (Reg.CENTURY, Reg.YEAR, Reg.MONTH, Reg.DAY_OF_MONTH, Reg.HOURS, Reg.MINUTES)
    return (*(rd(dev, r) for r in regs), rd(dev, Reg.SECONDS), rd(dev, Reg.WEEKDAY))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cmos(clock: Clock) -> Cmos:
    return Cmos(256 * MIB, 0, now=clock)


def test_time_in_bcd_by_default(cmos: Cmos) -> None:
    assert time_fields(cmos) == (0x20, 0x24, 0x02, 0x27, 0x13, 0x45, 0x56, 3)


def test_time_in_binary(cmos: Cmos) -> None:
    wr(cmos, Reg.B, RegB.HOUR_24 | RegB.BINARY)
    assert time_fields(cmos) == (20, 24, 2, 27, 13, 45, 56, 3)


def test_twelve_hour_mode(cmos: Cmos, clock: Clock) -> None:
    wr(cmos, Reg.B, 0)  # BCD, 12-hour
    assert rd(cmos, Reg.HOURS) == 0x80 | 0x01  # 1 PM
    clock.t = float(calendar.timegm((2024, 2, 27, 0, 5, 0)))
    assert rd(cmos, Reg.HOURS) == 0x12  # 12 AM
    clock.t = float(calendar.timegm((2024, 2, 27, 12, 5, 0)))
    assert rd(cmos, Reg.HOURS) == 0x80 | 0x12  # 12 PM
    wr(cmos, Reg.B, RegB.BINARY)
    clock.t = float(calendar.timegm((2024, 2, 27, 23, 5, 0)))
    assert rd(cmos, Reg.HOURS) == 0x80 | 11


def test_clock_follows_host(cmos: Cmos, clock: Clock) -> None:
    clock.t += 5
    assert rd(cmos, Reg.SECONDS) == 0x01
    assert rd(cmos, Reg.MINUTES) == 0x46


def test_default_registers(cmos: Cmos) -> None:
    assert rd(cmos, Reg.A) == REG_A_DEFAULT
    assert rd(cmos, Reg.B) == RegB.HOUR_24
    assert rd(cmos, Reg.D) == RegD.VRT


def test_update_in_progress_only_just_before_a_second(cmos: Cmos, clock: Clock) -> None:
    clock.t = T0 + 0.5
    assert not rd(cmos, Reg.A) & RegA.UIP
    clock.t = T0 + 0.9999
    assert rd(cmos, Reg.A) & RegA.UIP
    clock.t = T0 + 1.0001
    assert not rd(cmos, Reg.A) & RegA.UIP


def test_register_a_writable_but_not_uip(cmos: Cmos, clock: Clock) -> None:
    wr(cmos, Reg.A, 0xA6)
    clock.t = T0 + 0.5
    assert rd(cmos, Reg.A) == 0x26


def test_set_the_clock_like_linux(cmos: Cmos, clock: Clock) -> None:
    # mc146818_set_time: SET on, write the fields, SET off.
    wr(cmos, Reg.B, RegB.SET | RegB.HOUR_24)
    for reg, value in [
        (Reg.YEAR, 0x99),
        (Reg.MONTH, 0x12),
        (Reg.DAY_OF_MONTH, 0x31),
        (Reg.HOURS, 0x23),
        (Reg.MINUTES, 0x59),
        (Reg.SECONDS, 0x58),
        (Reg.CENTURY, 0x19),
    ]:
        wr(cmos, reg, value)
    clock.t += 100  # frozen while SET is on
    assert time_fields(cmos)[:7] == (0x19, 0x99, 0x12, 0x31, 0x23, 0x59, 0x58)
    wr(cmos, Reg.B, RegB.HOUR_24)
    clock.t += 3
    assert time_fields(cmos) == (0x20, 0x00, 0x01, 0x01, 0x00, 0x00, 0x01, 7)  # a Saturday


def test_set_bit_freezes_and_clears_uip(cmos: Cmos, clock: Clock) -> None:
    clock.t = T0 + 0.99999
    wr(cmos, Reg.B, RegB.SET | RegB.HOUR_24)
    assert not rd(cmos, Reg.A) & RegA.UIP
    clock.t += 10
    assert rd(cmos, Reg.SECONDS) == 0x56
    wr(cmos, Reg.B, RegB.HOUR_24)
    assert rd(cmos, Reg.SECONDS) == 0x56
    clock.t += 1
    assert rd(cmos, Reg.SECONDS) == 0x57


def test_write_without_set_adjusts_clock(cmos: Cmos, clock: Clock) -> None:
    wr(cmos, Reg.MINUTES, 0x10)
    clock.t += 60
    assert rd(cmos, Reg.MINUTES) == 0x11
    assert rd(cmos, Reg.HOURS) == 0x13


def test_write_hours_in_twelve_hour_binary(cmos: Cmos) -> None:
    wr(cmos, Reg.B, RegB.BINARY)
    wr(cmos, Reg.HOURS, 0x80 | 3)  # 3 PM
    wr(cmos, Reg.B, RegB.BINARY | RegB.HOUR_24)
    assert rd(cmos, Reg.HOURS) == 15


def test_impossible_date_leaves_clock(cmos: Cmos) -> None:
    wr(cmos, Reg.B, RegB.SET | RegB.HOUR_24)
    wr(cmos, Reg.MONTH, 0x13)
    wr(cmos, Reg.B, RegB.HOUR_24)
    assert rd(cmos, Reg.MONTH) == 0x02


def test_register_c_reports_update_and_clears_on_read(cmos: Cmos, clock: Clock) -> None:
    rd(cmos, Reg.C)
    assert rd(cmos, Reg.C) == 0
    clock.t += 1
    assert rd(cmos, Reg.C) == RegC.UF
    assert rd(cmos, Reg.C) == 0
    wr(cmos, Reg.B, RegB.HOUR_24 | RegB.UIE)
    clock.t += 1
    assert rd(cmos, Reg.C) == RegC.UF | RegC.IRQF


def test_registers_c_and_d_read_only(cmos: Cmos) -> None:
    wr(cmos, Reg.D, 0)
    assert rd(cmos, Reg.D) == RegD.VRT
    wr(cmos, Reg.C, 0xF0)
    assert rd(cmos, Reg.C) == 0


def test_alarm_registers_stored(cmos: Cmos) -> None:
    for reg, value in [
        (Reg.SECONDS_ALARM, 0x11),
        (Reg.MINUTES_ALARM, 0x22),
        (Reg.HOURS_ALARM, 0xC0),
    ]:
        wr(cmos, reg, value)
    assert [rd(cmos, r) for r in (Reg.SECONDS_ALARM, Reg.MINUTES_ALARM, Reg.HOURS_ALARM)] == [
        0x11,
        0x22,
        0xC0,
    ]


def test_nvram_and_nmi_bit(cmos: Cmos) -> None:
    cmos.write(Port.INDEX, bytes([0x80 | 0x40]))
    cmos.write(Port.DATA, b"\x5a")
    assert cmos.nmi_disabled
    assert rd(cmos, 0x40) == 0x5A
    assert not cmos.nmi_disabled


def word(dev: Cmos, low: int) -> int:
    return rd(dev, low) | rd(dev, low + 1) << 8


@pytest.mark.parametrize(
    ("below", "above", "extended", "above_16m", "above_4g"),
    [
        (256 * MIB, 0, 63 * 1024, (256 - 16) * 16, 0),
        (8 * MIB, 0, 7 * 1024, 0, 0),
        (3 * GIB, 5 * GIB, 63 * 1024, (3 * 1024 - 16) * 16, 5 * 1024 * 16),
        (4 * GIB, 2**40, 63 * 1024, 0xFF00, 0xFFFFFF),
    ],
)
def test_memory_sizes(
    clock: Clock, below: int, above: int, extended: int, above_16m: int, above_4g: int
) -> None:
    dev = Cmos(below, above, now=clock)
    assert word(dev, Reg.BASE_MEMORY_LOW) == 640
    assert word(dev, Reg.EXTENDED_MEMORY_LOW) == extended
    assert word(dev, Reg.EXTENDED_MEMORY_LOW_COPY) == extended
    assert word(dev, Reg.MEMORY_ABOVE_16M_LOW) == above_16m
    assert word(dev, Reg.MEMORY_ABOVE_4G_LOW) | rd(dev, Reg.MEMORY_ABOVE_4G_HIGH) << 16 == above_4g


def test_wide_read(cmos: Cmos) -> None:
    cmos.write(Port.INDEX, bytes([Reg.D]))
    buf = bytearray(4)
    cmos.read(Port.DATA, memoryview(buf))
    assert bytes(buf) == b"\x80\xff\xff\xff"


def test_a_bcd_register_holds_the_byte_written_while_set(cmos: Cmos) -> None:
    """0xff in BCD mode decoded to 165 seconds and came back as 0x105, which no register
    holds: the read ended the vCPU. The register holds the byte; the clock ignores it."""
    wr(cmos, Reg.B, RegB.SET | RegB.HOUR_24)
    wr(cmos, Reg.SECONDS, 0xFF)
    assert rd(cmos, Reg.SECONDS) == 0xFF
    wr(cmos, Reg.B, RegB.HOUR_24)
    assert rd(cmos, Reg.SECONDS) == 0x56  # no date has second 0xff: the clock did not change
    assert rd(cmos, Reg.MINUTES) == 0x45


@pytest.mark.parametrize(
    ("index", "value"),
    [(Reg.SECONDS, 0xFF), (Reg.SECONDS, 0x60), (Reg.MONTH, 0x13), (Reg.HOURS, 0x1A)],
)
def test_impossible_values_without_set_leave_the_clock(
    cmos: Cmos, clock: Clock, index: int, value: int
) -> None:
    before = time_fields(cmos)
    wr(cmos, index, value)
    assert time_fields(cmos) == before
    assert all(0 <= f <= 0x99 for f in time_fields(cmos))


def test_a_date_no_calendar_has_leaves_the_clock(cmos: Cmos) -> None:
    """February 31 was carried into March 2 by timegm, silently."""
    wr(cmos, Reg.B, RegB.SET | RegB.HOUR_24)
    wr(cmos, Reg.DAY_OF_MONTH, 0x31)
    wr(cmos, Reg.B, RegB.HOUR_24)
    assert (rd(cmos, Reg.MONTH), rd(cmos, Reg.DAY_OF_MONTH)) == (0x02, 0x27)
    wr(cmos, Reg.DAY_OF_MONTH, 0x30)  # and without SET
    assert (rd(cmos, Reg.MONTH), rd(cmos, Reg.DAY_OF_MONTH)) == (0x02, 0x27)


def test_twelve_hour_bcd_hours_outside_1_to_12_are_refused(cmos: Cmos) -> None:
    wr(cmos, Reg.B, 0)  # BCD, 12-hour
    wr(cmos, Reg.HOURS, 0x80 | 0x13)
    assert rd(cmos, Reg.HOURS) == 0x80 | 0x01  # still 1 PM


def test_every_byte_in_every_register_reads_back_as_a_byte(cmos: Cmos) -> None:
    for mode in (RegB.HOUR_24, RegB.BINARY, 0):
        for index in (*range(0x0A), Reg.CENTURY):
            for set_bit in (RegB.SET, 0):
                wr(cmos, Reg.B, mode | set_bit)
                for value in (0x00, 0x0F, 0x9A, 0xFF):
                    wr(cmos, index, value)
                    assert 0 <= rd(cmos, index) <= 0xFF


def test_a_flood_of_impossible_dates_is_logged_a_few_times(
    cmos: Cmos, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        for _ in range(10_000):
            wr(cmos, Reg.MONTH, 0x13)
        ratelimit.flush_all()
    lines = [r.getMessage() for r in caplog.records]
    assert 2 <= len(lines) <= 10
    assert "impossible date" in lines[0]
    assert any("more impossible date messages were not logged" in line for line in lines)
