"""Behaviour of the 16550A UART as a guest driver and the console user see it."""

from __future__ import annotations

import io
import threading

import pytest

from pyvmm.devices.serial import (
    DEFAULT_DIVISOR,
    IIR_FIFO_ENABLED,
    MAX_INPUT_BUFFER,
    Fcr,
    Ier,
    Iir,
    Lcr,
    Lsr,
    Mcr,
    Msr,
    Register,
    Serial,
)


class CountingIrq:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class RecordingOut:
    """Records each write and whether it was flushed before the next one."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.unflushed = 0

    def write(self, data: bytes, /) -> int:
        self.data += data
        self.unflushed += len(data)
        return len(data)

    def flush(self) -> None:
        self.unflushed = 0


@pytest.fixture
def irq() -> CountingIrq:
    return CountingIrq()


@pytest.fixture
def out() -> RecordingOut:
    return RecordingOut()


@pytest.fixture
def uart(irq: CountingIrq, out: RecordingOut) -> Serial:
    return Serial(irq, out)


def rd(dev: Serial, reg: int) -> int:
    buf = bytearray(1)
    dev.read(reg, memoryview(buf))
    return buf[0]


def wr(dev: Serial, reg: int, value: int) -> None:
    dev.write(reg, bytes([value]))


def iir_id(dev: Serial) -> int:
    return rd(dev, Register.IIR_FCR) & 0x0F


def test_transmit_goes_to_out_flushed(uart: Serial, out: RecordingOut) -> None:
    for b in b"login: ":
        wr(uart, Register.DATA, b)
    assert bytes(out.data) == b"login: "
    assert out.unflushed == 0  # a prompt without newline is visible at once


def test_output_error_does_not_escape() -> None:
    class Broken:
        def write(self, data: bytes, /) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            pass

    dev = Serial(CountingIrq(), Broken())
    wr(dev, Register.DATA, ord("x"))
    wr(dev, Register.DATA, ord("y"))
    assert rd(dev, Register.LSR) & Lsr.THRE


def test_works_with_binary_file() -> None:
    sink = io.BytesIO()
    dev = Serial(CountingIrq(), sink)
    wr(dev, Register.DATA, ord("A"))
    assert sink.getvalue() == b"A"


def test_lsr_idle(uart: Serial) -> None:
    assert rd(uart, Register.LSR) == Lsr.THRE | Lsr.TEMT


def test_input_sets_data_ready_and_reads_in_order(uart: Serial) -> None:
    uart.queue_input(b"ab")
    assert rd(uart, Register.LSR) & Lsr.DR
    assert rd(uart, Register.DATA) == ord("a")
    assert rd(uart, Register.DATA) == ord("b")
    assert not rd(uart, Register.LSR) & Lsr.DR


def test_rx_interrupt_only_when_enabled(uart: Serial, irq: CountingIrq) -> None:
    uart.queue_input(b"x")
    assert irq.count == 0
    assert iir_id(uart) == Iir.NO_INTERRUPT
    rd(uart, Register.DATA)
    wr(uart, Register.IER, Ier.ERBFI)
    uart.queue_input(b"y")
    assert irq.count == 1
    assert iir_id(uart) == Iir.RECEIVED_DATA
    rd(uart, Register.DATA)
    assert iir_id(uart) == Iir.NO_INTERRUPT


def test_enabling_rx_interrupt_with_data_waiting_raises_it(uart: Serial, irq: CountingIrq) -> None:
    uart.queue_input(b"x")
    wr(uart, Register.IER, Ier.ERBFI)
    assert irq.count == 1
    assert iir_id(uart) == Iir.RECEIVED_DATA


def test_thre_interrupt_on_enable_and_after_each_write(uart: Serial, irq: CountingIrq) -> None:
    wr(uart, Register.IER, Ier.ETBEI)
    assert irq.count == 1
    assert iir_id(uart) == Iir.THR_EMPTY
    # Reading IIR while it reports THRE clears it.
    assert iir_id(uart) == Iir.NO_INTERRUPT
    wr(uart, Register.DATA, ord("a"))
    assert irq.count == 2
    assert iir_id(uart) == Iir.THR_EMPTY


def test_reenabling_thre_raises_it_again(uart: Serial, irq: CountingIrq) -> None:
    # Linux's 8250 driver checks this to rule out the "THRE bug".
    wr(uart, Register.IER, Ier.ETBEI)
    assert iir_id(uart) == Iir.THR_EMPTY
    wr(uart, Register.IER, 0)
    assert iir_id(uart) == Iir.NO_INTERRUPT
    wr(uart, Register.IER, Ier.ETBEI)
    assert iir_id(uart) == Iir.THR_EMPTY
    assert irq.count == 2


def test_disabling_thre_clears_pending(uart: Serial) -> None:
    wr(uart, Register.IER, Ier.ETBEI)
    wr(uart, Register.IER, 0)
    wr(uart, Register.IER, Ier.ERBFI)
    assert iir_id(uart) == Iir.NO_INTERRUPT


def test_iir_priority(uart: Serial) -> None:
    wr(uart, Register.IER, Ier.ALL)
    wr(uart, Register.MCR, Mcr.LOOP | Mcr.RTS)  # CTS changes: modem status pending
    uart.queue_input(b"x" * (MAX_INPUT_BUFFER + 1))  # data and an overrun
    assert iir_id(uart) == Iir.RECEIVER_LINE_STATUS
    assert rd(uart, Register.LSR) & Lsr.OE  # reading LSR clears the error
    assert iir_id(uart) == Iir.RECEIVED_DATA
    wr(uart, Register.IIR_FCR, Fcr.ENABLE | Fcr.CLEAR_RX)
    assert iir_id(uart) == Iir.THR_EMPTY  # this read clears THRE
    assert iir_id(uart) == Iir.MODEM_STATUS
    rd(uart, Register.MSR)
    assert iir_id(uart) == Iir.NO_INTERRUPT


def test_reading_iir_does_not_clear_thre_when_other_source_reported(uart: Serial) -> None:
    wr(uart, Register.IER, Ier.ERBFI | Ier.ETBEI)
    uart.queue_input(b"x")
    assert iir_id(uart) == Iir.RECEIVED_DATA
    rd(uart, Register.DATA)
    assert iir_id(uart) == Iir.THR_EMPTY


def test_fifo_enable_shows_in_iir(uart: Serial) -> None:
    assert rd(uart, Register.IIR_FCR) & IIR_FIFO_ENABLED == 0
    wr(uart, Register.IIR_FCR, Fcr.ENABLE)
    assert rd(uart, Register.IIR_FCR) == IIR_FIFO_ENABLED | Iir.NO_INTERRUPT
    wr(uart, Register.IIR_FCR, 0)
    assert rd(uart, Register.IIR_FCR) == Iir.NO_INTERRUPT


def test_fcr_clear_rx_empties_fifo(uart: Serial) -> None:
    uart.queue_input(b"abc")
    wr(uart, Register.IIR_FCR, Fcr.ENABLE | Fcr.CLEAR_RX)
    assert not rd(uart, Register.LSR) & Lsr.DR
    uart.queue_input(b"d")
    assert rd(uart, Register.DATA) == ord("d")


def test_divisor_latch(uart: Serial) -> None:
    wr(uart, Register.LCR, Lcr.DLAB | 0x03)
    assert rd(uart, Register.DATA) == DEFAULT_DIVISOR
    assert rd(uart, Register.IER) == 0
    wr(uart, Register.DATA, 0x01)
    wr(uart, Register.IER, 0x02)
    assert rd(uart, Register.DATA) == 0x01
    assert rd(uart, Register.IER) == 0x02
    wr(uart, Register.LCR, 0x03)
    # With DLAB clear the same offsets are the data and interrupt-enable registers again.
    assert rd(uart, Register.IER) == 0
    assert rd(uart, Register.LCR) == 0x03


def test_divisor_write_is_not_output(uart: Serial, out: RecordingOut) -> None:
    wr(uart, Register.LCR, Lcr.DLAB)
    wr(uart, Register.DATA, 0x55)
    assert out.data == b""


def test_ier_keeps_low_four_bits(uart: Serial) -> None:
    wr(uart, Register.IER, 0xFF)
    assert rd(uart, Register.IER) == 0x0F
    wr(uart, Register.IER, 0)
    assert rd(uart, Register.IER) == 0


def test_scratch_register(uart: Serial) -> None:
    wr(uart, Register.SCR, 0xA5)
    assert rd(uart, Register.SCR) == 0xA5


def test_msr_outside_loopback(uart: Serial) -> None:
    assert rd(uart, Register.MSR) == Msr.DCD | Msr.DSR | Msr.CTS


def test_loopback_msr_follows_mcr(uart: Serial) -> None:
    # The 8250 driver's probe: LOOP|OUT2|RTS must read back as DCD|CTS.
    wr(uart, Register.MCR, Mcr.LOOP | Mcr.OUT2 | Mcr.RTS)
    assert rd(uart, Register.MSR) & 0xF0 == Msr.DCD | Msr.CTS
    wr(uart, Register.MCR, Mcr.LOOP | Mcr.DTR | Mcr.OUT1)
    assert rd(uart, Register.MSR) & 0xF0 == Msr.DSR | Msr.RI
    wr(uart, Register.MCR, Mcr.LOOP)
    msr = rd(uart, Register.MSR)
    assert msr & 0xF0 == 0
    assert msr & Msr.TERI
    assert rd(uart, Register.MSR) & Msr.DELTAS == 0  # reading cleared the deltas


def test_loopback_data_goes_to_rx_not_out(
    uart: Serial, out: RecordingOut, irq: CountingIrq
) -> None:
    wr(uart, Register.MCR, Mcr.LOOP)
    wr(uart, Register.IER, Ier.ERBFI)
    wr(uart, Register.DATA, 0x5A)
    assert out.data == b""
    assert irq.count == 1
    assert rd(uart, Register.LSR) & Lsr.DR
    assert rd(uart, Register.DATA) == 0x5A
    wr(uart, Register.MCR, 0)
    wr(uart, Register.DATA, ord("z"))
    assert bytes(out.data) == b"z"


def test_modem_status_interrupt(uart: Serial, irq: CountingIrq) -> None:
    wr(uart, Register.IER, Ier.EDSSI)
    wr(uart, Register.MCR, Mcr.LOOP | Mcr.DTR)
    assert irq.count == 1
    assert iir_id(uart) == Iir.MODEM_STATUS


def test_input_is_bounded_and_overrun_reported(uart: Serial, irq: CountingIrq) -> None:
    wr(uart, Register.IER, Ier.ELSI)
    uart.queue_input(b"a" * MAX_INPUT_BUFFER)
    assert irq.count == 0
    uart.queue_input(b"b")
    assert irq.count == 1
    assert iir_id(uart) == Iir.RECEIVER_LINE_STATUS
    lsr = rd(uart, Register.LSR)
    assert lsr & Lsr.OE
    assert not rd(uart, Register.LSR) & Lsr.OE
    received = bytes(rd(uart, Register.DATA) for _ in range(MAX_INPUT_BUFFER))
    assert received == b"a" * MAX_INPUT_BUFFER
    assert not rd(uart, Register.LSR) & Lsr.DR


def test_wide_access_is_byte_access(uart: Serial, out: RecordingOut) -> None:
    wr(uart, Register.SCR, 0x42)
    buf = bytearray(4)
    uart.read(Register.SCR, memoryview(buf))
    assert bytes(buf) == b"\x42\xff\xff\xff"
    uart.write(Register.DATA, b"AB")
    assert bytes(out.data) == b"A"


def test_queue_input_from_another_thread(uart: Serial) -> None:
    chunks = [bytes([i]) * 100 for i in range(50)]

    def feed() -> None:
        for c in chunks:
            uart.queue_input(c)

    t = threading.Thread(target=feed)
    t.start()
    received = bytearray()
    while t.is_alive() or rd(uart, Register.LSR) & Lsr.DR:
        if rd(uart, Register.LSR) & Lsr.DR:
            received.append(rd(uart, Register.DATA))
    t.join()
    assert bytes(received) == b"".join(chunks)
