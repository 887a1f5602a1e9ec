"""A KVM vCPU on any architecture: `run()`, which returns a typed exit, and ONE_REG access.

What only x86 has (regs, sregs, CPUID, MSRs, the LAPIC) is in `pyvmm.kvm.x86_64`; arm64's vCPU
init and register ids are in `pyvmm.kvm.aarch64`.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from pyvmm.kvm.abi import KVM_EXIT_IO_OUT, ExitReason, Ioctl, ffi, libc, struct_for
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.ioctl import ioctl


@dataclass(slots=True)
class IoExit:
    """Port I/O: `data` is the kvm_run buffer to read (out) or fill (in), size*count bytes."""

    port: int
    size: int
    count: int
    is_write: bool
    data: memoryview


@dataclass
class MmioExit:
    """MMIO: for a read, fill `data` (len bytes) before the next run."""

    addr: int
    is_write: bool
    data: memoryview


@dataclass
class HltExit:
    pass


@dataclass
class ShutdownExit:
    """Triple fault or a reset the kernel turned into shutdown."""


@dataclass
class SystemEventExit:
    type: int


@dataclass
class InterruptedExit:
    """KVM_RUN returned EINTR: a signal or immediate_exit asked the vCPU to come out."""


@dataclass
class FailEntryExit:
    reason: int


@dataclass
class InternalErrorExit:
    suberror: int


@dataclass
class UnknownExit:
    exit_reason: int
    hardware_exit_reason: int


VcpuExit = (
    IoExit
    | MmioExit
    | HltExit
    | ShutdownExit
    | SystemEventExit
    | InterruptedExit
    | FailEntryExit
    | InternalErrorExit
    | UnknownExit
)


class Vcpu:
    """One vCPU file descriptor and its mapped `struct kvm_run`."""

    def __init__(self, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = fd
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_view = memoryview(self._mmap)
        self.run_struct: Any = ffi.cast("struct kvm_run *", ffi.from_buffer(self._mmap))

    def coalesced_ring(self, page_offset: int) -> CoalescedRing:
        """The VM's coalesced-write ring, at `page_offset` pages into this vCPU's mapping (what
        KVM_CAP_COALESCED_MMIO returns). Close it before the vCPU."""
        return CoalescedRing(self._mmap, page_offset)

    def close(self) -> None:
        if self.fd >= 0:
            self._run_view.release()
            self.run_struct = None
            self._mmap.close()
            os.close(self.fd)
            self.fd = -1

    def get_one_reg(self, reg_id: int, size: int) -> int:
        """KVM_GET_ONE_REG: the register `reg_id` (arch-encoded, with its size in the id) read
        as a `size`-byte little-endian value; how arm64 reads its core and system registers."""
        value: Any = ffi.new("uint8_t[]", size)
        reg: Any = ffi.new("struct kvm_one_reg *")
        reg.id = reg_id
        reg.addr = int(ffi.cast("uintptr_t", value))
        ioctl(self.fd, Ioctl.KVM_GET_ONE_REG, reg)
        return int.from_bytes(ffi.buffer(value), "little")

    def set_one_reg(self, reg_id: int, size: int, value: int) -> None:
        """KVM_SET_ONE_REG: write `value` as the `size`-byte register `reg_id`."""
        data: Any = ffi.new("uint8_t[]", value.to_bytes(size, "little"))
        reg: Any = ffi.new("struct kvm_one_reg *")
        reg.id = reg_id
        reg.addr = int(ffi.cast("uintptr_t", data))
        ioctl(self.fd, Ioctl.KVM_SET_ONE_REG, reg)

    def request_exit(self) -> None:
        """Make the current or next KVM_RUN return at once (pair with a signal to the thread)."""
        self.run_struct.immediate_exit = 1

    def run(self) -> VcpuExit:
        """Run the vCPU until it needs userspace; decode why.

        This is the hot path of every exit: the ioctl goes straight to libc with a prebuilt
        argument, and the common exit (port I/O) is decoded with one struct unpack of the
        shared kvm_run page rather than field by field through cffi.
        """
        if _libc_ioctl(self.fd, _KVM_RUN, _NO_ARG) < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                self.run_struct.immediate_exit = 0
                return InterruptedExit()
            raise KvmError(Ioctl.KVM_RUN.name, err)
        reason = _EXIT_REASON.unpack_from(self._mmap, _EXIT_REASON_OFFSET)[0]
        if reason == ExitReason.IO:
            direction, size, port, count, start = _IO.unpack_from(self._mmap, _IO_OFFSET)
            return IoExit(
                port,
                size,
                count,
                direction == KVM_EXIT_IO_OUT,
                self._run_view[start : start + size * count],
            )
        run = self.run_struct
        if reason == ExitReason.MMIO:
            mmio = run.mmio
            data = self._run_view[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + mmio.len]
            return MmioExit(mmio.phys_addr, bool(mmio.is_write), data)
        if reason == ExitReason.HLT:
            return HltExit()
        if reason == ExitReason.SHUTDOWN:
            return ShutdownExit()
        if reason == ExitReason.SYSTEM_EVENT:
            return SystemEventExit(run.system_event.type)
        if reason == ExitReason.FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason)
        if reason == ExitReason.INTERNAL_ERROR:
            return InternalErrorExit(run.internal.suberror)
        if reason == ExitReason.INTR:
            return InterruptedExit()
        return UnknownExit(reason, run.hw.hardware_exit_reason)


_MMIO_DATA_OFFSET: int = ffi.offsetof("struct kvm_run", "mmio", "data")
_EXIT_REASON_OFFSET: int = ffi.offsetof("struct kvm_run", "exit_reason")
_IO_OFFSET: int = ffi.offsetof("struct kvm_run", "io", "direction")
_EXIT_REASON = struct_for("struct kvm_run", "exit_reason")
_IO = struct_for(
    "struct kvm_run", "io.direction", "io.size", "io.port", "io.count", "io.data_offset"
)
_libc_ioctl: Any = libc.ioctl
_KVM_RUN = int(Ioctl.KVM_RUN)
_NO_ARG: Any = ffi.cast("unsigned long", 0)
