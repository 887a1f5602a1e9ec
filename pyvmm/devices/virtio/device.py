"""What a virtio device backend provides to the transport, and the feature bits they share."""

from __future__ import annotations

import abc
import enum
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

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


class DeviceInterrupt(Protocol):
    """What an activated device and its worker may use to signal the driver (implemented by
    `pyvmm.devices.virtio.interrupt.Interrupt`)."""

    def signal_used(self, queue: int) -> None:
        """Buffers were added to `queue`'s used ring and the driver asked to be told."""

    def signal_config_changed(self) -> None:
        """The device configuration space changed."""

    def set_needs_reset(self) -> None:
        """The device cannot go on until the driver resets it."""

    @property
    def resample_fd(self) -> int:
        """An fd that becomes readable when a level interrupt may need raising again."""

    def resample(self) -> None:
        """Called by the worker when `resample_fd` is readable."""

    def direct_fd(self, queue: int) -> int | None:
        """An eventfd that raises `queue`'s interrupt when written (None: use signal_used)."""

    def watch_delivery(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` whenever `direct_fd` may have changed (None: stop)."""


# Called when an event source is readable; returns whether to keep watching it. A source that
# returns False (a TAP with no receive buffers to read into) is left alone until the next
# notification on one of the device's queues has been processed.
EventHandler = Callable[[], bool]


@dataclass(frozen=True)
class SharedMemoryRegion:
    """A range of memory the device shares with the driver (virtio 1.2, 2.10): `size` bytes,
    known to the driver by `id` (virtio-fs maps file contents there; virtio-pmem, its image)."""

    id: int
    size: int


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

    def activate(
        self,
        mem: GuestMemory,
        interrupt: DeviceInterrupt,
        queues: dict[int, SplitQueue],
        features: int,
    ) -> None:
        """The driver set DRIVER_OK with `features`. Everything the device may use from now on
        is given here: guest memory, its interrupt, and its enabled queues by index (processed
        on its worker from now until `reset`)."""
        self.mem = mem
        self.interrupt = interrupt
        self.queues = queues
        self.features = features

    def event_sources(self) -> dict[int, EventHandler]:
        """Other fds the worker should wait on while the device is active (a TAP, a socket, a
        timer), each with what to call when it is readable. Called once after `activate`."""
        return {}

    def take_notifications(self, notify: dict[int, int]) -> set[int]:
        """Offered after `activate`: the eventfds the driver's notifications arrive on, by queue.
        A device whose queues a kernel backend runs (vhost) takes theirs and returns those
        queues' indexes; the worker then leaves them alone. By default the worker keeps all."""
        return set()

    def park(self) -> None:  # noqa: B027
        """The worker is parking (the VM is being suspended): stop whatever runs the queues
        outside the worker (a vhost backend) until `unpark`."""

    def unpark(self) -> None:  # noqa: B027
        """The worker goes on after `park`."""

    def has_work(self, index: int, queue: SplitQueue) -> bool:
        """Whether `process_queue` should run again at once (the worker's round left chains
        waiting). A queue of buffers the device fills when data comes (net receive) has none:
        its chains wait for the data, not for the worker."""
        return queue.has_pending()

    def shared_memory_regions(self) -> list[SharedMemoryRegion]:
        """The device's shared memory regions, fixed for its life; none by default."""
        return []

    def shared_memory_moved(self, placed: dict[int, int | None]) -> None:  # noqa: B027
        """Where the guest now has each shared memory region, by id (None: not reachable); the
        device maps its memory there."""

    @property
    def new_fds(self) -> int:
        """How many fds the device may make while it runs (sockets it accepts or is handed),
        beyond those it holds when built: a jailed device process has room for no more."""
        return 0

    def keep_fds(self) -> list[int]:
        """The host fds the device holds (backing files, sockets): what a device process will
        need besides guest memory and its queues' eventfds."""
        return []

    @abc.abstractmethod
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Take every available chain from `queue`, do the work, add each to the used ring.
        Raise DeviceError when the driver broke the device's rules badly enough that only a
        reset can recover."""

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request from the VMM (a balloon's new size), from any thread; its answer. Raise
        ValueError for a request the device does not take."""
        raise ValueError(f"virtio {self.name} takes no commands")

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


def receivable_chain(
    queue: SplitQueue, min_len: int, guest_log: GuestLog
) -> DescriptorChain | None:
    """The next chain fit for the device to write into (no readable buffer, at least `min_len`
    writable bytes), or None; invalid and unfit ones are given back empty on the way. A bad
    head index, which leaves nothing to give back, is raised."""
    while True:
        try:
            chain = queue.pop()
        except InvalidChain as e:
            if e.head is None:
                raise
            guest_log.info("bad chain", "rx chain %d: %s", e.head, e)
            queue.add_used(e.head, 0)
            continue
        if chain is None:
            return None
        if chain.readable_len or chain.writable_len < min_len:
            guest_log.info(
                "bad chain", "rx chain %d: %d readable bytes, %d writable", chain.head,
                chain.readable_len, chain.writable_len,
            )  # fmt: skip
            queue.add_used(chain.head, 0)
            continue
        return chain
