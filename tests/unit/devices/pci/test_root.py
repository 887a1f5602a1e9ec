"""PCI bus 0 through x86's configuration mechanism #1 (ports 0xCF8-0xCFF) and the MMIO bus:
config reads and writes as a guest does them, BAR windows following the guest's programming,
the chipset reset at 0xCF9."""

from __future__ import annotations

import itertools
import struct

import pytest

from pyvmm.allocator import AllocationError, SystemAllocator
from pyvmm.arch.x86_64.pci_cf8 import ConfigMechanism1
from pyvmm.devices.bus import Bus
from pyvmm.devices.pci.config import Command, InterruptPin, PciConfigSpace, PciId, Reg
from pyvmm.devices.pci.device import PciDevice
from pyvmm.devices.pci.root import NUM_SLOTS, PciRoot, PciRootError

CF8 = 0xCF8
MMIO_START = 0xC000_0000
MMIO_END = 0xFEC0_0000


class BarDevice(PciDevice):
    """A device with 64-bit BARs that answers reads with (bar, offset) and records writes."""

    def __init__(self, sizes: dict[int, int], name: str = "test device") -> None:
        space = PciConfigSpace(PciId(0x1234, 0x5678, 0x0B4000), InterruptPin.INTA)
        for index, size in sizes.items():
            space.add_bar64(index, size)
        super().__init__(space)
        self.name = name
        self.writes: list[tuple[int, int, bytes]] = []
        self.changes: list[dict[int, int]] = []

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = (bytes([bar, offset & 0xFF, offset >> 8, 0xA5]) * 4)[: len(data)]

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        self.writes.append((bar, offset, bytes(data)))

    def bars_changed(self, mapped: dict[int, int]) -> None:
        self.changes.append(dict(mapped))


def bars_of(dev: PciDevice) -> list[tuple[int, int, int]]:
    """(index, address, size) of each BAR, as the guest would read them."""
    sizes = dev.config.bar_sizes
    return [(i, dev.config.bar_address(i), size) for i, size in enumerate(sizes) if size]


class Machine:
    """Port I/O to the root as the vCPU loop would route it, plus the MMIO bus."""

    def __init__(self) -> None:
        self.mmio = Bus("mmio")
        self.io = Bus("io")
        self.resets = 0
        self.allocator = SystemAllocator(MMIO_START, MMIO_END, 24, 4096, 32)
        self.root = PciRoot(self.mmio, self.allocator.allocate_mmio)
        self.io.insert(ConfigMechanism1(self.root, self._reset), CF8, 8, "pci")

    def _reset(self) -> None:
        self.resets += 1

    def outl(self, port: int, value: int) -> None:
        assert self.io.write(port, value.to_bytes(4, "little"))

    def out(self, port: int, size: int, value: int) -> None:
        assert self.io.write(port, value.to_bytes(size, "little"))

    def inp(self, port: int, size: int) -> int:
        buf = bytearray(size)
        assert self.io.read(port, memoryview(buf))
        return int.from_bytes(buf, "little")

    def select(self, slot: int, register: int, bus: int = 0, function: int = 0) -> None:
        self.outl(CF8, 1 << 31 | bus << 16 | slot << 11 | function << 8 | (register & 0xFC))

    def cfg_read(self, slot: int, register: int, size: int = 4) -> int:
        self.select(slot, register)
        return self.inp(0xCFC + (register & 3), size)

    def cfg_write(self, slot: int, register: int, size: int, value: int) -> None:
        self.select(slot, register)
        self.out(0xCFC + (register & 3), size, value)

    def mmio_read(self, addr: int, size: int = 4) -> bytes | None:
        buf = bytearray(size)
        return bytes(buf) if self.mmio.read(addr, memoryview(buf)) else None

    def enable_memory(self, slot: int, on: bool = True) -> None:
        self.cfg_write(slot, Reg.COMMAND, 2, Command.MEMORY_SPACE if on else 0)

    def set_bar(self, slot: int, index: int, address: int) -> None:
        self.cfg_write(slot, Reg.BAR0 + 4 * index, 4, address & 0xFFFFFFFF)
        self.cfg_write(slot, Reg.BAR0 + 4 * index + 4, 4, address >> 32)


@pytest.fixture
def m() -> Machine:
    return Machine()


# --- configuration mechanism #1 -------------------------------------------------------------------


def test_host_bridge_at_00_0(m: Machine) -> None:
    assert m.cfg_read(0, Reg.VENDOR_ID) == 0x1237_8086
    assert m.cfg_read(0, Reg.REVISION_ID) >> 8 == 0x060000  # class: host bridge
    assert m.cfg_read(0, Reg.HEADER_TYPE, 1) == 0


def test_config_data_at_byte_word_and_dword_widths(m: Machine) -> None:
    m.select(0, Reg.VENDOR_ID)
    assert m.inp(0xCFC, 4) == 0x1237_8086
    assert m.inp(0xCFC, 2) == 0x8086
    assert m.inp(0xCFE, 2) == 0x1237
    assert [m.inp(port, 1) for port in range(0xCFC, 0xD00)] == [0x86, 0x80, 0x37, 0x12]
    m.select(0, Reg.CACHE_LINE_SIZE)
    m.out(0xCFD, 1, 0x40)  # latency timer, byte 1 of the dword at 0x0C
    m.out(0xCFC, 1, 0x10)
    assert m.inp(0xCFC, 2) == 0x4010
    assert m.cfg_read(0, Reg.LATENCY_TIMER, 1) == 0x40


def test_config_address_register_reads_back_without_reserved_bits(m: Machine) -> None:
    m.outl(CF8, 0x8000_1234 | 0x7F00_0000 | 3)
    assert m.inp(CF8, 4) == 0x8000_1234
    assert m.inp(CF8, 2) == 0x1234
    assert m.inp(CF8 + 3, 1) == 0x80


def test_partial_writes_to_the_address_register_are_ignored(m: Machine) -> None:
    m.select(0, Reg.VENDOR_ID)
    m.out(CF8, 2, 0xFFFF)
    m.out(CF8 + 2, 1, 0x12)
    assert m.inp(CF8, 4) == 0x8000_0000
    assert m.inp(0xCFC, 4) == 0x1237_8086


@pytest.mark.parametrize(
    "address",
    [
        0x0000_0800,  # enable bit clear (slot 1 holds the device)
        0x8001_0800,  # bus 1
        0x8000_0900,  # function 1
        0x80FF_0F00,  # bus 255, function 7
        0x8000_F800,  # slot 31, empty
        0x8000_1000,  # slot 2, empty
    ],
)
def test_absent_functions_read_all_ones_and_ignore_writes(m: Machine, address: int) -> None:
    dev = BarDevice({0: 0x1000})
    assert m.root.add_device(dev) == 1
    before = bytes(dev.config.data)
    m.outl(CF8, address | Reg.COMMAND)
    for size in (1, 2, 4):
        assert m.inp(0xCFC, size) == (1 << (8 * size)) - 1
    m.out(0xCFC, 2, Command.MEMORY_SPACE)
    assert bytes(dev.config.data) == before
    assert m.cfg_read(0, Reg.COMMAND, 2) == 0
    assert m.cfg_read(1, Reg.COMMAND, 2) == 0


def test_host_bridge_only_at_function_0(m: Machine) -> None:
    m.outl(CF8, 0x8000_0000)
    assert m.inp(0xCFC, 4) == 0x1237_8086
    m.outl(CF8, 0x8000_0100)
    assert m.inp(0xCFC, 4) == 0xFFFF_FFFF


# --- devices and their BARs ---------------------------------------------------------------------


def test_devices_get_the_next_slots_and_aligned_bars_in_the_window(m: Machine) -> None:
    a, b = BarDevice({0: 0x1000}, "a"), BarDevice({0: 0x4000, 2: 0x10_0000}, "b")
    assert m.root.add_device(a) == 1
    assert m.root.add_device(b) == 2
    assert m.cfg_read(2, Reg.VENDOR_ID) == 0x5678_1234
    bars = [(slot, i, addr, size) for slot, d in ((1, a), (2, b)) for i, addr, size in bars_of(d)]
    for _, _, addr, size in bars:
        assert addr % size == 0
        assert addr >= MMIO_START and addr + size <= MMIO_END
    spans = sorted((addr, addr + size) for _, _, addr, size in bars)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    # The guest reads the placement from the BAR registers.
    for slot, i, addr, _ in bars:
        lo = m.cfg_read(slot, Reg.BAR0 + 4 * i)
        hi = m.cfg_read(slot, Reg.BAR0 + 4 * i + 4)
        assert (lo & ~0xF) | hi << 32 == addr
        assert lo & 0xF == 0b100


def test_a_bar_that_does_not_fit_is_refused() -> None:
    allocator = SystemAllocator(MMIO_START, MMIO_START + 0x8000, 24, 4096, 32)
    root = PciRoot(Bus("mmio"), allocator.allocate_mmio)
    root.add_device(BarDevice({0: 0x4000}))
    with pytest.raises(AllocationError, match="big BAR0: no room for 0x8000 bytes of MMIO"):
        root.add_device(BarDevice({0: 0x8000}, "big"))


def test_a_full_bus_is_refused(m: Machine) -> None:
    for slot in range(1, NUM_SLOTS):
        assert m.root.add_device(BarDevice({})) == slot
    with pytest.raises(PciRootError, match="full"):
        m.root.add_device(BarDevice({}))


def test_bars_are_not_decoded_until_memory_space_is_enabled(m: Machine) -> None:
    dev = BarDevice({0: 0x1000})
    slot = m.root.add_device(dev)
    (_, addr, _), *_ = bars_of(dev)
    assert m.mmio_read(addr) is None
    m.enable_memory(slot)
    assert m.mmio_read(addr + 0x234) == bytes([0, 0x34, 0x02, 0xA5])
    assert dev.changes[-1] == {0: addr}
    assert m.mmio.write(addr + 0x10, b"\x01\x02")
    assert dev.writes == [(0, 0x10, b"\x01\x02")]
    assert m.mmio_read(addr + 0x1000) is None  # one past the end of the BAR


def test_disabling_memory_space_unmaps_the_bar(m: Machine) -> None:
    dev = BarDevice({0: 0x1000})
    slot = m.root.add_device(dev)
    (_, addr, _), *_ = bars_of(dev)
    m.enable_memory(slot)
    m.enable_memory(slot, on=False)
    assert m.mmio_read(addr) is None
    assert dev.changes[-1] == {}


def test_moving_a_bar_moves_its_window(m: Machine) -> None:
    dev = BarDevice({0: 0x1000, 2: 0x2000})
    slot = m.root.add_device(dev)
    old = dev.config.bar_address(2)
    m.enable_memory(slot)
    new = 0x1_0000_0000  # above 4 GiB: both halves of the BAR change
    m.set_bar(slot, 2, new)
    assert m.mmio_read(old) is None
    assert m.mmio_read(new + 8) == bytes([2, 8, 0, 0xA5])
    assert dev.changes[-1] == {0: dev.config.bar_address(0), 2: new}
    assert m.mmio_read(dev.config.bar_address(0)) == bytes([0, 0, 0, 0xA5])


def test_bar_sizing_with_decoding_off_then_restore(m: Machine) -> None:
    """Linux's probe: decode off, write ones, read the size, restore, decode on."""
    dev = BarDevice({0: 0x4000})
    slot = m.root.add_device(dev)
    addr = dev.config.bar_address(0)
    lo = m.cfg_read(slot, Reg.BAR0)
    m.cfg_write(slot, Reg.BAR0, 4, 0xFFFF_FFFF)
    m.cfg_write(slot, Reg.BAR0 + 4, 4, 0xFFFF_FFFF)
    assert m.cfg_read(slot, Reg.BAR0) == 0xFFFF_C004
    assert m.cfg_read(slot, Reg.BAR0 + 4) == 0xFFFF_FFFF
    m.cfg_write(slot, Reg.BAR0, 4, lo)
    m.cfg_write(slot, Reg.BAR0 + 4, 4, 0)
    m.enable_memory(slot)
    assert m.mmio_read(addr) == bytes([0, 0, 0, 0xA5])
    assert dev.changes == [{0: addr}]  # mapped once, never at the all-ones address


def test_bar_sizing_with_decoding_on_leaves_only_the_restored_window(m: Machine) -> None:
    """Some firmware sizes BARs without turning decoding off first."""
    dev = BarDevice({0: 0x4000})
    slot = m.root.add_device(dev)
    addr = dev.config.bar_address(0)
    m.enable_memory(slot)
    m.cfg_write(slot, Reg.BAR0, 4, 0xFFFF_FFFF)
    m.cfg_write(slot, Reg.BAR0 + 4, 4, 0xFFFF_FFFF)
    m.cfg_write(slot, Reg.BAR0, 4, addr)
    m.cfg_write(slot, Reg.BAR0 + 4, 4, 0)
    assert m.mmio_read(addr) == bytes([0, 0, 0, 0xA5])
    assert m.mmio_read(0xFFFF_FFFF_FFFF_C000) is None
    assert dev.changes[-1] == {0: addr}


def test_overlapping_bars_leave_the_second_unmapped(m: Machine) -> None:
    a, b = BarDevice({0: 0x1000}, "a"), BarDevice({0: 0x1000}, "b")
    slot_a, slot_b = m.root.add_device(a), m.root.add_device(b)
    addr = a.config.bar_address(0)
    m.enable_memory(slot_a)
    m.set_bar(slot_b, 0, addr)
    m.enable_memory(slot_b)
    assert m.cfg_read(slot_b, Reg.COMMAND, 2) == Command.MEMORY_SPACE
    assert b.changes[-1] == {}  # told its BAR is not decoded
    assert m.mmio.write(addr, b"\x01\x02\x03\x04")
    assert a.writes == [(0, 0, b"\x01\x02\x03\x04")]
    assert b.writes == []
    # Moving it somewhere free maps it.
    m.set_bar(slot_b, 0, addr + 0x10_0000)
    assert m.mmio_read(addr + 0x10_0000) == bytes([0, 0, 0, 0xA5])
    assert b.changes[-1] == {0: addr + 0x10_0000}


def test_a_bar_at_address_zero_is_not_mapped(m: Machine) -> None:
    dev = BarDevice({0: 0x1000})
    slot = m.root.add_device(dev)
    m.set_bar(slot, 0, 0)
    m.enable_memory(slot)
    assert m.mmio_read(0) is None
    assert all(change == {} for change in dev.changes)


def test_writes_to_other_registers_do_not_disturb_the_windows(m: Machine) -> None:
    dev = BarDevice({0: 0x1000})
    slot = m.root.add_device(dev)
    m.enable_memory(slot)
    n = len(dev.changes)
    m.cfg_write(slot, Reg.INTERRUPT_LINE, 1, 11)
    m.cfg_write(slot, Reg.COMMAND, 2, Command.MEMORY_SPACE | Command.BUS_MASTER)
    assert len(dev.changes) == n
    assert m.cfg_read(slot, Reg.INTERRUPT_LINE, 2) == 0x010B
    assert m.mmio_read(dev.config.bar_address(0)) is not None


# --- reset control (0xCF9) ----------------------------------------------------------------------


def test_reset_control_byte_0x06_resets(m: Machine) -> None:
    m.out(0xCF9, 1, 0x06)
    assert m.resets == 1


@pytest.mark.parametrize(("port", "size", "value"), [(0xCF9, 1, 0x02), (0xCF9, 1, 0x00)])
def test_reset_control_without_the_reset_bit_does_nothing(
    m: Machine, port: int, size: int, value: int
) -> None:
    m.out(port, size, value)
    assert m.resets == 0


def test_reset_bit_in_a_wide_address_write_is_not_a_reset(m: Machine) -> None:
    m.outl(CF8, struct.unpack("<I", b"\x00\x06\x00\x80")[0])
    assert m.resets == 0
    assert m.inp(CF8, 4) == 0x8000_0600


def test_an_overlapped_bar_is_decoded_once_the_other_device_moves_away(m: Machine) -> None:
    a, b = BarDevice({0: 0x1000}, "a"), BarDevice({0: 0x1000}, "b")
    slot_a, slot_b = m.root.add_device(a), m.root.add_device(b)
    addr = a.config.bar_address(0)
    m.enable_memory(slot_a)
    m.set_bar(slot_b, 0, addr)
    m.enable_memory(slot_b)
    m.set_bar(slot_a, 0, addr + 0x10_0000)
    assert m.mmio.write(addr, b"\x01\x02\x03\x04")
    assert b.writes == [(0, 0, b"\x01\x02\x03\x04")]
