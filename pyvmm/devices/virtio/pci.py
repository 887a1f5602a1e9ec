"""The virtio 1.x PCI transport (modern only): one PCI function carrying one virtio device.

BAR0 (64-bit, 32 KiB) holds the common configuration, ISR status, device configuration and
notification areas, described by vendor capabilities, plus the MSI-X table and PBA. Queue
notifications are ioeventfds on the notify addresses (KVM signals them without an exit to
userspace); used-buffer interrupts leave through MSI-X irqfds, or INTx when MSI-X is off.
The driver must follow the status sequence of virtio 1.2 section 3.1: a driver that accepts
features the device did not offer, lacks VERSION_1, or sets DRIVER_OK without FEATURES_OK is
refused (FEATURES_OK does not stick; DEVICE_NEEDS_RESET is set). The capability and common
configuration layouts are declared below as <linux/virtio_pci.h> declares them
(tests/unit/devices/virtio/test_headers.py checks them against it).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from typing import Any

from pyvmm.cdecl import declare, field_type
from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.pci.config import (
    CAP_HEADER_SIZE,
    CapabilityId,
    InterruptPin,
    PciConfigSpace,
    PciId,
)
from pyvmm.devices.pci.device import BarWindows, PciDevice, VmServices
from pyvmm.devices.pci.msix import NO_VECTOR, Msix
from pyvmm.devices.virtio.device import DeviceStatus, Feature, SharedMemoryRegion, VirtioDevice
from pyvmm.devices.virtio.interrupt import Interrupt
from pyvmm.devices.virtio.queue import QueueError, SplitQueue, check_rings_apart
from pyvmm.devices.virtio.worker import PAUSE_TIMEOUT_S, QueueWorker
from pyvmm.memory import PAGE_SIZE, GuestMemory
from pyvmm.ratelimit import GuestLog

log = logging.getLogger(__name__)

ffi: Any = declare(
    "virtio_pci",
    """
    struct virtio_pci_common_cfg {
        uint32_t device_feature_select;
        uint32_t device_feature;
        uint32_t guest_feature_select;
        uint32_t guest_feature;
        uint16_t msix_config;
        uint16_t num_queues;
        uint8_t  device_status;
        uint8_t  config_generation;
        uint16_t queue_select;
        uint16_t queue_size;
        uint16_t queue_msix_vector;
        uint16_t queue_enable;
        uint16_t queue_notify_off;
        uint32_t queue_desc_lo;
        uint32_t queue_desc_hi;
        uint32_t queue_avail_lo;
        uint32_t queue_avail_hi;
        uint32_t queue_used_lo;
        uint32_t queue_used_hi;
    };
    struct virtio_pci_cap {
        uint8_t  cap_vndr;
        uint8_t  cap_next;
        uint8_t  cap_len;
        uint8_t  cfg_type;
        uint8_t  bar;
        uint8_t  id;
        uint8_t  padding[2];
        uint32_t offset;
        uint32_t length;
    };
    struct virtio_pci_notify_cap {
        struct virtio_pci_cap cap;
        uint32_t notify_off_multiplier;
    };
    struct virtio_pci_cfg_cap {
        struct virtio_pci_cap cap;
        uint8_t  pci_cfg_data[4];
    };
    struct virtio_pci_cap64 {
        struct virtio_pci_cap cap;
        uint32_t offset_hi;
        uint32_t length_hi;
    };
    """,
)

VIRTIO_VENDOR_ID = 0x1AF4
VIRTIO_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1
# PCI class codes for the devices we offer, by virtio type (others: "other" 0xFF0000).
CLASS_CODES = {1: 0x020000, 2: 0x018000, 4: 0xFF0000}
CLASS_OTHER = 0xFF0000

BAR = 0
BAR_SIZE = 0x8000
# The device's shared memory regions (virtio 1.2, 2.10), if it has any, are in this 64-bit BAR.
SHARED_MEMORY_BAR = 2


def plain_bar_sizes() -> dict[int, int]:
    """BAR index -> size of a virtio function without shared memory regions (blk, rng)."""
    return {BAR: BAR_SIZE}


COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
REGION_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
NOTIFY_MULTIPLIER = 4
COMMON_SIZE = 0x40


class CfgType(enum.IntEnum):
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8


# The structure each capability is, by type; the others are a plain struct virtio_pci_cap.
_CAP_STRUCTS = {
    CfgType.NOTIFY: "struct virtio_pci_notify_cap",
    CfgType.PCI: "struct virtio_pci_cfg_cap",
}
_CFG_CAP_SIZE = ffi.sizeof("struct virtio_pci_cfg_cap")
_CFG_DATA_AT = ffi.offsetof("struct virtio_pci_cfg_cap", "pci_cfg_data")


def _common(field: str) -> int:
    offset: int = ffi.offsetof("struct virtio_pci_common_cfg", field)
    return offset


class CommonReg(enum.IntEnum):
    """The common configuration registers (virtio 1.2, 4.1.4.3), by offset; each is named after
    its field of struct virtio_pci_common_cfg."""

    DEVICE_FEATURE_SELECT = _common("device_feature_select")
    DEVICE_FEATURE = _common("device_feature")
    GUEST_FEATURE_SELECT = _common("guest_feature_select")
    GUEST_FEATURE = _common("guest_feature")
    MSIX_CONFIG = _common("msix_config")
    NUM_QUEUES = _common("num_queues")
    DEVICE_STATUS = _common("device_status")
    CONFIG_GENERATION = _common("config_generation")
    QUEUE_SELECT = _common("queue_select")
    QUEUE_SIZE = _common("queue_size")
    QUEUE_MSIX_VECTOR = _common("queue_msix_vector")
    QUEUE_ENABLE = _common("queue_enable")
    QUEUE_NOTIFY_OFF = _common("queue_notify_off")
    QUEUE_DESC_LO = _common("queue_desc_lo")
    QUEUE_DESC_HI = _common("queue_desc_hi")
    QUEUE_AVAIL_LO = _common("queue_avail_lo")
    QUEUE_AVAIL_HI = _common("queue_avail_hi")
    QUEUE_USED_LO = _common("queue_used_lo")
    QUEUE_USED_HI = _common("queue_used_hi")


# Each register's size: the only access size it answers to.
COMMON_WIDTH: dict[CommonReg, int] = {
    reg: ffi.sizeof(field_type(ffi, "struct virtio_pci_common_cfg", reg.name.lower()))
    for reg in CommonReg
}


def _common_reg(offset: int, size: int) -> CommonReg | None:
    """The register a `size`-byte access at `offset` reaches: only a naturally sized access to
    a whole register reaches one (virtio 1.2, 4.1.3.1)."""
    try:
        reg = CommonReg(offset)
    except ValueError:
        return None
    return reg if COMMON_WIDTH[reg] == size else None


def _feature_word(features: int, select: int) -> int:
    """Feature bits 32*select to 32*select+31, as the 32-bit feature registers show them
    (virtio has 64 feature bits: a select above 1 reads 0)."""
    return (features >> (32 * select)) & 0xFFFFFFFF if select <= 1 else 0


def _low(value: int) -> int:
    return value & 0xFFFFFFFF


def _high(value: int) -> int:
    return (value >> 32) & 0xFFFFFFFF


def _with_low(value: int, low: int) -> int:
    return (value & ~0xFFFFFFFF) | low


def _with_high(value: int, high: int) -> int:
    return (value & 0xFFFFFFFF) | (high << 32)


class _Queue:
    """A queue's registers as the driver programs them."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enable = 0
        self.desc = 0
        self.avail = 0
        self.used = 0


class VirtioPciDevice(PciDevice):
    """A virtio device on the PCI bus."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        intx: LevelIrq,
        vm: VmServices,
    ) -> None:
        ident = PciId(
            vendor=VIRTIO_VENDOR_ID,
            device=VIRTIO_DEVICE_ID_BASE + device.device_type,
            class_code=CLASS_CODES.get(device.device_type, CLASS_OTHER),
            revision=VIRTIO_PCI_REVISION,
            subsystem_vendor=VIRTIO_VENDOR_ID,
            subsystem=device.device_type,
        )
        config = PciConfigSpace(ident, InterruptPin.INTA)
        super().__init__(config)
        self.name = device.name
        self.device = device
        self.mem = mem
        self._vm = vm
        self._lock = threading.RLock()
        config.add_bar64(BAR, BAR_SIZE)
        self._add_virtio_cap(CfgType.COMMON, COMMON_OFFSET, COMMON_SIZE)
        self._add_virtio_cap(CfgType.NOTIFY, NOTIFY_OFFSET, REGION_SIZE)
        self._add_virtio_cap(CfgType.ISR, ISR_OFFSET, 1)
        self._add_virtio_cap(CfgType.DEVICE, DEVICE_OFFSET, REGION_SIZE)
        # VIRTIO_PCI_CAP_PCI_CFG: a window onto BAR0 through config space (bar, offset,
        # length and 4 data bytes, all driver-writable); accesses to it are trapped below.
        self._pci_cfg_cap = self._add_virtio_cap(CfgType.PCI, 0, 0)
        self._shared_memory = self._add_shared_memory(device.shared_memory_regions())
        self.queues = [_Queue(size) for size in device.queue_max_sizes]
        self.msix = Msix(
            config,
            num_vectors=len(self.queues) + 1,
            bar=BAR,
            table_offset=MSIX_TABLE_OFFSET,
            pba_offset=MSIX_PBA_OFFSET,
            allocate_gsi=vm.allocate_gsi,
            set_route=vm.set_msi_route,
            register_irqfd=vm.register_irqfd,
        )
        self.interrupt = Interrupt(self.msix, intx)
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        # Made once, for every worker this device will have (see QueueWorker).
        self._worker_control = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._notify_base: int | None = None
        self._worker: QueueWorker | None = None
        self._abandoned = False  # a worker that never stopped may still use the device
        self._closed = False
        self.guest_log = GuestLog(log, f"virtio {device.name}")
        self._reset_state()

    def _add_virtio_cap(self, cfg_type: CfgType, offset: int, length: int) -> int:
        """Add the vendor capability for the `length` bytes at `offset` in BAR; its offset."""
        ctype = _CAP_STRUCTS.get(cfg_type, "struct virtio_pci_cap")
        full: Any = ffi.new(f"{ctype} *")
        cap: Any = ffi.cast("struct virtio_pci_cap *", full)  # each capability starts with one
        cap.cap_len = ffi.sizeof(ctype)
        cap.cfg_type = cfg_type
        cap.bar = BAR
        cap.offset = offset
        cap.length = length
        writable = None
        if cfg_type == CfgType.NOTIFY:
            full.notify_off_multiplier = NOTIFY_MULTIPLIER
        elif cfg_type == CfgType.PCI:
            # The driver aims the access window with bar, offset and length, and moves data
            # through pci_cfg_data (virtio 1.2, 4.1.4.9).
            mask: Any = ffi.new(f"{ctype} *")
            mask.cap.bar = 0xFF
            mask.cap.offset = mask.cap.length = 0xFFFFFFFF
            mask.pci_cfg_data = [0xFF] * len(mask.pci_cfg_data)
            writable = ffi.buffer(mask)[CAP_HEADER_SIZE:]
        body = ffi.buffer(full)[CAP_HEADER_SIZE:]
        return self.config.add_capability(CapabilityId.VENDOR, body, writable)

    def _add_shared_memory(self, regions: list[SharedMemoryRegion]) -> dict[int, int]:
        """Lay the device's shared memory regions out in their own BAR, each described by a
        shared memory capability; {region id: offset in the BAR}."""
        if not regions:
            return {}
        offsets: dict[int, int] = {}
        end = 0
        for region in regions:
            align = max(PAGE_SIZE, 1 << (region.size - 1).bit_length())
            offset = -(-end // align) * align
            offsets[region.id] = offset
            end = offset + region.size
            cap: Any = ffi.new("struct virtio_pci_cap64 *")
            cap.cap.cap_len = ffi.sizeof(cap[0])
            cap.cap.cfg_type = CfgType.SHARED_MEMORY
            cap.cap.bar = SHARED_MEMORY_BAR
            cap.cap.id = region.id
            cap.cap.offset, cap.offset_hi = offset & 0xFFFFFFFF, offset >> 32
            cap.cap.length, cap.length_hi = region.size & 0xFFFFFFFF, region.size >> 32
            self.config.add_capability(CapabilityId.VENDOR, ffi.buffer(cap)[CAP_HEADER_SIZE:])
        self.config.add_bar64(SHARED_MEMORY_BAR, 1 << (end - 1).bit_length(), prefetchable=True)
        return offsets

    def _reset_state(self) -> None:
        """The registers of a freshly reset device (the interrupt resets its own state)."""
        self.interrupt.reset()
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.interrupt.config_vector = NO_VECTOR
        self.queue_select = 0
        for q in self.queues:
            q.reset()

    @property
    def status(self) -> DeviceStatus:
        return self.interrupt.status

    @property
    def offered_features(self) -> int:
        transport = Feature.VERSION_1 | Feature.RING_INDIRECT_DESC | Feature.RING_EVENT_IDX
        return self.device.device_features | int(transport)

    # PCI config space: trap the VIRTIO_PCI_CAP_PCI_CFG data window.
    def _pci_cfg_window(self) -> tuple[int, int, int, int]:
        at = self._pci_cfg_cap
        window: Any = ffi.from_buffer(
            "struct virtio_pci_cfg_cap *", self.config.data[at : at + _CFG_CAP_SIZE]
        )
        return window.cap.bar, window.cap.offset, window.cap.length, at + _CFG_DATA_AT

    def config_read(self, offset: int, data: memoryview) -> None:
        bar, off, length, data_at = self._pci_cfg_window()
        if offset == data_at and bar == BAR and length in (1, 2, 4) and len(data) >= length:
            self.bar_read(BAR, off, data[:length])
            data[length:] = b"\x00" * (len(data) - length)
            return
        self.config.read(offset, data)

    def config_write(self, offset: int, data: bytes | memoryview) -> BarWindows | None:
        bar, off, length, data_at = self._pci_cfg_window()
        if offset == data_at and bar == BAR and length in (1, 2, 4) and len(data) >= length:
            self.bar_write(BAR, off, bytes(data[:length]))
            return None
        windows = super().config_write(offset, data)
        self.msix.control_written()
        return windows

    # BAR0.
    def bars_changed(self, mapped: dict[int, int]) -> None:
        if self._shared_memory:
            base = mapped.get(SHARED_MEMORY_BAR)
            self.device.shared_memory_moved(
                {i: None if base is None else base + off for i, off in self._shared_memory.items()}
            )
        with self._lock:
            base = mapped.get(BAR)
            new = None if base is None else base + NOTIFY_OFFSET
            if new == self._notify_base:
                return
            for i, fd in enumerate(self.notify_fds):
                if self._notify_base is not None:
                    self._vm.unregister_ioeventfd(fd, self._notify_base + i * NOTIFY_MULTIPLIER, 0)
                if new is not None:
                    self._vm.register_ioeventfd(fd, new + i * NOTIFY_MULTIPLIER, 0)
            self._notify_base = new

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        with self._lock:
            if offset < COMMON_OFFSET + REGION_SIZE:
                self._common_read(offset - COMMON_OFFSET, data)
            elif offset == ISR_OFFSET:
                data[:] = bytes([self.interrupt.read_isr()]) + b"\x00" * (len(data) - 1)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
                self.device.config_read(offset - DEVICE_OFFSET, data)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + REGION_SIZE:
                self.msix.table_read(offset - MSIX_TABLE_OFFSET, data)
            elif MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + REGION_SIZE:
                self.msix.pba_read(offset - MSIX_PBA_OFFSET, data)
            else:
                data[:] = b"\x00" * len(data)

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        with self._lock:
            if offset < COMMON_OFFSET + REGION_SIZE:
                self._common_write(offset - COMMON_OFFSET, bytes(data))
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
                self.device.config_write(offset - DEVICE_OFFSET, data)
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + REGION_SIZE:
                # Reached only when the access did not match the ioeventfd (another width).
                index = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
                if index < len(self.notify_fds):
                    os.eventfd_write(self.notify_fds[index], 1)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + REGION_SIZE:
                self.msix.table_write(offset - MSIX_TABLE_OFFSET, data)

    # The common configuration structure.
    def _selected_queue(self) -> _Queue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    def _common_value(self, reg: CommonReg) -> int:
        match reg:
            case CommonReg.DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            case CommonReg.DEVICE_FEATURE:
                return _feature_word(self.offered_features, self.device_feature_select)
            case CommonReg.GUEST_FEATURE_SELECT:
                return self.driver_feature_select
            case CommonReg.GUEST_FEATURE:
                return _feature_word(self.driver_features, self.driver_feature_select)
            case CommonReg.MSIX_CONFIG:
                return self.interrupt.config_vector
            case CommonReg.NUM_QUEUES:
                return len(self.queues)
            case CommonReg.DEVICE_STATUS:
                return int(self.interrupt.status)
            case CommonReg.CONFIG_GENERATION:
                return self.interrupt.config_generation
            case CommonReg.QUEUE_SELECT:
                return self.queue_select
        return self._queue_value(reg)

    def _queue_value(self, reg: CommonReg) -> int:
        q = self._selected_queue()
        if q is None:
            return 0
        match reg:
            case CommonReg.QUEUE_SIZE:
                return q.size
            case CommonReg.QUEUE_MSIX_VECTOR:
                return q.msix_vector
            case CommonReg.QUEUE_ENABLE:
                return q.enable
            case CommonReg.QUEUE_NOTIFY_OFF:
                return self.queue_select
            case CommonReg.QUEUE_DESC_LO:
                return _low(q.desc)
            case CommonReg.QUEUE_DESC_HI:
                return _high(q.desc)
            case CommonReg.QUEUE_AVAIL_LO:
                return _low(q.avail)
            case CommonReg.QUEUE_AVAIL_HI:
                return _high(q.avail)
            case CommonReg.QUEUE_USED_LO:
                return _low(q.used)
            case CommonReg.QUEUE_USED_HI:
                return _high(q.used)
        return 0

    def _common_read(self, offset: int, data: memoryview) -> None:
        reg = _common_reg(offset, len(data))
        if reg is None:
            data[:] = b"\x00" * len(data)
            return
        data[:] = self._common_value(reg).to_bytes(len(data), "little")

    def _common_write(self, offset: int, data: bytes) -> None:
        reg = _common_reg(offset, len(data))
        if reg is None:
            return
        value = int.from_bytes(data, "little")
        match reg:
            case CommonReg.DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
            case CommonReg.GUEST_FEATURE_SELECT:
                self.driver_feature_select = value
            case CommonReg.GUEST_FEATURE:
                if DeviceStatus.FEATURES_OK not in self.status and self.driver_feature_select <= 1:
                    shift = 32 * self.driver_feature_select
                    mask = 0xFFFFFFFF << shift
                    self.driver_features = (self.driver_features & ~mask) | (value << shift)
            case CommonReg.MSIX_CONFIG:
                self.interrupt.config_vector = value
            case CommonReg.DEVICE_STATUS:
                self._set_status(value)
            case CommonReg.QUEUE_SELECT:
                self.queue_select = value
            case _:  # a queue's registers; writes to the read-only ones change nothing
                self._queue_write(reg, value)

    def _queue_write(self, reg: CommonReg, value: int) -> None:
        q = self._selected_queue()
        if q is None or DeviceStatus.DRIVER_OK in self.status:
            return  # queue registers are fixed once the device is live
        match reg:
            case CommonReg.QUEUE_SIZE:
                q.size = value
            case CommonReg.QUEUE_MSIX_VECTOR:
                q.msix_vector = value
            case CommonReg.QUEUE_ENABLE:
                q.enable = value & 1
            case CommonReg.QUEUE_DESC_LO:
                q.desc = _with_low(q.desc, value)
            case CommonReg.QUEUE_DESC_HI:
                q.desc = _with_high(q.desc, value)
            case CommonReg.QUEUE_AVAIL_LO:
                q.avail = _with_low(q.avail, value)
            case CommonReg.QUEUE_AVAIL_HI:
                q.avail = _with_high(q.avail, value)
            case CommonReg.QUEUE_USED_LO:
                q.used = _with_low(q.used, value)
            case CommonReg.QUEUE_USED_HI:
                q.used = _with_high(q.used, value)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        new = DeviceStatus(value & 0xFF)
        with self.interrupt.lock:
            old = self.interrupt.status
            if old & ~new:
                return  # status bits only accumulate; only a write of 0 clears them
            if DeviceStatus.FEATURES_OK in new and DeviceStatus.FEATURES_OK not in old:
                unoffered = self.driver_features & ~self.offered_features
                if unoffered or not self.driver_features & Feature.VERSION_1:
                    self.guest_log.info(
                        "features", "refusing driver features %#x", self.driver_features
                    )
                    new &= ~DeviceStatus.FEATURES_OK
            starting = DeviceStatus.DRIVER_OK in new and DeviceStatus.DRIVER_OK not in old
            if starting and DeviceStatus.FEATURES_OK not in new:
                new = new & ~DeviceStatus.DRIVER_OK | DeviceStatus.DEVICE_NEEDS_RESET
                starting = False
            self.interrupt.status = new
        if starting:
            self._activate()

    def _activate(self) -> None:
        if self._abandoned:
            self.guest_log.warning(
                "activation", "not activated: the worker of an earlier activation never stopped"
            )
            self._needs_reset()
            return
        event_idx = bool(self.driver_features & Feature.RING_EVENT_IDX)
        active: dict[int, tuple[SplitQueue, int]] = {}
        try:
            for index, q in enumerate(self.queues):
                if not q.enable:
                    continue
                if q.size > q.max_size:
                    raise QueueError(f"queue {index}: size {q.size} above {q.max_size}")
                try:
                    queue = SplitQueue(self.mem, q.size, q.desc, q.avail, q.used, event_idx)
                except QueueError as e:
                    raise QueueError(f"queue {index}: {e}") from e
                active[index] = (queue, self.notify_fds[index])
            check_rings_apart(
                [area.renamed(f"queue {i} ") for i, (q, _) in active.items() for area in q.areas]
            )
        except QueueError as e:
            self.guest_log.warning("activation", "cannot activate: %s", e)
            for queue, _ in active.values():
                queue.release()
            self._needs_reset()
            return
        self.interrupt.queue_vectors = {i: self.queues[i].msix_vector for i in active}
        queues = {index: queue for index, (queue, _) in active.items()}
        self.device.activate(self.mem, self.interrupt, queues, self.driver_features)
        notify = {index: fd for index, (_, fd) in active.items()}
        kernel_runs = self.device.take_notifications(notify)
        watched: dict[int, tuple[SplitQueue, int | None]] = {
            index: (queue, None if index in kernel_runs else fd)
            for index, (queue, fd) in active.items()
        }
        self._worker = QueueWorker(self.device, watched, self.interrupt, self._worker_control)
        self._worker.start()

    def _needs_reset(self) -> None:
        self.interrupt.set_needs_reset()

    def _reset(self) -> None:
        self._stop_worker()
        if not self._abandoned:
            self.device.reset()
        self._reset_state()

    def _stop_worker(self) -> None:
        """Stop the worker (bounded); its queues let go of guest memory once it has ended. A
        worker that does not stop keeps its device: the device is never activated again."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if not worker.stop():
            self._abandoned = True
            return
        for queue, _ in worker.queues.values():
            queue.release()

    # VMM control.
    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request for the device itself (VirtioDevice.command)."""
        return self.device.command(request)

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> bool:
        """Park the device's worker; False if it did not park within `timeout` seconds."""
        return self._worker is None or self._worker.pause(timeout)

    def resume(self) -> None:
        if self._worker is not None:
            self._worker.resume()

    def close(self) -> None:
        """Release the device's files; again does nothing (a device process closes its device
        when the VMM says so, and once more on its way out)."""
        if self._closed:
            return
        self._closed = True
        self._reset()
        self.msix.close()
        if self._abandoned:
            return  # the stuck worker may still use the device's files and the notify fds
        self.device.close()
        for fd in [*self.notify_fds, self._worker_control]:
            if fd >= 0:  # closing twice is allowed
                os.close(fd)
        self.notify_fds, self._worker_control = [], -1
