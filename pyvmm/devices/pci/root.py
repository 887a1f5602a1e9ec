"""PCI bus 0: the host bridge, configuration mechanism #1 and the BAR windows on the MMIO bus.

Ports 0xCF8-0xCFF: a 32-bit write to 0xCF8 selects (enable, bus, device, function, register);
accesses to 0xCFC-0xCFF then reach that function's configuration space. One function per slot.
0xCF9 is the chipset's reset control register, which Linux's `reboot=pci` uses.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from pyvmm.devices.bus import Bus, BusRange
from pyvmm.devices.pci.config import PciConfigSpace, PciId
from pyvmm.devices.pci.device import BarWindows, PciDevice
from pyvmm.ratelimit import GuestLog

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS_LEN = 8
CONFIG_ADDRESS_LEN = 4  # the address register, 0xcf8-0xcfb
NUM_SLOTS = 32
ENABLE_BIT = 1 << 31
RESET_CONTROL_OFFSET = 1  # 0xCF9
RESET_CPU = 1 << 2
HOST_BRIDGE_ID = PciId(vendor=0x8086, device=0x1237, class_code=0x060000)


class PciRootError(Exception):
    """The bus is full."""


class ConfigAddress(enum.IntEnum):
    REGISTER_SHIFT = 0
    FUNCTION_SHIFT = 8
    DEVICE_SHIFT = 11
    BUS_SHIFT = 16


class HostBridge(PciDevice):
    name = "host bridge"

    def __init__(self) -> None:
        super().__init__(PciConfigSpace(HOST_BRIDGE_ID))


class _BarWindow:
    """The MMIO-bus face of one BAR."""

    def __init__(self, device: PciDevice, bar: int) -> None:
        self.device = device
        self.bar = bar

    def read(self, offset: int, data: memoryview) -> None:
        self.device.bar_read(self.bar, offset, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.device.bar_write(self.bar, offset, data)


class PciRoot:
    """Bus 0 and its devices; also the port-I/O device for 0xCF8-0xCFF."""

    def __init__(
        self,
        mmio_bus: Bus,
        allocate_mmio: Callable[[int, str], int],
        on_reset: Callable[[], None],
    ) -> None:
        self.mmio_bus = mmio_bus
        self._allocate_mmio = allocate_mmio
        self._on_reset = on_reset
        self._address = 0
        self._guest_log = GuestLog(log, "PCI")
        self.slots: list[PciDevice | None] = [None] * NUM_SLOTS
        # Per slot: the BAR windows the device last said it decodes, and those mapped.
        self._wanted: list[BarWindows] = [{} for _ in range(NUM_SLOTS)]
        self._mapped: list[BarWindows] = [{} for _ in range(NUM_SLOTS)]
        self.add_device(HostBridge())

    def add_device(self, device: PciDevice) -> int:
        """Put `device` in the next free slot and give its BARs their addresses; the slot."""
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise PciRootError(f"PCI bus 0 is full ({NUM_SLOTS} slots)") from None
        device.allocate_bars(self._allocate_mmio)
        self.slots[slot] = device
        return slot

    def _selected(self) -> tuple[PciDevice | None, int]:
        addr = self._address
        if not addr & ENABLE_BIT:
            return None, 0
        bus = (addr >> ConfigAddress.BUS_SHIFT) & 0xFF
        slot = (addr >> ConfigAddress.DEVICE_SHIFT) & 0x1F
        function = (addr >> ConfigAddress.FUNCTION_SHIFT) & 0x7
        if bus != 0 or function != 0:
            return None, 0
        return self.slots[slot], slot

    # Port-I/O BusDevice for 0xCF8-0xCFF.
    def read(self, offset: int, data: memoryview) -> None:
        if offset < 4:
            value = self._address.to_bytes(4, "little")
            data[:] = (value[offset:] + b"\xff" * 4)[: len(data)]
            return
        device, _ = self._selected()
        if device is None:
            data[:] = b"\xff" * len(data)
            return
        register = (self._address & 0xFC) + (offset - 4)
        device.config_read(register, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset == 0 and len(data) == 4:
            self._address = int.from_bytes(data, "little") & 0x80FF_FFFC
            return
        if offset == RESET_CONTROL_OFFSET and len(data) == 1:
            if data[0] & RESET_CPU:
                self._on_reset()
            return
        if offset < 4:
            return  # other partial writes to the address register are ignored, as chipsets do
        device, slot = self._selected()
        if device is None:
            return
        register = (self._address & 0xFC) + (offset - 4)
        windows = device.config_write(register, data)
        if windows is not None:
            self._wanted[slot] = windows
            self._remap(slot)
            # A BAR that moved away may free the range another device's BAR was refused.
            for other, dev in enumerate(self.slots):
                if dev is not None and other != slot and self._mapped[other] != self._wanted[other]:
                    self._remap(other)

    def _remap(self, slot: int) -> None:
        """Make the MMIO bus hold what the device in `slot` last said it decodes."""
        device = self.slots[slot]
        assert device is not None
        wanted, current = self._wanted[slot], self._mapped[slot]
        if wanted == current:
            return
        ranges = {
            index: BusRange(_BarWindow(device, index), address, size, f"{device.name} BAR{index}")
            for index, (address, size) in wanted.items()
        }
        # One change of the bus: no vCPU sees the BARs gone from the old place but not yet at
        # the new one.
        skipped, _ = self.mmio_bus.update(
            remove=[base for base, _ in current.values()], insert=ranges.values()
        )
        for _, why in skipped:  # the guest placed a BAR over another device's range
            self._guest_log.warning("BAR overlap", "%02x.0: BAR not mapped: %s", slot, why)
        refused = [r for r, _ in skipped]
        mapped = {i: wanted[i] for i, r in ranges.items() if r not in refused}
        self._mapped[slot] = mapped
        device.bars_changed({i: a for i, (a, _) in mapped.items()})
