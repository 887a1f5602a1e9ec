"""A 16550A UART: the guest's serial console (COM1 at port 0x3F8, IRQ 4).

Transmission is instantaneous, so the transmitter is always empty. Received bytes come from the
host through `queue_input` (another thread) into an input buffer that stands in for the RX FIFO;
it is bounded, and input that does not fit is dropped and reported to the guest as an overrun.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Protocol

from pyvmm.devices.irq import IrqLine

logger = logging.getLogger(__name__)

# Host input waiting for the guest beyond this is dropped (and flagged as an overrun).
MAX_INPUT_BUFFER = 64 * 1024

DEFAULT_DIVISOR = 12  # 115200 / 12 = 9600 baud


class Register(enum.IntEnum):
    """Register offsets from the UART's base port."""

    DATA = 0  # RBR on read, THR on write; DLL when LCR.DLAB is set
    IER = 1  # DLM when LCR.DLAB is set
    IIR_FCR = 2  # IIR on read, FCR on write
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(enum.IntFlag):
    """Interrupt enable register."""

    ERBFI = 0x01  # received data available
    ETBEI = 0x02  # transmitter holding register empty
    ELSI = 0x04  # receiver line status
    EDSSI = 0x08  # modem status

    ALL = ERBFI | ETBEI | ELSI | EDSSI


class Iir(enum.IntEnum):
    """Interrupt identification values, highest priority first (bits 3:0)."""

    RECEIVER_LINE_STATUS = 0x06
    RECEIVED_DATA = 0x04
    THR_EMPTY = 0x02
    MODEM_STATUS = 0x00
    NO_INTERRUPT = 0x01


IIR_FIFO_ENABLED = 0xC0  # bits 7:6 of IIR when FCR has enabled the FIFOs


class Fcr(enum.IntFlag):
    """FIFO control register."""

    ENABLE = 0x01
    CLEAR_RX = 0x02
    CLEAR_TX = 0x04
    DMA_MODE = 0x08
    TRIGGER_LEVEL = 0xC0


class Lcr(enum.IntFlag):
    """Line control register (word length, stop bits and parity are stored, not used)."""

    BREAK = 0x40
    DLAB = 0x80


class Mcr(enum.IntFlag):
    """Modem control register."""

    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10

    ALL = DTR | RTS | OUT1 | OUT2 | LOOP


class Lsr(enum.IntFlag):
    """Line status register."""

    DR = 0x01  # data ready
    OE = 0x02  # overrun error
    PE = 0x04  # parity error
    FE = 0x08  # framing error
    BI = 0x10  # break interrupt
    THRE = 0x20  # transmitter holding register empty
    TEMT = 0x40  # transmitter empty
    FIFO_ERROR = 0x80

    ERRORS = OE | PE | FE | BI


class Msr(enum.IntFlag):
    """Modem status register: delta bits 3:0, line states 7:4."""

    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04  # trailing edge of ring indicator
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80

    DELTAS = DCTS | DDSR | TERI | DDCD


# Outside loopback the (virtual) modem is always there and ready.
MSR_CONNECTED = Msr.DCD | Msr.DSR | Msr.CTS


class SerialOutput(Protocol):
    """Where transmitted bytes go: a binary file, ideally unbuffered (e.g. `FileIO` on fd 1)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...


class Serial:
    """A 16550A UART. `read`/`write` are its `BusDevice` side; `queue_input` feeds it host input.

    Every transmitted byte is written to `out` and flushed at once, so interactive output never
    waits in a buffer; pass an unbuffered sink to make that one write syscall per byte.
    """

    def __init__(self, irq: IrqLine, out: SerialOutput) -> None:
        self._irq = irq
        self._out = out
        # queue_input runs on the stdin thread, the registers on vCPU threads.
        self._lock = threading.Lock()
        self._rx = bytearray()
        self._ier = Ier(0)
        self._fifo_enabled = False
        self._lcr = Lcr(0x03)  # 8 data bits, no parity, 1 stop bit
        self._mcr = Mcr(0)
        self._lsr_errors = Lsr(0)
        self._msr = MSR_CONNECTED
        self._scr = 0
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._thre_pending = False
        self._output_failed = False

    # BusDevice

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        with self._lock:
            data[0] = self._read_register(offset)
        for i in range(1, len(data)):
            data[i] = 0xFF

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) == 0:
            return
        with self._lock:
            self._write_register(offset, data[0])

    # Host side

    def queue_input(self, data: bytes) -> None:
        """Append host input to the receive buffer (any thread); raises RX data if enabled."""
        if not data:
            return
        with self._lock:
            self._receive(data)

    # Internals; the lock is held.

    def _read_register(self, offset: int) -> int:
        dlab = Lcr.DLAB in self._lcr
        match offset:
            case Register.DATA if dlab:
                return self._dll
            case Register.DATA:
                if not self._rx:
                    return 0
                byte = self._rx[0]
                del self._rx[0]  # O(1): bytearray drops from the front without moving data
                return byte
            case Register.IER if dlab:
                return self._dlm
            case Register.IER:
                return int(self._ier)
            case Register.IIR_FCR:
                iir = self._pending_interrupt()
                if iir == Iir.THR_EMPTY:
                    self._thre_pending = False
                return iir | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)
            case Register.LCR:
                return int(self._lcr)
            case Register.MCR:
                return int(self._mcr)
            case Register.LSR:
                lsr = self._lsr_errors | Lsr.THRE | Lsr.TEMT
                if self._rx:
                    lsr |= Lsr.DR
                self._lsr_errors = Lsr(0)
                return int(lsr)
            case Register.MSR:
                msr = self._msr
                self._msr &= ~Msr.DELTAS
                return int(msr)
            case Register.SCR:
                return self._scr
            case _:
                return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = Lcr.DLAB in self._lcr
        match offset:
            case Register.DATA if dlab:
                self._dll = value
            case Register.DATA:
                self._transmit(value)
            case Register.IER if dlab:
                self._dlm = value
            case Register.IER:
                self._set_ier(Ier(value & Ier.ALL))
            case Register.IIR_FCR:
                fcr = Fcr(value)
                self._fifo_enabled = Fcr.ENABLE in fcr
                if Fcr.CLEAR_RX in fcr:
                    self._rx.clear()
            case Register.LCR:
                self._lcr = Lcr(value)
            case Register.MCR:
                self._set_mcr(Mcr(value & Mcr.ALL))
            case Register.SCR:
                self._scr = value
            case _:
                pass  # LSR and MSR are read-only

    def _pending_interrupt(self) -> Iir:
        ier = self._ier
        if Ier.ELSI in ier and self._lsr_errors:
            return Iir.RECEIVER_LINE_STATUS
        if Ier.ERBFI in ier and self._rx:
            return Iir.RECEIVED_DATA
        if Ier.ETBEI in ier and self._thre_pending:
            return Iir.THR_EMPTY
        if Ier.EDSSI in ier and self._msr & Msr.DELTAS:
            return Iir.MODEM_STATUS
        return Iir.NO_INTERRUPT

    def _set_ier(self, ier: Ier) -> None:
        enabled = ier & ~self._ier
        self._ier = ier
        if Ier.ETBEI in enabled:
            self._thre_pending = True  # the transmitter is always empty
        elif Ier.ETBEI not in ier:
            self._thre_pending = False
        # Enabling a source whose condition already holds raises the line, as on hardware.
        if (
            (Ier.ETBEI in enabled)
            or (Ier.ERBFI in enabled and self._rx)
            or (Ier.ELSI in enabled and self._lsr_errors)
            or (Ier.EDSSI in enabled and self._msr & Msr.DELTAS)
        ):
            self._irq.trigger()

    def _set_mcr(self, mcr: Mcr) -> None:
        self._mcr = mcr
        if Mcr.LOOP in mcr:
            status = Msr(0)
            if Mcr.DTR in mcr:
                status |= Msr.DSR
            if Mcr.RTS in mcr:
                status |= Msr.CTS
            if Mcr.OUT1 in mcr:
                status |= Msr.RI
            if Mcr.OUT2 in mcr:
                status |= Msr.DCD
        else:
            status = MSR_CONNECTED
        old = self._msr
        changed = old ^ status
        deltas = Msr(0)
        if Msr.CTS in changed:
            deltas |= Msr.DCTS
        if Msr.DSR in changed:
            deltas |= Msr.DDSR
        if Msr.DCD in changed:
            deltas |= Msr.DDCD
        if Msr.RI in old and Msr.RI not in status:
            deltas |= Msr.TERI
        self._msr = status | (old & Msr.DELTAS) | deltas
        if deltas and Ier.EDSSI in self._ier:
            self._irq.trigger()

    def _transmit(self, byte: int) -> None:
        self._thre_pending = False
        if Mcr.LOOP in self._mcr:
            self._receive(bytes((byte,)))
        else:
            self._emit(bytes((byte,)))
        if Ier.ETBEI in self._ier:
            self._thre_pending = True
            self._irq.trigger()

    def _emit(self, data: bytes) -> None:
        try:
            self._out.write(data)
            self._out.flush()
        except OSError as e:
            # A closed or broken console must not take the vCPU down; say so once.
            if not self._output_failed:
                logger.warning("serial output failed, dropping console output: %s", e)
                self._output_failed = True

    def _receive(self, data: bytes) -> None:
        room = MAX_INPUT_BUFFER - len(self._rx)
        accepted = data[: max(room, 0)]
        self._rx += accepted
        trigger = bool(accepted) and Ier.ERBFI in self._ier
        if len(accepted) < len(data):
            self._lsr_errors |= Lsr.OE
            trigger = trigger or Ier.ELSI in self._ier
        if trigger:
            self._irq.trigger()
