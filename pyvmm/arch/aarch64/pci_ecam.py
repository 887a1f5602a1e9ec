"""PCI configuration space by ECAM (the PCIe enhanced configuration access mechanism) on MMIO:
arm64's way to the PCI root, where x86 uses ports 0xCF8-0xCFF.

Each function's 4 KiB of configuration space is a window of its own: the offset into the region
is bus << 20 | device << 15 | function << 12 | register. pyvmm has bus 0 only, so the region
is 1 MiB; an access of 1, 2 or 4 bytes at its natural alignment reaches the PCI root, anything
else reads as all ones and writes nothing (as Linux's ECAM driver never does such accesses).
"""

from __future__ import annotations

import enum

from pyvmm.devices.pci.root import PciRoot

FUNCTION_CONFIG_SIZE = 4096
ACCESS_SIZES = (1, 2, 4)


class EcamShift(enum.IntEnum):
    """Where each field of an ECAM offset starts."""

    FUNCTION = 12
    DEVICE = 15
    BUS = 20


class Ecam:
    """The MMIO `BusDevice` for the ECAM region of bus 0."""

    def __init__(self, root: PciRoot) -> None:
        self._root = root

    @staticmethod
    def _target(offset: int, size: int) -> tuple[int, int, int] | None:
        """(slot, function, register) an access reaches, or None (not a plain access, or a bus
        other than 0)."""
        if size not in ACCESS_SIZES or offset % size or offset >> EcamShift.BUS:
            return None
        slot = (offset >> EcamShift.DEVICE) & 0x1F
        function = (offset >> EcamShift.FUNCTION) & 0x7
        return slot, function, offset % FUNCTION_CONFIG_SIZE

    def read(self, offset: int, data: memoryview) -> None:
        target = self._target(offset, len(data))
        if target is None:
            data[:] = b"\xff" * len(data)
            return
        self._root.config_read(*target, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        target = self._target(offset, len(data))
        if target is not None:
            self._root.config_write(*target, data)
