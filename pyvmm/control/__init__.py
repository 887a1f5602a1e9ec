"""The control socket: `pyvmm stop|suspend|resume SOCKET` talking to a running VM."""

from pyvmm.control.client import reply_error_message, send_command
from pyvmm.control.protocol import COMMANDS, ControlError
from pyvmm.control.server import ControlHandler, ControlServer

__all__ = [
    "COMMANDS",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "reply_error_message",
    "send_command",
]
