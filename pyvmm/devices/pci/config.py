"""A PCI type-0 configuration space: 256 bytes, read-only fields, BAR sizing, capabilities.

The space is data plus a per-byte mask of guest-writable bits (and one of write-1-to-clear bits
for the status register), so read-only fields stay read-only however the guest writes. BARs are
64-bit memory BARs whose low address bits are hard-wired to zero by their size, which is how the
standard "write all ones, read back the size" probe works without special cases. Offsets, bits
and ids are <linux/pci_regs.h>'s (tests/unit/devices/pci/test_headers.py checks them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CONFIG_SPACE_SIZE = 256
HEADER_SIZE = 0x40
NUM_BARS = 6
FIRST_CAPABILITY = 0x40


class Reg(enum.IntEnum):
    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_PROG = 0x09
    SUBCLASS = 0x0A
    CLASS = 0x0B
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    CAPABILITIES = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(enum.IntFlag):
    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


STATUS_W1C = (
    Status.MASTER_DATA_PARITY_ERROR
    | Status.SIGNALED_TARGET_ABORT
    | Status.RECEIVED_TARGET_ABORT
    | Status.RECEIVED_MASTER_ABORT
    | Status.SIGNALED_SYSTEM_ERROR
    | Status.DETECTED_PARITY_ERROR
)
COMMAND_WRITABLE = (
    Command.IO_SPACE
    | Command.MEMORY_SPACE
    | Command.BUS_MASTER
    | Command.PARITY_ERROR_RESPONSE
    | Command.SERR
    | Command.INTX_DISABLE
)

BAR_MEMORY_64 = 0b100
BAR_PREFETCHABLE = 0b1000
BAR_FLAG_BITS = 0xF


class InterruptPin(enum.IntEnum):
    NONE = 0
    INTA = 1


class CapabilityId(enum.IntEnum):
    MSIX = 0x11
    VENDOR = 0x09


class CapHeader(enum.IntEnum):
    """The bytes every capability starts with, by offset from the capability."""

    ID = 0
    NEXT = 1


CAP_HEADER_SIZE = 2  # a capability's own registers start here


class PciConfigError(Exception):
    """A device's config space was laid out wrongly (a pyvmm bug, not a guest error)."""


@dataclass(frozen=True)
class PciId:
    vendor: int
    device: int
    class_code: int  # base class << 16 | subclass << 8 | programming interface
    revision: int = 0
    subsystem_vendor: int = 0
    subsystem: int = 0


class PciConfigSpace:
    """The 256-byte configuration space of one function."""

    def __init__(self, ident: PciId, interrupt_pin: InterruptPin = InterruptPin.NONE) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.writable = bytearray(CONFIG_SPACE_SIZE)
        self.w1c = bytearray(CONFIG_SPACE_SIZE)
        self.bar_sizes: list[int] = [0] * NUM_BARS
        self._next_cap = FIRST_CAPABILITY
        self._last_cap_next: int = Reg.CAPABILITIES
        self._set(Reg.VENDOR_ID, 2, ident.vendor)
        self._set(Reg.DEVICE_ID, 2, ident.device)
        self._set(Reg.REVISION_ID, 1, ident.revision)
        self._set(Reg.CLASS_PROG, 3, ident.class_code)
        self._set(Reg.SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor)
        self._set(Reg.SUBSYSTEM_ID, 2, ident.subsystem)
        self._set(Reg.INTERRUPT_PIN, 1, interrupt_pin)
        self._set_mask(self.writable, Reg.COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(self.w1c, Reg.STATUS, 2, STATUS_W1C)
        self._set_mask(self.writable, Reg.CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(self.writable, Reg.LATENCY_TIMER, 1, 0xFF)
        self._set_mask(self.writable, Reg.INTERRUPT_LINE, 1, 0xFF)

    def _set(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset : offset + size] = value.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    @property
    def command(self) -> Command:
        return Command(self.get(Reg.COMMAND, 2) & COMMAND_WRITABLE)

    def add_bar64(self, index: int, size: int, prefetchable: bool = False) -> None:
        """Declare BARs `index` and `index + 1` as one 64-bit memory BAR of `size` bytes."""
        if index + 1 >= NUM_BARS or size < 16 or size & (size - 1):
            raise PciConfigError(f"BAR{index}: bad 64-bit BAR of size {size:#x}")
        flags = BAR_MEMORY_64 | (BAR_PREFETCHABLE if prefetchable else 0)
        self.bar_sizes[index] = size
        offset = Reg.BAR0 + 4 * index
        self._set(offset, 4, flags)
        self._set_mask(self.writable, offset, 4, ~(size - 1) & 0xFFFFFFF0)
        high_mask = (~(size - 1) >> 32) & 0xFFFFFFFF
        self._set_mask(self.writable, offset + 4, 4, high_mask)

    def bar_address(self, index: int) -> int:
        offset = Reg.BAR0 + 4 * index
        return (self.get(offset, 4) & ~BAR_FLAG_BITS) | (self.get(offset + 4, 4) << 32)

    def set_bar_address(self, index: int, address: int) -> None:
        if address & (self.bar_sizes[index] - 1):
            raise PciConfigError(f"BAR{index}: {address:#x} is not aligned to its size")
        offset = Reg.BAR0 + 4 * index
        flags = self.get(offset, 4) & BAR_FLAG_BITS
        self._set(offset, 4, (address & 0xFFFFFFFF) | flags)
        self._set(offset + 4, 4, address >> 32)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (`body` follows the id/next bytes); return its offset."""
        length = CAP_HEADER_SIZE + len(body)
        offset = self._next_cap
        if offset + length > CONFIG_SPACE_SIZE:
            raise PciConfigError(f"no room for capability {cap_id:#x}")
        self.data[offset + CapHeader.ID] = cap_id
        self.data[offset + CapHeader.NEXT] = 0
        self.data[offset + CAP_HEADER_SIZE : offset + length] = body
        if writable is not None:
            if len(writable) != len(body):
                raise PciConfigError("capability mask and body differ in length")
            self.writable[offset + CAP_HEADER_SIZE : offset + length] = writable
        self.data[self._last_cap_next] = offset
        self._last_cap_next = offset + CapHeader.NEXT
        self._next_cap = (offset + length + 3) & ~3
        status = self.get(Reg.STATUS, 2) | Status.CAPABILITIES_LIST
        self._set(Reg.STATUS, 2, status)
        return offset

    def read(self, offset: int, data: memoryview) -> None:
        """Fill `data` from the space; bytes past its end read as ones."""
        end = min(offset + len(data), CONFIG_SPACE_SIZE)
        n = max(end - offset, 0)
        data[:n] = self.data[offset:end]
        data[n:] = b"\xff" * (len(data) - n)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Apply a guest write: writable bits take the new value, W1C bits clear on 1."""
        for i, byte in enumerate(bytes(data)):
            pos = offset + i
            if pos >= CONFIG_SPACE_SIZE:
                break
            mask = self.writable[pos]
            value = (self.data[pos] & ~mask) | (byte & mask)
            value &= ~(byte & self.w1c[pos])
            self.data[pos] = value & 0xFF
