"""The one place that calls ioctl(2) on KVM file descriptors.

Calls go through libc via cffi so that pointers to cffi structs pass without copies and the
GIL is released for the duration of the call (which matters for KVM_RUN).
"""

from __future__ import annotations

import enum
from typing import Any

from pyvmm.kvm.abi import ffi, libc
from pyvmm.kvm.errors import KvmError


def ioctl(fd: int, request: enum.IntEnum, arg: Any = 0) -> int:
    """Issue `request` (a generic or an architecture's ioctl) on `fd` with an integer or a cffi
    pointer (of any of pyvmm's declarations); raise KvmError on failure."""
    carg = ffi.cast("unsigned long", arg) if isinstance(arg, int) else arg
    ret: int = libc.ioctl(fd, request, carg)
    if ret < 0:
        raise KvmError(request.name, ffi.errno)
    return ret
