"""The base of every PCI function pyvmm emulates.

A device owns its configuration space, its BARs and its capabilities. Config accesses come to
`config_read` / `config_write`, which a device may override to trap them (crosvm's design, so
that a vfio device can forward them to the kernel). A config write returns the BAR windows the
device decodes when the write changed them (a BAR moved, memory decoding turned on or off): that
is all the root learns of the device's configuration; it maps the windows on the MMIO bus and
tells the device which it mapped through `bars_changed`. BAR accesses come to `bar_read` /
`bar_write` with offsets relative to the BAR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvmm.devices.pci.config import NUM_BARS, Command, PciConfigSpace

BarWindows = dict[int, tuple[int, int]]
"""BAR index -> (guest-physical address, size) of each BAR the device decodes."""


class VmServices(Protocol):
    """What a PCI function may ask of the VM: in the VMM's process the VM's own calls
    (`VmCalls`), in a device process requests to the VMM (`pyvmm.devices.child.ChildLink`)."""

    def allocate_gsi(self) -> int: ...
    def set_msi_route(self, gsi: int, address: int, data: int) -> None: ...
    def register_irqfd(self, fd: int, gsi: int) -> None: ...
    def register_ioeventfd(self, fd: int, address: int, length: int) -> None: ...
    def unregister_ioeventfd(self, fd: int, address: int, length: int) -> None: ...


@dataclass(frozen=True)
class VmCalls:
    """`VmServices` made of the VMM's own functions."""

    allocate_gsi: Callable[[], int]
    set_msi_route: Callable[[int, int, int], None]
    register_irqfd: Callable[[int, int], None]
    register_ioeventfd: Callable[[int, int, int], None]
    unregister_ioeventfd: Callable[[int, int, int], None]


class PciDevice:
    """A PCI function. Subclasses set up `self.config` and implement their BARs."""

    name = "pci device"

    def __init__(self, config: PciConfigSpace) -> None:
        self.config = config

    def allocate_bars(self, allocate_mmio: Callable[[int, str], int]) -> None:
        """Give each BAR its initial address, from `allocate_mmio(size, what)`."""
        for index, size in enumerate(self.config.bar_sizes[:NUM_BARS]):
            if size:
                self.config.set_bar_address(index, allocate_mmio(size, f"{self.name} BAR{index}"))

    def decoded_bars(self) -> BarWindows:
        """The BAR windows the device answers now: none while memory decoding is off."""
        if Command.MEMORY_SPACE not in self.config.command:
            return {}
        windows: BarWindows = {}
        for index, size in enumerate(self.config.bar_sizes[:NUM_BARS]):
            address = self.config.bar_address(index)
            if size and address:
                windows[index] = (address, size)
        return windows

    def config_read(self, offset: int, data: memoryview) -> None:
        self.config.read(offset, data)

    def config_write(self, offset: int, data: bytes | memoryview) -> BarWindows | None:
        """Apply a guest write; the decoded BAR windows if the write changed them, else None."""
        before = self.decoded_bars()
        self.config.write(offset, data)
        after = self.decoded_bars()
        return after if after != before else None

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        pass

    def bars_changed(self, mapped: dict[int, int]) -> None:
        """The BARs now mapped, {index: address}; a BAR missing is not reachable."""
