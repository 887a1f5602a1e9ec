"""An i8042 PS/2 controller with a keyboard that never types: how x86 guests reboot (command 0xFE).

It emulates enough of the controller and the keyboard's command set for Linux's i8042 and atkbd
drivers to find a keyboard port without errors or timeouts. There is no auxiliary (mouse) port:
the aux interface test reports a stuck clock line, and the aux loopback answers at once with a
byte that is not the one sent, so Linux settles on "no aux port" without waiting out its timeout.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable

from pyvmm.devices.irq import IrqLine

logger = logging.getLogger(__name__)

# Responses queued beyond this are dropped; a guest that never reads must not grow us.
MAX_OUTPUT_QUEUE = 16


class Port(enum.IntEnum):
    """Offsets from the device base (0x60)."""

    DATA = 0  # port 0x60
    STATUS_COMMAND = 4  # port 0x64: status on read, controller command on write


class Status(enum.IntFlag):
    """Status register (read from port 0x64)."""

    OBF = 0x01  # output buffer full: the data port has a byte for the guest
    IBF = 0x02  # input buffer full: the controller has not taken the last write yet
    SYS = 0x04  # system flag, set once the self-test passed
    CMD = 0x08  # the last write went to the command port (else the data port)
    KEYLOCK = 0x10  # keyboard not inhibited (the bit is set when the keylock is off)
    AUXDATA = 0x20  # the byte in the output buffer came from the aux port
    TIMEOUT = 0x40
    PARITY = 0x80


class ControlByte(enum.IntFlag):
    """The controller command byte (read with 0x20, written with 0x60)."""

    KBDINT = 0x01  # raise IRQ 1 when keyboard data arrives
    AUXINT = 0x02  # raise IRQ 12 when aux data arrives
    SYS = 0x04
    IGNKEYLOCK = 0x08
    KBDDIS = 0x10
    AUXDIS = 0x20
    XLATE = 0x40  # translate scan code set 2 to set 1 (not done here: see DEFAULT_CONTROL)


# Keyboard interrupt on, aux disabled (there is none), no translation: Linux then talks to the
# keyboard directly, which is what we model.
DEFAULT_CONTROL = ControlByte.KBDINT | ControlByte.SYS | ControlByte.AUXDIS


class Command(enum.IntEnum):
    """Controller commands written to port 0x64."""

    READ_CONTROL = 0x20
    WRITE_CONTROL = 0x60
    DISABLE_AUX = 0xA7
    ENABLE_AUX = 0xA8
    TEST_AUX = 0xA9
    SELF_TEST = 0xAA
    TEST_KEYBOARD = 0xAB
    DISABLE_KEYBOARD = 0xAD
    ENABLE_KEYBOARD = 0xAE
    READ_OUTPUT_PORT = 0xD0
    WRITE_OUTPUT_PORT = 0xD1
    WRITE_KEYBOARD_OUTPUT = 0xD2
    WRITE_AUX_OUTPUT = 0xD3  # aux loopback: the byte comes back as if from the aux port
    WRITE_TO_AUX = 0xD4
    RESET = 0xFE


class KeyboardCommand(enum.IntEnum):
    """Commands the guest sends to the keyboard through port 0x60."""

    SET_LEDS = 0xED
    ECHO = 0xEE
    SCAN_CODE_SET = 0xF0
    IDENTIFY = 0xF2
    SET_TYPEMATIC = 0xF3
    ENABLE_SCANNING = 0xF4
    DISABLE_SCANNING = 0xF5
    SET_DEFAULTS = 0xF6
    RESEND = 0xFE
    RESET = 0xFF


# Keyboard commands that take one argument byte on the data port.
KEYBOARD_COMMANDS_WITH_ARGUMENT = frozenset(
    {KeyboardCommand.SET_LEDS, KeyboardCommand.SCAN_CODE_SET, KeyboardCommand.SET_TYPEMATIC}
)


class Response(enum.IntEnum):
    """Bytes the controller and the keyboard answer with."""

    SELF_TEST_PASSED = 0x55
    INTERFACE_OK = 0x00
    INTERFACE_CLOCK_STUCK_HIGH = 0x02
    AUX_LOOPBACK_FAILED = 0xFF
    ACK = 0xFA
    BAT_PASSED = 0xAA  # keyboard basic assurance test, after a reset
    KEYBOARD_ID_1 = 0xAB  # an MF2 keyboard identifies as 0xAB 0x83
    KEYBOARD_ID_2 = 0x83
    SCAN_CODE_SET_2 = 0x02


class OutputPort(enum.IntFlag):
    """The controller output port (0xD0 / 0xD1)."""

    SYSTEM_RESET = 0x01  # active low: clearing it resets the machine
    A20_GATE = 0x02


DEFAULT_OUTPUT_PORT = OutputPort.SYSTEM_RESET | OutputPort.A20_GATE


class I8042:
    """The controller at ports 0x60 and 0x64 (base 0x60, length 5); a `BusDevice`.

    `on_reset` is called when the guest asks for a system reset. `irq`, if given, is raised for
    each byte that reaches the output buffer while the command byte enables the keyboard interrupt.
    """

    def __init__(self, on_reset: Callable[[], None], irq: IrqLine | None = None) -> None:
        self._on_reset = on_reset
        self._irq = irq
        self._control = DEFAULT_CONTROL
        self._output_port = DEFAULT_OUTPUT_PORT
        self._status = Status.KEYLOCK | Status.SYS
        # The byte the guest reads now is the head; the flag says it came from the aux port.
        self._output: collections.deque[tuple[int, bool]] = collections.deque()
        self._last_output = 0
        # A controller command waiting for its argument on the data port.
        self._pending_command: Command | None = None
        # A keyboard command waiting for its argument.
        self._pending_keyboard: KeyboardCommand | None = None

    # BusDevice

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        match offset:
            case Port.DATA:
                data[0] = self._read_data()
            case Port.STATUS_COMMAND:
                data[0] = self._read_status()
            case _:
                data[0] = 0xFF
        for i in range(1, len(data)):
            data[i] = 0xFF

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) == 0:
            return
        match offset:
            case Port.DATA:
                self._status &= ~Status.CMD
                self._write_data(data[0])
            case Port.STATUS_COMMAND:
                self._status |= Status.CMD
                self._command(data[0])
            case _:
                pass

    # Internals

    def _read_status(self) -> int:
        status = self._status
        if self._output:
            status |= Status.OBF
            if self._output[0][1]:
                status |= Status.AUXDATA
        return int(status)

    def _read_data(self) -> int:
        if not self._output:
            return self._last_output
        byte, _ = self._output.popleft()
        self._last_output = byte
        if self._output:
            self._landed()  # the next byte moves into the output buffer
        return byte

    def _push(self, byte: int, aux: bool = False) -> None:
        if len(self._output) >= MAX_OUTPUT_QUEUE:
            logger.debug("i8042: output queue full, dropping %#04x", byte)
            return
        self._output.append((byte, aux))
        if len(self._output) == 1:
            self._landed()

    def _landed(self) -> None:
        """The head of the queue has just become visible in the output buffer."""
        if self._output[0][1]:
            return  # aux data would go to IRQ 12, which we do not have
        if self._irq is not None and ControlByte.KBDINT in self._control:
            self._irq.trigger()

    def _reset(self) -> None:
        logger.info("i8042: guest requested a system reset")
        self._on_reset()

    def _command(self, value: int) -> None:
        self._pending_command = None
        try:
            command = Command(value)
        except ValueError:
            logger.debug("i8042: ignoring unknown controller command %#04x", value)
            return
        match command:
            case Command.READ_CONTROL:
                self._push(int(self._control))
            case (
                Command.WRITE_CONTROL
                | Command.WRITE_OUTPUT_PORT
                | Command.WRITE_KEYBOARD_OUTPUT
                | Command.WRITE_AUX_OUTPUT
                | Command.WRITE_TO_AUX
            ):
                self._pending_command = command
            case Command.DISABLE_AUX:
                self._control |= ControlByte.AUXDIS
            case Command.ENABLE_AUX:
                self._control &= ~ControlByte.AUXDIS
            case Command.TEST_AUX:
                self._push(Response.INTERFACE_CLOCK_STUCK_HIGH)
            case Command.SELF_TEST:
                self._status |= Status.SYS
                self._push(Response.SELF_TEST_PASSED)
            case Command.TEST_KEYBOARD:
                self._push(Response.INTERFACE_OK)
            case Command.DISABLE_KEYBOARD:
                self._control |= ControlByte.KBDDIS
            case Command.ENABLE_KEYBOARD:
                self._control &= ~ControlByte.KBDDIS
            case Command.READ_OUTPUT_PORT:
                self._push(int(self._output_port))
            case Command.RESET:
                self._reset()

    def _write_data(self, value: int) -> None:
        command, self._pending_command = self._pending_command, None
        match command:
            case None:
                self._keyboard(value)
            case Command.WRITE_CONTROL:
                enabled = ControlByte(value & 0x7F) & ~self._control
                self._control = ControlByte(value & 0x7F)
                if ControlByte.KBDINT in enabled and self._output:
                    self._landed()  # the interrupt line rises on a byte already waiting
                if ControlByte.SYS in self._control:
                    self._status |= Status.SYS
                else:
                    self._status &= ~Status.SYS
            case Command.WRITE_OUTPUT_PORT:
                self._output_port = OutputPort(value)
                if OutputPort.SYSTEM_RESET not in self._output_port:
                    self._reset()
            case Command.WRITE_KEYBOARD_OUTPUT:
                self._push(value)
            case Command.WRITE_AUX_OUTPUT:
                # No aux port, so nothing loops back; answering at once beats a guest timeout.
                self._push(Response.AUX_LOOPBACK_FAILED, aux=True)
            case Command.WRITE_TO_AUX:
                logger.debug("i8042: dropping %#04x sent to the missing aux port", value)

    def _keyboard(self, value: int) -> None:
        pending, self._pending_keyboard = self._pending_keyboard, None
        if pending is not None:
            self._push(Response.ACK)
            if pending == KeyboardCommand.SCAN_CODE_SET and value == 0:
                self._push(Response.SCAN_CODE_SET_2)
            return
        try:
            command = KeyboardCommand(value)
        except ValueError:
            self._push(Response.ACK)
            return
        match command:
            case KeyboardCommand.ECHO:
                self._push(KeyboardCommand.ECHO)
            case KeyboardCommand.RESEND:
                self._push(self._last_output)
            case KeyboardCommand.RESET:
                self._push(Response.ACK)
                self._push(Response.BAT_PASSED)
            case KeyboardCommand.IDENTIFY:
                self._push(Response.ACK)
                self._push(Response.KEYBOARD_ID_1)
                self._push(Response.KEYBOARD_ID_2)
            case _:
                if command in KEYBOARD_COMMANDS_WITH_ARGUMENT:
                    self._pending_keyboard = command
                self._push(Response.ACK)
