"""PCI bus 0: its slots (one function each, the host bridge in slot 0), configuration accesses
by (slot, function, register), and the BAR windows on the MMIO bus.

How the guest reaches configuration space is the architecture's (x86: ports 0xCF8-0xCFF,
`pyvmm.arch.x86_64.pci_cf8`; arm64: an ECAM window); it calls `config_read`/`config_write`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvmm.devices.bus import Bus, BusRange
from pyvmm.devices.pci.config import PciConfigSpace, PciId
from pyvmm.devices.pci.device import BarWindows, PciDevice
from pyvmm.ratelimit import GuestLog

log = logging.getLogger(__name__)

NUM_SLOTS = 32
HOST_BRIDGE_ID = PciId(vendor=0x8086, device=0x1237, class_code=0x060000)


class PciRootError(Exception):
    """The bus is full."""


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
    """Bus 0 and its devices."""

    def __init__(self, mmio_bus: Bus, allocate_mmio: Callable[[int, str], int]) -> None:
        self.mmio_bus = mmio_bus
        self._allocate_mmio = allocate_mmio
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

    def _function(self, slot: int, function: int) -> PciDevice | None:
        if not 0 <= slot < NUM_SLOTS or function != 0:
            return None
        return self.slots[slot]

    def config_read(self, slot: int, function: int, register: int, data: memoryview) -> None:
        """Fill `data` from the configuration space of bus 0 `slot`.`function`; an absent
        function reads as all ones."""
        device = self._function(slot, function)
        if device is None:
            data[:] = b"\xff" * len(data)
            return
        device.config_read(register, data)

    def config_write(
        self, slot: int, function: int, register: int, data: bytes | memoryview
    ) -> None:
        """Give a configuration write to bus 0 `slot`.`function` (absent: ignored), and map the
        BAR windows the device then decodes."""
        device = self._function(slot, function)
        if device is None:
            return
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
