"""An ARM PrimeCell PL031 real-time clock on MMIO: arm64 guests' wall clock (Linux rtc-pl031).

The counter is seconds since the epoch: the host's time plus an offset the guest sets by
writing the load register, so a guest that sets the clock reads its own time back. The match
register and the interrupt mask are stored and read back, but no alarm interrupt is ever raised
(as the CMOS RTC raises none on x86). The identification registers at the end of the 4 KiB
page let the guest's AMBA bus recognise the part.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

REGISTER_SIZE = 4
# PeriphID0-3 and PCellID0-3, one byte in each 32-bit register: part 0x031, designer ARM
# (0x41), revision 0; the PrimeCell id is 0xB105F00D.
PERIPH_ID = (0x31, 0x10, 0x04, 0x00)
PCELL_ID = (0x0D, 0xF0, 0x05, 0xB1)


class Reg(enum.IntEnum):
    """Register offsets."""

    DR = 0x000  # data: the current count
    MR = 0x004  # match
    LR = 0x008  # load: sets the count
    CR = 0x00C  # control: bit 0 starts the counter
    IMSC = 0x010  # interrupt mask set/clear
    RIS = 0x014  # raw interrupt status
    MIS = 0x018  # masked interrupt status
    ICR = 0x01C  # interrupt clear
    PERIPH_ID0 = 0xFE0
    PCELL_ID0 = 0xFF0


CR_START = 1


class Pl031:
    """The PL031 `BusDevice`: 32-bit registers; other accesses read as zero and write nothing."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._offset = 0  # seconds the guest's clock is ahead of the host's
        self._match = 0
        self._mask = 0

    def _now(self) -> int:
        return (int(self._clock()) + self._offset) & 0xFFFF_FFFF

    def _value(self, offset: int) -> int:
        if Reg.PERIPH_ID0 <= offset < Reg.PERIPH_ID0 + 4 * REGISTER_SIZE:
            return PERIPH_ID[(offset - Reg.PERIPH_ID0) // REGISTER_SIZE]
        if Reg.PCELL_ID0 <= offset < Reg.PCELL_ID0 + 4 * REGISTER_SIZE:
            return PCELL_ID[(offset - Reg.PCELL_ID0) // REGISTER_SIZE]
        values: dict[int, int] = {
            Reg.DR: self._now(),
            Reg.MR: self._match,
            Reg.LR: self._now(),
            Reg.CR: CR_START,  # always running
            Reg.IMSC: self._mask,
        }
        return values.get(offset, 0)  # RIS, MIS: no alarm ever fires

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != REGISTER_SIZE or offset % REGISTER_SIZE:
            data[:] = bytes(len(data))
            return
        data[:] = self._value(offset).to_bytes(REGISTER_SIZE, "little")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) != REGISTER_SIZE or offset % REGISTER_SIZE:
            return
        value = int.from_bytes(data, "little")
        if offset == Reg.LR:
            self._offset = value - int(self._clock())
        elif offset == Reg.MR:
            self._match = value
        elif offset == Reg.IMSC:
            self._mask = value & 1
