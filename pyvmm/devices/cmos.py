"""The CMOS RTC and NVRAM (an MC146818 at ports 0x70/0x71): wall-clock time and memory sizes.

The clock is the host's UTC time plus an offset the guest sets by writing the time registers,
so a guest that sets the RTC reads its own time back. It raises no interrupts (there is no
IRQ 8); register C still reports update-ended for a guest that polls it. The memory-size bytes
are the ones PC firmware leaves for the OS.
"""

from __future__ import annotations

import datetime
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.ratelimit import GuestLog

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


# Clock registers: the _Clock field each holds and that field's range.
CLOCK_FIELDS: dict[int, tuple[str, int, int]] = {
    Reg.SECONDS: ("second", 0, 59),
    Reg.MINUTES: ("minute", 0, 59),
    Reg.HOURS: ("hour", 0, 23),
    Reg.WEEKDAY: ("weekday", 1, 7),
    Reg.DAY_OF_MONTH: ("day", 1, 31),
    Reg.MONTH: ("month", 1, 12),
    Reg.YEAR: ("year", 0, 99),
    Reg.CENTURY: ("century", 0, 99),
}


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
        """Seconds since the epoch; raises ValueError for fields no date has (timegm alone
        would carry them over: February 31 into March, hour 99 into later days)."""
        when = datetime.datetime(
            self.century * 100 + self.year,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            tzinfo=datetime.UTC,
        )
        return int(when.timestamp())


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
        # The clock registers' bytes while register B's SET bit is on (the clock is stopped).
        self._frozen: dict[int, int] | None = None
        self._guest_log = GuestLog(logger, "cmos")
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
        return _Clock.at(self._guest_time())

    def _encode(self, value: int) -> int:
        return value if RegB.BINARY in self._reg_b else _to_bcd(value)

    def _decode(self, value: int) -> int | None:
        """A register byte as a number, or None for a BCD byte with a digit above 9."""
        if RegB.BINARY in self._reg_b:
            return value
        if value & 0x0F > 9 or value >> 4 > 9:
            return None
        return _from_bcd(value)

    def _encode_hour(self, hour: int) -> int:
        if RegB.HOUR_24 in self._reg_b:
            return self._encode(hour)
        pm = HOUR_PM if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int | None:
        if RegB.HOUR_24 in self._reg_b:
            return self._decode(value)
        hour = self._decode(value & ~HOUR_PM)
        if hour is None or not 1 <= hour <= 12:
            return None
        return hour % 12 + (12 if value & HOUR_PM else 0)

    def _encode_field(self, index: int, clock: _Clock) -> int:
        """The byte clock register `index` holds for `clock` in the current data mode."""
        if index == Reg.HOURS:
            return self._encode_hour(clock.hour)
        return self._encode(getattr(clock, CLOCK_FIELDS[index][0]))

    def _decode_field(self, index: int, value: int) -> int | None:
        """Clock register `index`'s byte as a field value; None if no date has it."""
        number = self._decode_hour(value) if index == Reg.HOURS else self._decode(value)
        _, low, high = CLOCK_FIELDS[index]
        return number if number is not None and low <= number <= high else None

    def _read_register(self, index: int) -> int:
        if index in CLOCK_FIELDS:
            if self._frozen is not None:
                return self._frozen[index]
            return self._encode_field(index, self._clock())
        match index:
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
            case _ if index in CLOCK_FIELDS:
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
            new = RegB(new & ~RegB.UIE)  # as on the MC146818, SET clears the update interrupt
            if self._frozen is None:
                clock = self._clock()
                self._frozen = {i: self._encode_field(i, clock) for i in CLOCK_FIELDS}
            self._reg_b = new
        elif self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            self._reg_b = new
            fields = {i: self._decode_field(i, byte) for i, byte in frozen.items()}
            self._set_time(fields, 0.0)
        else:
            self._reg_b = new

    def _write_clock(self, index: int, value: int) -> None:
        if self._frozen is not None:
            self._frozen[index] = value  # the register holds the byte; used when SET is cleared
            return
        t = self._guest_time()
        clock = self._clock()
        fields: dict[int, int | None] = {
            i: getattr(clock, name) for i, (name, _, _) in CLOCK_FIELDS.items()
        }
        fields[index] = self._decode_field(index, value)
        self._set_time(fields, t - math.floor(t))

    def _set_time(self, fields: dict[int, int | None], fraction: float) -> None:
        """Make the guest's clock read `fields` (by register; plus `fraction` of a second) from
        now on, unless they make no date: then the clock stays as it was."""
        values: dict[str, int] = {}
        try:
            for index, value in fields.items():
                name = CLOCK_FIELDS[index][0]
                if value is None:
                    raise ValueError(f"register {index:#04x} holds no valid {name}")
                values[name] = value
            target = _Clock(**values).timestamp() + fraction
        except (ValueError, OverflowError) as e:
            self._guest_log.warning("impossible date", "guest set an impossible date (%s)", e)
            return
        self._offset = target - self._now()
