"""Behaviour of the i8042 controller as Linux's i8042/atkbd drivers and a rebooting guest see it."""

from __future__ import annotations

import pytest

from pyvmm.devices.i8042 import (
    I8042,
    Command,
    ControlByte,
    KeyboardCommand,
    OutputPort,
    Port,
    Response,
    Status,
)


class CountingIrq:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class Machine:
    def __init__(self) -> None:
        self.resets = 0
        self.irq = CountingIrq()
        self.dev = I8042(self.on_reset, self.irq)

    def on_reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        buf = bytearray(1)
        self.dev.read(Port.STATUS_COMMAND, memoryview(buf))
        return buf[0]

    def data(self) -> int:
        buf = bytearray(1)
        self.dev.read(Port.DATA, memoryview(buf))
        return buf[0]

    def command(self, cmd: int, *args: int) -> None:
        assert not self.status() & Status.IBF
        self.dev.write(Port.STATUS_COMMAND, bytes([cmd]))
        for a in args:
            assert not self.status() & Status.IBF
            self.dev.write(Port.DATA, bytes([a]))

    def send(self, *values: int) -> None:
        for v in values:
            assert not self.status() & Status.IBF
            self.dev.write(Port.DATA, bytes([v]))

    def drain(self) -> list[int]:
        """Read the output buffer the way Linux's i8042_flush does."""
        out = []
        for _ in range(32):
            if not self.status() & Status.OBF:
                break
            out.append(self.data())
        return out


@pytest.fixture
def m() -> Machine:
    return Machine()


def test_reset_command(m: Machine) -> None:
    m.command(Command.RESET)
    assert m.resets == 1


def test_output_port_reset_line(m: Machine) -> None:
    m.command(Command.READ_OUTPUT_PORT)
    port = m.data()
    assert port & OutputPort.SYSTEM_RESET
    m.command(Command.WRITE_OUTPUT_PORT, port | OutputPort.A20_GATE)
    assert m.resets == 0
    m.command(Command.WRITE_OUTPUT_PORT, port & ~OutputPort.SYSTEM_RESET)
    assert m.resets == 1


def test_idle_status(m: Machine) -> None:
    status = m.status()
    assert not status & (Status.OBF | Status.IBF)
    assert status & Status.KEYLOCK  # Linux warns "Keylock active" otherwise


def test_self_test(m: Machine) -> None:
    m.command(Command.SELF_TEST)
    assert m.status() & Status.OBF
    assert m.data() == Response.SELF_TEST_PASSED
    assert m.status() & Status.SYS
    assert not m.status() & Status.OBF


def test_keyboard_interface_test(m: Machine) -> None:
    m.command(Command.TEST_KEYBOARD)
    assert m.drain() == [0x00]


def test_command_byte_round_trip(m: Machine) -> None:
    m.command(Command.READ_CONTROL)
    ctr = m.data()
    assert ctr & ControlByte.KBDINT
    new = (ctr | ControlByte.KBDDIS) & ~ControlByte.KBDINT
    m.command(Command.WRITE_CONTROL, new)
    m.command(Command.READ_CONTROL)
    assert m.data() == new


def test_keyboard_and_aux_enable_bits(m: Machine) -> None:
    m.command(Command.DISABLE_KEYBOARD)
    m.command(Command.DISABLE_AUX)
    m.command(Command.READ_CONTROL)
    ctr = m.data()
    assert ctr & ControlByte.KBDDIS and ctr & ControlByte.AUXDIS
    m.command(Command.ENABLE_KEYBOARD)
    m.command(Command.ENABLE_AUX)
    m.command(Command.READ_CONTROL)
    ctr = m.data()
    assert not ctr & (ControlByte.KBDDIS | ControlByte.AUXDIS)


def test_no_aux_port_as_linux_probes_it(m: Machine) -> None:
    # i8042_check_aux: the loopback must answer promptly, flagged as aux data, and differ...
    m.command(Command.WRITE_AUX_OUTPUT, 0x5A)
    assert m.status() & (Status.OBF | Status.AUXDATA) == Status.OBF | Status.AUXDATA
    assert m.data() != 0x5A
    # ...then the interface test must report an error that is not 0x00/0xFA/0xFF.
    m.command(Command.TEST_AUX)
    result = m.data()
    assert result not in (0x00, 0xFA, 0xFF)
    assert not m.status() & Status.OBF


def test_write_to_aux_is_dropped(m: Machine) -> None:
    m.command(Command.WRITE_TO_AUX, 0xF4)
    assert m.drain() == []


def test_write_keyboard_output_buffer(m: Machine) -> None:
    m.command(Command.WRITE_KEYBOARD_OUTPUT, 0x1C)
    assert m.status() & (Status.OBF | Status.AUXDATA) == Status.OBF
    assert m.data() == 0x1C


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ((KeyboardCommand.RESET,), [Response.ACK, Response.BAT_PASSED]),
        ((KeyboardCommand.IDENTIFY,), [Response.ACK, 0xAB, 0x83]),
        ((KeyboardCommand.ENABLE_SCANNING,), [Response.ACK]),
        ((KeyboardCommand.DISABLE_SCANNING,), [Response.ACK]),
        ((KeyboardCommand.SET_LEDS, 0x07), [Response.ACK, Response.ACK]),
        ((KeyboardCommand.SET_TYPEMATIC, 0x20), [Response.ACK, Response.ACK]),
        ((KeyboardCommand.SCAN_CODE_SET, 0x00), [Response.ACK, Response.ACK, 0x02]),
        ((KeyboardCommand.ECHO,), [0xEE]),
        ((0xE8,), [Response.ACK]),
    ],
)
def test_keyboard_commands(m: Machine, sent: tuple[int, ...], expected: list[int]) -> None:
    m.send(*sent)
    assert m.drain() == expected


def test_led_argument_is_not_a_command(m: Machine) -> None:
    # 0xFF after 0xED is the LED mask, not a keyboard reset.
    m.send(KeyboardCommand.SET_LEDS, 0xFF)
    assert m.drain() == [Response.ACK, Response.ACK]


def test_irq_per_byte_with_keyboard_interrupt_enabled(m: Machine) -> None:
    m.send(KeyboardCommand.IDENTIFY)
    assert m.irq.count == 1  # the first byte landed in the output buffer
    m.data()
    assert m.irq.count == 2
    m.data()
    assert m.irq.count == 3
    m.data()
    assert m.irq.count == 3


def test_no_irq_with_keyboard_interrupt_disabled(m: Machine) -> None:
    m.command(Command.WRITE_CONTROL, ControlByte.SYS)
    m.send(KeyboardCommand.RESET)
    assert m.drain() == [Response.ACK, Response.BAT_PASSED]
    assert m.irq.count == 0


def test_enabling_keyboard_interrupt_with_data_waiting_raises_it(m: Machine) -> None:
    m.command(Command.WRITE_CONTROL, ControlByte.SYS)
    m.command(Command.WRITE_KEYBOARD_OUTPUT, 0x1C)
    assert m.irq.count == 0
    m.command(Command.WRITE_CONTROL, ControlByte.SYS | ControlByte.KBDINT)
    assert m.irq.count == 1


def test_empty_data_read_returns_last_byte(m: Machine) -> None:
    assert m.data() == 0
    m.command(Command.SELF_TEST)
    m.data()
    assert m.data() == Response.SELF_TEST_PASSED


def test_cmd_status_bit_tracks_last_port_written(m: Machine) -> None:
    m.command(Command.READ_CONTROL)
    assert m.status() & Status.CMD
    m.send(KeyboardCommand.ENABLE_SCANNING)
    assert not m.status() & Status.CMD


def test_output_queue_is_bounded(m: Machine) -> None:
    for _ in range(1000):
        m.send(KeyboardCommand.IDENTIFY)
    assert 0 < len(m.drain()) <= 32


def test_linux_like_probe(m: Machine) -> None:
    """The order of Linux's i8042 probe and atkbd's first commands; no step may go unanswered."""
    assert m.drain() == []
    m.command(Command.SELF_TEST)
    assert m.data() == 0x55
    m.command(Command.READ_CONTROL)
    ctr = m.data()
    m.command(Command.READ_CONTROL)
    assert m.data() == ctr
    ctr = (ctr | ControlByte.KBDDIS) & ~ControlByte.KBDINT
    m.command(Command.WRITE_CONTROL, ctr)
    assert m.drain() == []
    m.command(Command.WRITE_AUX_OUTPUT, 0x5A)
    assert m.data() != 0x5A
    m.command(Command.TEST_AUX)
    assert m.data() not in (0x00, 0xFA, 0xFF)
    m.command(Command.TEST_KEYBOARD)
    assert m.data() == 0x00
    ctr = (ctr & ~ControlByte.KBDDIS) | ControlByte.KBDINT
    m.command(Command.WRITE_CONTROL, ctr)
    irqs = m.irq.count
    m.send(KeyboardCommand.IDENTIFY)
    assert m.drain() == [0xFA, 0xAB, 0x83]
    assert m.irq.count == irqs + 3
    m.send(KeyboardCommand.SET_LEDS, 0)
    assert m.drain() == [0xFA, 0xFA]
    m.send(KeyboardCommand.ENABLE_SCANNING)
    assert m.drain() == [0xFA]


def test_works_without_irq() -> None:
    dev = I8042(lambda: None)
    dev.write(Port.DATA, bytes([KeyboardCommand.RESET]))
    buf = bytearray(1)
    dev.read(Port.DATA, memoryview(buf))
    assert buf[0] == Response.ACK


def test_wide_access(m: Machine) -> None:
    m.command(Command.SELF_TEST)
    buf = bytearray(2)
    m.dev.read(Port.DATA, memoryview(buf))
    assert bytes(buf) == b"\x55\xff"
