"""What a virtio device backend provides to the transport, and the feature bits they share."""

from __future__ import annotations

import abc
import enum
import functools
import logging
from collections.abc import Iterator

from pyvmm.devices.virtio.queue import DescriptorChain, InvalidChain, SplitQueue
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit import GuestLog

log = logging.getLogger(__name__)


class DeviceType(enum.IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    VSOCK = 19


class Feature(enum.IntFlag):
    """Transport-level feature bits (virtio 1.2 section 6)."""

    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceError(Exception):
    """The device cannot go on with this driver: the transport sets DEVICE_NEEDS_RESET."""


class VirtioDevice(abc.ABC):
    """A device backend. Its queues are processed on the device's worker thread; everything
    it touches is guest memory and its own file descriptors, so it can run in another process."""

    device_type: DeviceType
    name: str

    @functools.cached_property
    def guest_log(self) -> GuestLog:
        """Where the device reports what the guest did wrong (rate-limited)."""
        return GuestLog(log, f"virtio {self.name}")

    @property
    @abc.abstractmethod
    def queue_max_sizes(self) -> list[int]:
        """The maximum size of each of the device's queues."""

    @property
    @abc.abstractmethod
    def device_features(self) -> int:
        """Device-specific feature bits offered (the transport adds its own)."""

    @abc.abstractmethod
    def config_read(self, offset: int, data: memoryview) -> None:
        """Fill `data` from the device-specific configuration space."""

    def config_write(self, offset: int, data: bytes | memoryview) -> None:  # noqa: B027
        """The driver wrote the device configuration space; read-only by default."""

    def activate(self, mem: GuestMemory, features: int) -> None:
        """The driver set DRIVER_OK with `features`; queues are about to be processed."""
        self.mem = mem
        self.features = features

    @abc.abstractmethod
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Take every available chain from `queue`, do the work, add each to the used ring.
        Raise DeviceError when the driver broke the device's rules badly enough that only a
        reset can recover."""

    def reset(self) -> None:  # noqa: B027
        """The driver reset the device: forget the activation."""

    def close(self) -> None:  # noqa: B027
        """Release host resources (files) when the VM ends."""


def available_chains(queue: SplitQueue, guest_log: GuestLog) -> Iterator[DescriptorChain]:
    """The chains the driver made available, up to `queue.budget` of them (the worker's bound
    on one round). An invalid chain was consumed, so it is given back empty; a bad head index
    leaves nothing to give back, so only a reset can bring the driver and the device back in
    step (DeviceError)."""
    while queue.budget > 0:
        queue.budget -= 1
        try:
            chain = queue.pop()
        except InvalidChain as e:
            if e.head is None:
                raise DeviceError(f"{e}: nothing to return to the driver") from e
            guest_log.info("bad chain", "bad descriptor chain %d: %s", e.head, e)
            queue.add_used(e.head, 0)
            continue
        if chain is None:
            return
        yield chain
