"""The CMOS RTC and NVRAM (an MC146818 at ports 0x70/0x71): wall-clock time and memory sizes.

The clock is the host's UTC time plus an offset the guest sets by writing the time registers,
so a guest that sets the RTC reads its own time back. It raises no interrupts (there is no
IRQ 8); register C still reports update-ended for a guest that polls it. The memory-size bytes
are the ones PC firmware leaves for the OS.
"""

from __future__ import annotations

import calendar
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)

NVRAM_SIZE = 128

# Register A's update-in-progress bit is set this long before each second boundary.
UPDATE_IN_PROGRESS_SECONDS = 244e-6


class Port(enum.IntEnum):
    """Offsets from the device base (0x70)."""

    INDEX = 0
    DATA = 1


INDEX_MASK = 0x7F
NMI_DISABLE = 0x80  # bit 7 of a write to the index port; not part of the index


class Reg(enum.IntEnum):
    """NVRAM indices with a meaning."""

    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    WEEKDAY = 0x06
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09
    A = 0x0A
    B = 0x0B
    C = 0x0C
    D = 0x0D
    BASE_MEMORY_LOW = 0x15  # KiB below 1 MiB
    BASE_MEMORY_HIGH = 0x16
    EXTENDED_MEMORY_LOW = 0x17  # KiB from 1 MiB, up to 64 MiB
    EXTENDED_MEMORY_HIGH = 0x18
    EXTENDED_MEMORY_LOW_COPY = 0x30
    EXTENDED_MEMORY_HIGH_COPY = 0x31
    CENTURY = 0x32
    MEMORY_ABOVE_16M_LOW = 0x34  # 64 KiB units from 16 MiB to 4 GiB
    MEMORY_ABOVE_16M_HIGH = 0x35
    MEMORY_ABOVE_4G_LOW = 0x5B  # 64 KiB units above 4 GiB, three bytes
    MEMORY_ABOVE_4G_MID = 0x5C
    MEMORY_ABOVE_4G_HIGH = 0x5D


CLOCK_REGISTERS = frozenset(
    {
        Reg.SECONDS,
        Reg.MINUTES,
        Reg.HOURS,
        Reg.WEEKDAY,
        Reg.DAY_OF_MONTH,
        Reg.MONTH,
        Reg.YEAR,
        Reg.CENTURY,
    }
)


class RegA(enum.IntFlag):
    """Register A: rate selection (bits 3:0), divider (bits 6:4), update in progress."""

    RATE = 0x0F
    DIVIDER = 0x70
    UIP = 0x80


REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate


class RegB(enum.IntFlag):
    """Register B: control."""

    DSE = 0x01  # daylight saving enable
    HOUR_24 = 0x02
    BINARY = 0x04  # data mode: binary, else BCD
    SQWE = 0x08
    UIE = 0x10  # update-ended interrupt enable
    AIE = 0x20  # alarm interrupt enable
    PIE = 0x40  # periodic interrupt enable
    SET = 0x80  # stop updates so the guest can set the time


REG_B_DEFAULT = RegB.HOUR_24


class RegC(enum.IntFlag):
    """Register C: interrupt flags, cleared by reading."""

    UF = 0x10  # update ended
    AF = 0x20  # alarm
    PF = 0x40  # periodic
    IRQF = 0x80  # one of the above whose enable bit is set


class RegD(enum.IntFlag):
    """Register D."""

    VRT = 0x80  # valid RAM and time


HOUR_PM = 0x80  # in 12-hour mode, bit 7 of the hours register

BASE_MEMORY_KIB = 640
KIB = 1024
MIB = 1024 * KIB
CHUNK_64K = 64 * KIB


@dataclass(frozen=True)
class _Clock:
    """Calendar fields in binary, 24-hour."""

    second: int
    minute: int
    hour: int
    weekday: int  # 1 = Sunday
    day: int
    month: int
    year: int  # 0-99
    century: int

    @classmethod
    def at(cls, t: float) -> _Clock:
        tm = time.gmtime(math.floor(t))
        return cls(
            second=tm.tm_sec,
            minute=tm.tm_min,
            hour=tm.tm_hour,
            weekday=(tm.tm_wday + 1) % 7 + 1,  # tm_wday has Monday = 0
            day=tm.tm_mday,
            month=tm.tm_mon,
            year=tm.tm_year % 100,
            century=tm.tm_year // 100,
        )

    def timestamp(self) -> int:
        """Seconds since the epoch; raises ValueError for fields no date has."""
        return calendar.timegm(
            (
                self.century * 100 + self.year,
                self.month,
                self.day,
                self.hour,
                self.minute,
                self.second,
            )
        )


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class Cmos:
    """The RTC and NVRAM at ports 0x70 (index) and 0x71 (data); a `BusDevice`."""

    def __init__(
        self, mem_below_4g: int, mem_above_4g: int, now: Callable[[], float] = time.time
    ) -> None:
        self._now = now
        self._index = 0
        self._nmi_disabled = False
        self._nvram = bytearray(NVRAM_SIZE)
        self._offset = 0.0  # guest time minus host time, in seconds
        self._frozen: _Clock | None = None  # the clock while register B's SET bit is on
        self._reg_a = REG_A_DEFAULT
        self._reg_b: RegB = REG_B_DEFAULT
        self._last_flags_read = math.floor(self._guest_time())
        self._store_memory_sizes(mem_below_4g, mem_above_4g)

    @property
    def nmi_disabled(self) -> bool:
        """Whether the guest last wrote the index port with the NMI-disable bit set."""
        return self._nmi_disabled

    def _store_memory_sizes(self, below_4g: int, above_4g: int) -> None:
        def put(low: int, value: int, width: int) -> None:
            self._nvram[low : low + width] = value.to_bytes(width, "little")

        put(Reg.BASE_MEMORY_LOW, BASE_MEMORY_KIB, 2)
        extended = min(max(min(below_4g, 64 * MIB) - MIB, 0) // KIB, 0xFFFF)
        put(Reg.EXTENDED_MEMORY_LOW, extended, 2)
        put(Reg.EXTENDED_MEMORY_LOW_COPY, extended, 2)
        above_16m = min(max(below_4g - 16 * MIB, 0) // CHUNK_64K, 0xFFFF)
        put(Reg.MEMORY_ABOVE_16M_LOW, above_16m, 2)
        above_4g_chunks = min(max(above_4g, 0) // CHUNK_64K, 0xFFFFFF)
        put(Reg.MEMORY_ABOVE_4G_LOW, above_4g_chunks, 3)

    # BusDevice

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        if offset == Port.DATA:
            data[0] = self._read_register(self._index)
        else:
            data[0] = 0xFF  # the index port is write-only
        for i in range(1, len(data)):
            data[i] = 0xFF

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) == 0:
            return
        value = data[0]
        if offset == Port.INDEX:
            self._index = value & INDEX_MASK
            self._nmi_disabled = bool(value & NMI_DISABLE)
        elif offset == Port.DATA:
            self._write_register(self._index, value)

    # Internals

    def _guest_time(self) -> float:
        return self._now() + self._offset

    def _clock(self) -> _Clock:
        if self._frozen is not None:
            return self._frozen
        return _Clock.at(self._guest_time())

    def _encode(self, value: int) -> int:
        return value if RegB.BINARY in self._reg_b else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if RegB.BINARY in self._reg_b else _from_bcd(value)

    def _encode_hour(self, hour: int) -> int:
        if RegB.HOUR_24 in self._reg_b:
            return self._encode(hour)
        pm = HOUR_PM if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int:
        if RegB.HOUR_24 in self._reg_b:
            return self._decode(value)
        hour = self._decode(value & ~HOUR_PM) % 12
        return hour + 12 if value & HOUR_PM else hour

    def _read_register(self, index: int) -> int:
        match index:
            case Reg.SECONDS:
                return self._encode(self._clock().second)
            case Reg.MINUTES:
                return self._encode(self._clock().minute)
            case Reg.HOURS:
                return self._encode_hour(self._clock().hour)
            case Reg.WEEKDAY:
                return self._encode(self._clock().weekday)
            case Reg.DAY_OF_MONTH:
                return self._encode(self._clock().day)
            case Reg.MONTH:
                return self._encode(self._clock().month)
            case Reg.YEAR:
                return self._encode(self._clock().year)
            case Reg.CENTURY:
                return self._encode(self._clock().century)
            case Reg.A:
                return self._reg_a | (RegA.UIP if self._update_in_progress() else 0)
            case Reg.B:
                return int(self._reg_b)
            case Reg.C:
                return self._read_flags()
            case Reg.D:
                return RegD.VRT
            case _:
                return self._nvram[index]

    def _write_register(self, index: int, value: int) -> None:
        match index:
            case Reg.A:
                self._reg_a = value & ~RegA.UIP
            case Reg.B:
                self._write_reg_b(value)
            case Reg.C | Reg.D:
                pass  # read-only
            case _ if index in CLOCK_REGISTERS:
                self._write_clock(index, value)
            case _:
                self._nvram[index] = value

    def _update_in_progress(self) -> bool:
        if self._frozen is not None:
            return False
        t = self._guest_time()
        return t - math.floor(t) >= 1 - UPDATE_IN_PROGRESS_SECONDS

    def _read_flags(self) -> int:
        # No interrupts are delivered, so flags are worked out when the guest looks.
        flags = RegC(0)
        if self._frozen is None:
            second = math.floor(self._guest_time())
            if second != self._last_flags_read:
                flags |= RegC.UF
            self._last_flags_read = second
        if RegC.UF in flags and RegB.UIE in self._reg_b:
            flags |= RegC.IRQF
        return int(flags)

    def _write_reg_b(self, value: int) -> None:
        new = RegB(value)
        if RegB.SET in new:
            new = RegB(
                new & ~RegB.UIE
            )  # as on the MC146818, SET clears the update interrupt enable
            if self._frozen is None:
                self._frozen = self._clock()
        elif self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            self._set_time(frozen, 0.0)
        self._reg_b = new

    def _write_clock(self, index: int, value: int) -> None:
        clock = self._clock()
        match index:
            case Reg.SECONDS:
                clock = replace(clock, second=self._decode(value))
            case Reg.MINUTES:
                clock = replace(clock, minute=self._decode(value))
            case Reg.HOURS:
                clock = replace(clock, hour=self._decode_hour(value))
            case Reg.WEEKDAY:
                clock = replace(clock, weekday=self._decode(value))
            case Reg.DAY_OF_MONTH:
                clock = replace(clock, day=self._decode(value))
            case Reg.MONTH:
                clock = replace(clock, month=self._decode(value))
            case Reg.YEAR:
                clock = replace(clock, year=self._decode(value))
            case Reg.CENTURY:
                clock = replace(clock, century=self._decode(value))
        if self._frozen is not None:
            self._frozen = clock  # takes effect when SET is cleared
        else:
            t = self._guest_time()
            self._set_time(clock, t - math.floor(t))

    def _set_time(self, clock: _Clock, fraction: float) -> None:
        """Make the guest's clock read `clock` (plus `fraction` of a second) from now on."""
        try:
            target = clock.timestamp() + fraction
        except (ValueError, OverflowError):
            logger.warning("cmos: guest set an impossible date %s; clock unchanged", clock)
            return
        self._offset = target - self._now()
