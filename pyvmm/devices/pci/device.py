"""The base of every PCI function pyvmm emulates.

A device owns its configuration space and its BARs. Config accesses come to `config_read` /
`config_write`, which a device may override to trap them (crosvm's design, so that a vfio device
can forward them to the kernel); the default applies them to the `PciConfigSpace`. BAR accesses
come to `bar_read` / `bar_write` with offsets relative to the BAR. When the guest moves a BAR or
turns memory decoding on or off, the root calls `bars_changed` after re-mapping the MMIO bus.
"""

from __future__ import annotations

from pyvmm.devices.pci.config import NUM_BARS, PciConfigSpace


class PciDevice:
    """A PCI function. Subclasses set up `self.config` and implement their BARs."""

    name = "pci device"

    def __init__(self, config: PciConfigSpace) -> None:
        self.config = config

    def config_read(self, offset: int, data: memoryview) -> None:
        self.config.read(offset, data)

    def config_write(self, offset: int, data: bytes | memoryview) -> None:
        self.config.write(offset, data)

    def bars(self) -> list[tuple[int, int, int]]:
        """(index, address, size) of each implemented BAR, as the guest programmed it."""
        return [
            (i, self.config.bar_address(i), size)
            for i, size in enumerate(self.config.bar_sizes[:NUM_BARS])
            if size
        ]

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        pass

    def bars_changed(self, mapped: dict[int, int]) -> None:
        """The BARs now decoded, {index: address}; a BAR missing is not decoded."""
