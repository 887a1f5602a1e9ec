"""The architecture of the machine pyvmm runs on; its guests are of the same architecture."""

from __future__ import annotations

import os

from pyvmm.arch.interface import Arch


class UnsupportedArchError(Exception):
    """pyvmm has no support for this host's architecture."""


def host_arch() -> Arch:
    machine = os.uname().machine
    if machine == "x86_64":
        from pyvmm.arch.x86_64.machine import X86_64

        return X86_64()
    if machine == "aarch64":
        from pyvmm.arch.aarch64.machine import Aarch64

        return Aarch64()
    raise UnsupportedArchError(f"pyvmm does not run on {machine} hosts (x86_64 and aarch64 only)")
