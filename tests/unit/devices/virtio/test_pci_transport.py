"""The virtio-pci transport driven the way Linux's virtio_pci_modern drives it: status sequence,
feature negotiation, queue set-up, notification through the ioeventfd and an MSI-X interrupt."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.pci import msix
from pyvmm.devices.pci.config import Command, Reg
from pyvmm.devices.pci.device import VmCalls
from pyvmm.devices.pci.msix import CapReg, EntryField, MessageControl
from pyvmm.devices.virtio.device import DeviceStatus, Feature, SharedMemoryRegion
from pyvmm.devices.virtio.pci import (
    COMMON_WIDTH,
    MSIX_TABLE_OFFSET,
    SHARED_MEMORY_BAR,
    CfgType,
    CommonReg,
    VirtioPciDevice,
    ffi,
)
from pyvmm.devices.virtio.queue import VirtqFlags
from pyvmm.devices.virtio.rng import Rng
from pyvmm.memory import GuestMemory
from tests.unit.devices.virtio import rings

MiB = 1 << 20
BAR_ADDR = 0xC000_0000
DESC, AVAIL, USED, BUF = 0x10000, 0x11000, 0x12000, 0x20000


def msix_control(value: int) -> bytes:
    """The MSI-X message control register holding `value`."""
    return value.to_bytes(msix.CONTROL_SIZE, "little")


class Harness:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.intx = LevelIrq(16)
        self.ioeventfds: dict[int, int] = {}
        self.routes: dict[int, tuple[int, int]] = {}
        self.irqfds: dict[int, int] = {}
        self._next_gsi = 24
        self.dev = VirtioPciDevice(
            Rng(),
            mem,
            self.intx,
            VmCalls(
                allocate_gsi=self._allocate,
                set_msi_route=lambda gsi, a, d: self.routes.__setitem__(gsi, (a, d)),
                register_irqfd=lambda fd, gsi: self.irqfds.__setitem__(gsi, fd),
                register_ioeventfd=lambda fd, addr, n: self.ioeventfds.__setitem__(addr, fd),
                unregister_ioeventfd=lambda fd, addr, n: self.ioeventfds.pop(addr),
            ),
        )
        self.dev.config.set_bar_address(0, BAR_ADDR)
        self.dev.config_write(Reg.COMMAND, Command.MEMORY_SPACE.to_bytes(2, "little"))
        self.dev.bars_changed({0: BAR_ADDR})

    def _allocate(self) -> int:
        self._next_gsi += 1
        return self._next_gsi - 1

    def read(self, reg: CommonReg) -> int:
        buf = bytearray(COMMON_WIDTH[reg])
        self.dev.bar_read(0, reg, memoryview(buf))
        return int.from_bytes(buf, "little")

    def write(self, reg: CommonReg, value: int) -> None:
        self.dev.bar_write(0, reg, value.to_bytes(COMMON_WIDTH[reg], "little"))

    def negotiate(self, features: int) -> int:
        self.write(CommonReg.DEVICE_STATUS, 0)
        self.write(CommonReg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE)
        self.write(CommonReg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        for half in (0, 1):
            self.write(CommonReg.GUEST_FEATURE_SELECT, half)
            self.write(CommonReg.GUEST_FEATURE, (features >> (32 * half)) & 0xFFFFFFFF)
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        self.write(CommonReg.DEVICE_STATUS, status)
        return self.read(CommonReg.DEVICE_STATUS)

    def setup_queue(self, vector: int, used: int = USED) -> None:
        self.write(CommonReg.QUEUE_SELECT, 0)
        self.write(CommonReg.QUEUE_SIZE, 8)
        self.write(CommonReg.QUEUE_MSIX_VECTOR, vector)
        for low, high, addr in (
            (CommonReg.QUEUE_DESC_LO, CommonReg.QUEUE_DESC_HI, DESC),
            (CommonReg.QUEUE_AVAIL_LO, CommonReg.QUEUE_AVAIL_HI, AVAIL),
            (CommonReg.QUEUE_USED_LO, CommonReg.QUEUE_USED_HI, used),
        ):
            self.write(low, addr)
            self.write(high, 0)
        self.write(CommonReg.QUEUE_ENABLE, 1)

    def submit(self, length: int) -> None:
        self.mem.write(DESC, rings.descriptor(BUF, length, VirtqFlags.WRITE))
        idx = self.mem.read_u16(AVAIL + rings.AVAIL_IDX)
        self.mem.write_u16(AVAIL + rings.avail_entry(idx % 8), 0)
        self.mem.write_u16(AVAIL + rings.AVAIL_IDX, idx + 1)
        notify = self.ioeventfds[BAR_ADDR + 0x3000]
        os.eventfd_write(notify, 1)


@pytest.fixture
def harness() -> Iterator[Harness]:
    mem = GuestMemory([(0, MiB)])
    h = Harness(mem)
    yield h
    h.dev.close()
    h.intx.close()
    mem.close()


def _wait_readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_features_offered_include_version_1_and_ring_features(harness: Harness) -> None:
    harness.write(CommonReg.DEVICE_FEATURE_SELECT, 1)
    assert harness.read(CommonReg.DEVICE_FEATURE) & 1  # VERSION_1 is bit 32
    harness.write(CommonReg.DEVICE_FEATURE_SELECT, 0)
    low = harness.read(CommonReg.DEVICE_FEATURE)
    assert low & Feature.RING_INDIRECT_DESC and low & Feature.RING_EVENT_IDX


def test_unoffered_features_are_refused(harness: Harness) -> None:
    status = harness.negotiate(Feature.VERSION_1 | (1 << 40))
    assert not status & DeviceStatus.FEATURES_OK


def test_a_driver_without_version_1_is_refused(harness: Harness) -> None:
    assert not harness.negotiate(0) & DeviceStatus.FEATURES_OK


def test_driver_ok_without_features_ok_needs_reset(harness: Harness) -> None:
    harness.write(CommonReg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    harness.write(
        CommonReg.DEVICE_STATUS,
        DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK,
    )
    status = harness.read(CommonReg.DEVICE_STATUS)
    assert status & DeviceStatus.DEVICE_NEEDS_RESET
    assert not status & DeviceStatus.DRIVER_OK


def test_request_completes_with_an_msix_interrupt(harness: Harness) -> None:
    assert harness.negotiate(Feature.VERSION_1) & DeviceStatus.FEATURES_OK
    harness.setup_queue(vector=0)
    assert harness.read(CommonReg.QUEUE_MSIX_VECTOR) == 0
    # MSI-X table entry 0 -> LAPIC vector 0x41, unmasked; then enable MSI-X.
    entry: Any = msix.ffi.new("struct msix_table_entry *")
    entry.lower_addr, entry.data = 0xFEE0_0000, 0x41
    entry_bytes = msix.ffi.buffer(entry)[:]
    harness.dev.bar_write(0, MSIX_TABLE_OFFSET, entry_bytes[: EntryField.DATA])
    harness.dev.bar_write(0, MSIX_TABLE_OFFSET + EntryField.DATA, entry_bytes[EntryField.DATA :])
    control = harness.dev.msix.cap_offset + CapReg.MESSAGE_CONTROL
    harness.dev.config_write(control, msix_control(MessageControl.ENABLE))
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    harness.submit(64)
    gsi = harness.dev.msix.gsis[0]
    assert harness.routes[gsi] == (0xFEE0_0000, 0x41)
    assert _wait_readable(harness.irqfds[gsi]), "no MSI-X interrupt"
    assert harness.mem.read_u16(USED + rings.USED_IDX) == 1
    head, length = rings.used_element(
        harness.mem.read(USED + rings.used_elem(0), rings.USED_ELEM_SIZE)
    )
    assert (head, length) == (0, 64)
    assert harness.mem.read(BUF, 64) != bytes(64)


def test_masked_vector_is_held_pending_then_delivered(harness: Harness) -> None:
    harness.negotiate(Feature.VERSION_1)
    harness.setup_queue(vector=0)
    control = harness.dev.msix.cap_offset + CapReg.MESSAGE_CONTROL
    harness.dev.config_write(control, msix_control(MessageControl.ENABLE))  # entry 0 masked
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    harness.submit(16)
    gsi = harness.dev.msix.gsis[0]
    for _ in range(500):
        if harness.mem.read_u16(USED + rings.USED_IDX) == 1:
            break
        select.select([], [], [], 0.01)
    assert not _wait_readable(harness.irqfds[gsi], 0.2), "a masked vector fired"
    pba = bytearray(8)
    harness.dev.bar_read(0, 0x5000, memoryview(pba))
    assert pba[0] & 1
    harness.dev.bar_write(0, MSIX_TABLE_OFFSET + EntryField.VECTOR_CONTROL, bytes(4))  # unmask
    assert _wait_readable(harness.irqfds[gsi], 1.0)


def test_reset_stops_the_queue_and_clears_status(harness: Harness) -> None:
    harness.negotiate(Feature.VERSION_1)
    harness.setup_queue(vector=0xFFFF)
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    harness.write(CommonReg.DEVICE_STATUS, 0)
    assert harness.read(CommonReg.DEVICE_STATUS) == 0
    assert harness.read(CommonReg.QUEUE_ENABLE) == 0


def test_a_used_ring_over_the_avail_ring_is_refused_at_driver_ok(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """With the used flags over avail.idx, each notification toggle made a new chain appear:
    the worker spun for ever and a reset never returned."""
    harness.negotiate(Feature.VERSION_1)
    harness.setup_queue(vector=0xFFFF, used=AVAIL + 4)
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    assert harness.read(CommonReg.DEVICE_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET
    assert "queue 0: used ring overlaps available ring" in caplog.text
    harness.write(CommonReg.DEVICE_STATUS, 0)
    assert harness.read(CommonReg.DEVICE_STATUS) == 0
    harness.negotiate(Feature.VERSION_1)
    harness.setup_queue(vector=0xFFFF)
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    harness.submit(32)
    for _ in range(500):
        if harness.mem.read_u16(USED + rings.USED_IDX) == 1:
            break
        select.select([], [], [], 0.01)
    assert harness.mem.read_u16(USED + rings.USED_IDX) == 1, (
        "the device did not work after the reset"
    )


def _read_isr(harness: Harness) -> int:
    buf = bytearray(1)
    harness.dev.bar_read(0, 0x1000, memoryview(buf))
    return buf[0]


def test_intx_is_a_level_the_isr_holds_until_read(harness: Harness) -> None:
    """With MSI-X off, a used buffer sets the ISR and asserts INTx; when the guest's EOI lowers
    the line (KVM signals the resample eventfd), it is raised again while the ISR is unread,
    and not once the ISR has been read."""
    harness.negotiate(Feature.VERSION_1)
    harness.setup_queue(vector=0xFFFF)
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    harness.submit(16)
    assert _wait_readable(harness.intx.fd), "INTx was not asserted"
    os.eventfd_read(harness.intx.fd)  # what KVM does with the assertion
    os.eventfd_write(harness.intx.resample_fd, 1)  # the guest's EOI, ISR not read yet
    assert _wait_readable(harness.intx.fd), "INTx was not raised again after the EOI"
    os.eventfd_read(harness.intx.fd)
    assert _read_isr(harness) == 1  # QUEUE
    assert _read_isr(harness) == 0  # reading acknowledged it
    os.eventfd_write(harness.intx.resample_fd, 1)
    assert not _wait_readable(harness.intx.fd, 0.3), "raised again with nothing pending"


def test_a_failed_device_raises_a_config_interrupt_and_needs_reset(harness: Harness) -> None:
    harness.negotiate(Feature.VERSION_1)
    harness.setup_queue(vector=0xFFFF)
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    harness.write(CommonReg.DEVICE_STATUS, status | DeviceStatus.DRIVER_OK)
    generation = harness.read(CommonReg.CONFIG_GENERATION)
    # avail.idx far ahead of what the device consumed: only a reset can recover.
    harness.mem.write_u16(AVAIL + rings.AVAIL_IDX, 100)
    os.eventfd_write(harness.ioeventfds[BAR_ADDR + 0x3000], 1)
    assert _wait_readable(harness.intx.fd), "no configuration interrupt"
    assert harness.read(CommonReg.DEVICE_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET
    assert harness.read(CommonReg.CONFIG_GENERATION) == (generation + 1) & 0xFF
    assert _read_isr(harness) == 2  # CONFIG


class SharedMemoryDevice(Rng):
    """A device with two shared memory regions (as virtio-fs's DAX window would be)."""

    def __init__(self) -> None:
        self.placed: list[dict[int, int | None]] = []

    def shared_memory_regions(self) -> list[SharedMemoryRegion]:
        return [SharedMemoryRegion(0, MiB), SharedMemoryRegion(1, 3 * MiB)]

    def shared_memory_moved(self, placed: dict[int, int | None]) -> None:
        self.placed.append(placed)


def test_shared_memory_regions_get_a_bar_and_a_capability_each() -> None:
    mem = GuestMemory([(0, MiB)])
    intx = LevelIrq(16)
    backend = SharedMemoryDevice()
    dev = VirtioPciDevice(
        backend,
        mem,
        intx,
        VmCalls(
            allocate_gsi=lambda: 24,
            set_msi_route=lambda gsi, a, d: None,
            register_irqfd=lambda fd, gsi: None,
            register_ioeventfd=lambda fd, addr, n: None,
            unregister_ioeventfd=lambda fd, addr, n: None,
        ),
    )
    try:
        # The capability list, as a driver walks it: the two shared memory capabilities.
        caps = []
        at = dev.config.data[Reg.CAPABILITIES]
        while at:
            raw = bytes(dev.config.data[at : at + ffi.sizeof("struct virtio_pci_cap64")])
            cap = ffi.from_buffer("struct virtio_pci_cap64 *", raw)
            if cap.cap.cfg_type == CfgType.SHARED_MEMORY:
                offset = cap.cap.offset | cap.offset_hi << 32
                length = cap.cap.length | cap.length_hi << 32
                caps.append((cap.cap.id, cap.cap.bar, offset, length))
            at = dev.config.data[at + 1]
        assert caps == [(0, 2, 0, MiB), (1, 2, 4 * MiB, 3 * MiB)]
        assert dev.config.bar_sizes[SHARED_MEMORY_BAR] == 8 * MiB
        dev.allocate_bars(lambda size, what: 0x1_0000_0000 if size == 8 * MiB else BAR_ADDR)
        dev.bars_changed({0: BAR_ADDR, SHARED_MEMORY_BAR: 0x1_0000_0000})
        assert backend.placed[-1] == {0: 0x1_0000_0000, 1: 0x1_0040_0000}
        dev.bars_changed({0: BAR_ADDR})
        assert backend.placed[-1] == {0: None, 1: None}
    finally:
        dev.close()
        intx.close()
        mem.close()
