"""ECAM on MMIO reaches the PCI root exactly as x86's CF8 ports do: the same reads, the same
effects of writes (BARs moved on the MMIO bus), all ones where nothing answers."""

from __future__ import annotations

import pytest

from pyvmm.allocator import SystemAllocator
from pyvmm.arch.aarch64 import layout
from pyvmm.arch.aarch64.pci_ecam import Ecam
from pyvmm.arch.x86_64.pci_cf8 import ConfigMechanism1
from pyvmm.devices.bus import Bus
from pyvmm.devices.pci.config import Command, Reg
from pyvmm.devices.pci.root import PciRoot
from tests.unit.devices.pci.test_root import BarDevice, bars_of

ECAM = layout.PCI_ECAM_START
CF8 = 0xCF8


class Twin:
    """Two identical PCI buses, one reached through ECAM and one through CF8."""

    def __init__(self) -> None:
        self.mmio = [Bus("ecam mmio"), Bus("cf8 mmio")]
        self.io = Bus("io")
        roots = []
        for mmio in self.mmio:
            allocator = SystemAllocator(layout.PCI_MMIO_START, layout.PCI_MMIO_END, 32, 4096, 32)
            root = PciRoot(mmio, allocator.allocate_mmio)
            root.add_device(BarDevice({0: 0x1000, 2: 0x4000}))
            roots.append(root)
        self.ecam_root, self.cf8_root = roots
        self.mmio[0].insert(Ecam(roots[0]), ECAM, layout.PCI_ECAM_SIZE, "PCI config (ECAM)")
        self.io.insert(ConfigMechanism1(roots[1], lambda: None), CF8, 8, "PCI config (CF8)")

    def ecam_read(self, bus: int, slot: int, fn: int, reg: int, size: int) -> int:
        buf = bytearray(size)
        addr = ECAM + (bus << 20 | slot << 15 | fn << 12 | reg)
        assert self.mmio[0].read(addr, memoryview(buf))
        return int.from_bytes(buf, "little")

    def ecam_write(self, bus: int, slot: int, fn: int, reg: int, size: int, value: int) -> None:
        addr = ECAM + (bus << 20 | slot << 15 | fn << 12 | reg)
        assert self.mmio[0].write(addr, value.to_bytes(size, "little"))

    def _select(self, bus: int, slot: int, fn: int, reg: int) -> None:
        address = 1 << 31 | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC)
        self.io.write(CF8, address.to_bytes(4, "little"))

    def cf8_read(self, bus: int, slot: int, fn: int, reg: int, size: int) -> int:
        self._select(bus, slot, fn, reg)
        buf = bytearray(size)
        assert self.io.read(0xCFC + (reg & 3), memoryview(buf))
        return int.from_bytes(buf, "little")

    def cf8_write(self, bus: int, slot: int, fn: int, reg: int, size: int, value: int) -> None:
        self._select(bus, slot, fn, reg)
        self.io.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))

    def read_both(self, bus: int, slot: int, fn: int, reg: int, size: int) -> tuple[int, int]:
        return (
            self.ecam_read(bus, slot, fn, reg, size),
            self.cf8_read(bus, slot, fn, reg, size),
        )

    def write_both(self, bus: int, slot: int, fn: int, reg: int, size: int, value: int) -> None:
        self.ecam_write(bus, slot, fn, reg, size, value)
        self.cf8_write(bus, slot, fn, reg, size, value)


@pytest.fixture
def t() -> Twin:
    return Twin()


@pytest.mark.parametrize("slot", [0, 1, 2, 31])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_register_reads_the_same_through_either_mechanism(
    t: Twin, slot: int, size: int
) -> None:
    for reg in range(0, 0x100, size):
        ecam, cf8 = t.read_both(0, slot, 0, reg, size)
        assert ecam == cf8, f"{slot:02x}.0 register {reg:#x} ({size} bytes)"


def test_the_host_bridge_and_the_device_are_where_cf8_finds_them(t: Twin) -> None:
    assert t.ecam_read(0, 0, 0, Reg.VENDOR_ID, 4) == 0x1237_8086
    assert t.ecam_read(0, 1, 0, Reg.VENDOR_ID, 4) == 0x5678_1234


@pytest.mark.parametrize(("bus", "fn"), [(0, 1), (0, 7)])
def test_absent_functions_read_all_ones(t: Twin, bus: int, fn: int) -> None:
    assert t.read_both(bus, 1, fn, Reg.VENDOR_ID, 4) == (0xFFFF_FFFF, 0xFFFF_FFFF)


def test_config_space_past_the_standard_header_reaches_the_device(t: Twin) -> None:
    # Extended configuration space (0x100-0xfff) is ECAM's alone; the device answers it.
    ecam = t.ecam_read(0, 1, 0, 0x100, 4)
    buf = bytearray(4)
    t.ecam_root.config_read(1, 0, 0x100, memoryview(buf))
    assert ecam == int.from_bytes(buf, "little")


def test_bar_programming_moves_the_bar_on_the_mmio_bus_as_cf8_does(t: Twin) -> None:
    new = layout.PCI_MMIO_START + 0x10_0000
    t.write_both(0, 1, 0, Reg.BAR0, 4, new)
    t.write_both(0, 1, 0, Reg.BAR0 + 4, 4, 0)
    t.write_both(0, 1, 0, Reg.COMMAND, 2, Command.MEMORY_SPACE)
    ecam_dev, cf8_dev = t.ecam_root.slots[1], t.cf8_root.slots[1]
    assert ecam_dev is not None and cf8_dev is not None
    assert bars_of(ecam_dev) == bars_of(cf8_dev)
    assert bars_of(ecam_dev)[0][1] == new
    assert t.ecam_read(0, 1, 0, Reg.COMMAND, 2) & Command.MEMORY_SPACE
    for mmio in t.mmio:
        buf = bytearray(4)
        assert mmio.read(new, memoryview(buf))
        assert bytes(buf) == bytes([0, 0, 0, 0xA5])


@pytest.mark.parametrize(("offset", "size"), [(1, 2), (2, 4), (0, 8), (0, 3)])
def test_misaligned_or_odd_sized_accesses_read_all_ones_and_write_nothing(
    t: Twin, offset: int, size: int
) -> None:
    ecam = Ecam(t.ecam_root)
    buf = bytearray(size)
    ecam.read((1 << 15) + offset, memoryview(buf))
    assert buf == b"\xff" * size
    dev = t.ecam_root.slots[1]
    assert dev is not None
    before = bytes(dev.config.data)
    ecam.write((1 << 15) + Reg.COMMAND + offset, b"\x06" * size)
    assert bytes(dev.config.data) == before
