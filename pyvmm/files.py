"""Opening the files a user names (kernel, initrd, disk images) without ever blocking.

A plain open() of a FIFO waits for a writer, and opening some character devices has effects of
its own, so the type is looked at before the open (stat) and again on the open file (fstat: the
path may have changed in between). The open itself is non-blocking; the flag is cleared once
the file is known to be one pyvmm can use.
"""

from __future__ import annotations

import fcntl
import os
import stat


class FileKindError(Exception):
    """The path names something other than the kind of file wanted; the message says what."""


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words (for error messages)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def check_kind(mode: int, block_device_ok: bool = False) -> None:
    """Raise FileKindError unless `mode` is a regular file (or, if allowed, a block device)."""
    if stat.S_ISREG(mode) or (block_device_ok and stat.S_ISBLK(mode)):
        return
    wanted = "a regular file or block device" if block_device_ok else "a regular file"
    raise FileKindError(f"is {kind_of(mode)}; expected {wanted}")


def open_file(path: str, writable: bool = False, block_device_ok: bool = False) -> int:
    """Open `path` read-only (or read-write) as a close-on-exec fd, refusing every kind of file
    but a regular one (and block devices, if `block_device_ok`) without blocking on any.

    Raises OSError when the path cannot be opened and FileKindError for a wrong kind."""
    check_kind(os.stat(path).st_mode, block_device_ok)
    access = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(path, access | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        check_kind(os.fstat(fd).st_mode, block_device_ok)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
