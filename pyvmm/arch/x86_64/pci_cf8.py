"""PCI configuration mechanism #1, the PC's way to configuration space: ports 0xCF8-0xCFF.

A 32-bit write to 0xCF8 selects (enable, bus, device, function, register); accesses to
0xCFC-0xCFF then reach that function's configuration space through the PCI root. 0xCF9, inside
the same range, is the chipset's reset control register, which Linux's `reboot=pci` uses.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from pyvmm.devices.pci.root import PciRoot

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS_LEN = 8
CONFIG_ADDRESS_LEN = 4  # the address register, 0xcf8-0xcfb
DATA_OFFSET = 4  # 0xcfc, from the base
ENABLE_BIT = 1 << 31
ADDRESS_MASK = 0x80FF_FFFC  # enable, bus, device, function, dword register
REGISTER_MASK = 0xFC
RESET_CONTROL_OFFSET = 1  # 0xCF9
RESET_CPU = 1 << 2


class ConfigAddress(enum.IntEnum):
    """Where each field of the address register starts."""

    FUNCTION_SHIFT = 8
    DEVICE_SHIFT = 11
    BUS_SHIFT = 16


class ConfigMechanism1:
    """The port-I/O `BusDevice` at 0xCF8-0xCFF."""

    def __init__(self, root: PciRoot, on_reset: Callable[[], None]) -> None:
        self._root = root
        self._on_reset = on_reset
        self._address = 0

    def _target(self, offset: int) -> tuple[int, int, int] | None:
        """(slot, function, register) the data window reaches, or None (disabled, or a bus
        other than 0: nothing answers)."""
        addr = self._address
        if not addr & ENABLE_BIT or (addr >> ConfigAddress.BUS_SHIFT) & 0xFF:
            return None
        slot = (addr >> ConfigAddress.DEVICE_SHIFT) & 0x1F
        function = (addr >> ConfigAddress.FUNCTION_SHIFT) & 0x7
        return slot, function, (addr & REGISTER_MASK) + offset - DATA_OFFSET

    def read(self, offset: int, data: memoryview) -> None:
        if offset < DATA_OFFSET:
            value = self._address.to_bytes(4, "little")
            data[:] = (value[offset:] + b"\xff" * 4)[: len(data)]
            return
        target = self._target(offset)
        if target is None:
            data[:] = b"\xff" * len(data)
            return
        self._root.config_read(*target, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset == 0 and len(data) == 4:
            self._address = int.from_bytes(data, "little") & ADDRESS_MASK
            return
        if offset == RESET_CONTROL_OFFSET and len(data) == 1:
            if data[0] & RESET_CPU:
                self._on_reset()
            return
        if offset < DATA_OFFSET:
            return  # other partial writes to the address register are ignored, as chipsets do
        target = self._target(offset)
        if target is not None:
            self._root.config_write(*target, data)
