"""A validated, typed VM configuration: user errors are found here, once, before any KVM work."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pyvmm.arch.x86_64.mptable import max_cpus

DEFAULT_MEM_MIB = 256
DEFAULT_CPUS = 1
MIN_MEM_MIB = 2
# Guest RAM above 4 GiB is not limited by pyvmm; this keeps typos like `-m 1000000` from
# reserving a terabyte of address space.
MAX_MEM_MIB = 1 << 20


class ConfigError(Exception):
    """A user-supplied setting is invalid; the message names the flag or file at fault."""


@dataclass(frozen=True)
class VmConfig:
    kernel: str
    mem_mib: int = DEFAULT_MEM_MIB
    cpus: int = DEFAULT_CPUS
    params: tuple[str, ...] = field(default_factory=tuple)
    initrd: str | None = None
    kvm_path: str = "/dev/kvm"

    @property
    def mem_bytes(self) -> int:
        return self.mem_mib << 20

    def validate(self) -> VmConfig:
        """Raise ConfigError for the first bad setting; return self so calls can chain."""
        _check_readable_file(self.kernel, "KERNEL")
        if self.initrd is not None:
            _check_readable_file(self.initrd, "-i/--initrd")
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(
                f"-m/--mem {self.mem_mib}: guest memory must be {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB"
            )
        limit = max_cpus()
        if not 1 <= self.cpus <= limit:
            raise ConfigError(f"-c/--cpus {self.cpus}: pyvmm runs 1 to {limit} vCPUs")
        for p in self.params:
            if not p.isprintable() or not p.isascii():
                raise ConfigError(f"-p/--params {p!r}: kernel parameters must be printable ASCII")
        return self


def _check_readable_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path}: is a directory")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path}: permission denied")
