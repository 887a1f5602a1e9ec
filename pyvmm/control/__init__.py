"""The control socket: `pyvmm stop|suspend|resume|balloon|balloon_stats ... SOCKET` talking to a
running VM."""

from pyvmm.control.client import reply_error_message, send_command
from pyvmm.control.protocol import BALLOON_COMMANDS, COMMANDS, ControlError
from pyvmm.control.server import ControlHandler, ControlServer

__all__ = [
    "BALLOON_COMMANDS",
    "COMMANDS",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "reply_error_message",
    "send_command",
]
