"""virtio-balloon (virtio 1.2, 5.5): the guest gives pages back to the host and takes them again.

The VMM sets the absolute number of 4 KiB pages the balloon should hold (`num_pages`); the
driver inflates (sends the frame numbers of pages it gave up on the inflate queue) or deflates
(the deflate queue) towards it and writes how many it holds (`actual`). Inflated pages go back
to the host at once with MADV_REMOVE on the guest memfd (GuestMemory.discard): MADV_DONTNEED
would free nothing, as the VMM and the device processes share the memory, while a hole punched
in the memfd frees it for all of them and later reads see zeros. A deflated page needs nothing:
the guest's next touch allocates it again.

Also: memory statistics (VIRTIO_BALLOON_F_STATS_VQ; the driver's one buffer is held and given
back when the VMM asks for fresh numbers), DEFLATE_ON_OOM (offered; the driver's business), and
free page reporting behind an option (VIRTIO_BALLOON_F_REPORTING: the driver lends ranges of
free memory, which go back to the host as inflated pages do).

Queue indexes run over the queues the driver accepted, as Linux and QEMU number them: inflate
0, deflate 1, then stats if negotiated, then reporting if negotiated. Frame numbers outside guest
RAM (beyond it, in the PCI hole) are refused and logged once; the VM goes on.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import struct
import threading
from typing import Any

from pyvmm.cdecl import declare, struct_for
from pyvmm.devices.virtio.device import (
    DeviceInterrupt,
    DeviceType,
    EventHandler,
    VirtioDevice,
    available_chains,
)
from pyvmm.devices.virtio.iov import read_at
from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from pyvmm.ratelimit import GuestLog

log = logging.getLogger(__name__)

ffi: Any = declare(
    "virtio_balloon",
    """
    struct virtio_balloon_config {
        uint32_t num_pages;
        uint32_t actual;
        uint32_t free_page_hint_cmd_id;
        uint32_t poison_val;
    };
    struct virtio_balloon_stat {
        uint16_t tag;
        uint64_t val;
    };
    """,
    packed=True,
)

CONFIG = struct_for(ffi, "struct virtio_balloon_config", "num_pages", "actual")
CONFIG_SIZE: int = ffi.sizeof("struct virtio_balloon_config")
ACTUAL_AT: int = ffi.offsetof("struct virtio_balloon_config", "actual")
STAT = struct_for(ffi, "struct virtio_balloon_stat", "tag", "val")
PFN_SHIFT = 12  # frame numbers count 4 KiB pages whatever the guest's page size
PFN = struct.Struct("<I")
QUEUE_SIZE = 128
# The most frame numbers one inflate or deflate buffer may carry: a queue's worth of Linux's
# 256-entry arrays is what a driver sends at most; more is a guest making the device work.
MAX_PFNS_PER_BUFFER = 1 << 16
MAX_STATS = 64  # stat entries read from one buffer (the spec defines 10 tags)


class BalloonFeature(enum.IntFlag):
    MUST_TELL_HOST = 1 << 0
    STATS_VQ = 1 << 1
    DEFLATE_ON_OOM = 1 << 2
    FREE_PAGE_HINT = 1 << 3
    PAGE_POISON = 1 << 4
    REPORTING = 1 << 5


class Stat(enum.IntEnum):
    """Memory statistics tags, named as `pyvmm balloon_stats` prints them."""

    swap_in = 0
    swap_out = 1
    major_faults = 2
    minor_faults = 3
    free_memory = 4
    total_memory = 5
    available_memory = 6
    disk_caches = 7
    hugetlb_allocations = 8
    hugetlb_failures = 9


class Role(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    REPORTING = "reporting"


class Balloon(VirtioDevice):
    """The device. `command` is how the VMM drives it, from any thread."""

    device_type = DeviceType.BALLOON
    name = "balloon"

    def __init__(self, page_reporting: bool = False) -> None:
        self.page_reporting = page_reporting
        self._lock = threading.Lock()  # the fields the VMM's commands and the worker share
        self._target_pages = 0
        self._actual_pages = 0
        self._config_raw = bytearray(CONFIG_SIZE)  # what the driver wrote, byte by byte
        self._active = False
        self._stats: dict[str, int] | None = None
        self._stats_replies = 0  # buffers the driver refreshed because the device asked
        self._stats_wanted = False
        self._awaiting_reply = False
        self._held_stats: int | None = None  # the driver's stats buffer, while the device has it
        self._discarded_pages = 0
        self._roles: dict[int, Role] = {}
        # Wakes the worker for a statistics request (made before any jail: it cannot open fds).
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Bad frame numbers are logged once for the VM's life (then counted).
        self._pfn_log = GuestLog(log, "virtio balloon", burst=1, interval=math.inf)

    # ---- what the transport asks ----

    @property
    def queue_max_sizes(self) -> list[int]:
        optional = 1 + (1 if self.page_reporting else 0)  # stats, reporting
        return [QUEUE_SIZE] * (2 + optional)

    @property
    def device_features(self) -> int:
        features = BalloonFeature.STATS_VQ | BalloonFeature.DEFLATE_ON_OOM
        if self.page_reporting:
            features |= BalloonFeature.REPORTING
        return int(features)

    def config_read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            config = bytearray(self._config_raw)
            CONFIG.pack_into(config, 0, self._target_pages, self._actual_pages)
        chunk = bytes(config[offset : offset + len(data)]) if 0 <= offset < CONFIG_SIZE else b""
        data[:] = chunk + b"\x00" * (len(data) - len(chunk))

    def config_write(self, offset: int, data: bytes | memoryview) -> None:
        """Only `actual` is the driver's to write (what it holds, in pages)."""
        start, end = max(offset, ACTUAL_AT), min(offset + len(data), ACTUAL_AT + PFN.size)
        if start >= end:
            return
        with self._lock:
            self._config_raw[start:end] = bytes(data[start - offset : end - offset])
            (self._actual_pages,) = PFN.unpack_from(self._config_raw, ACTUAL_AT)

    def activate(
        self,
        mem: GuestMemory,
        interrupt: DeviceInterrupt,
        queues: dict[int, SplitQueue],
        features: int,
    ) -> None:
        super().activate(mem, interrupt, queues, features)
        roles = [Role.INFLATE, Role.DEFLATE]
        if features & BalloonFeature.STATS_VQ:
            roles.append(Role.STATS)
        if features & BalloonFeature.REPORTING:
            roles.append(Role.REPORTING)
        self._roles = dict(enumerate(roles))
        with self._lock:
            self._active = True

    def event_sources(self) -> dict[int, EventHandler]:
        return {self._wake: self._on_wake}

    def keep_fds(self) -> list[int]:
        return [self._wake]

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        role = self._roles.get(index)
        for chain in available_chains(queue, self.guest_log):
            if role is Role.INFLATE or role is Role.DEFLATE:
                self._pages(role, chain.head, chain.readable, chain.readable_len)
            elif role is Role.STATS:
                self._stats_buffer(chain.readable, chain.readable_len)
                if self._held_stats is not None:  # a driver should have one; the older goes back
                    queue.add_used(self._held_stats, 0)
                self._held_stats = chain.head
                if self._stats_wanted_now():
                    self._give_back_stats(queue)
                continue
            elif role is Role.REPORTING:
                self._reported(chain.writable)
            queue.add_used(chain.head, 0)

    def reset(self) -> None:
        with self._lock:
            self._active = False
            self._actual_pages = 0
            self._config_raw = bytearray(CONFIG_SIZE)
            self._held_stats = None
            self._stats_wanted = False
            self._awaiting_reply = False
        self._roles = {}

    def close(self) -> None:
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    # ---- the VMM's commands ----

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """`{"op": "set_target", "pages": N}`: hold N pages (the driver is told);
        `{"op": "request_stats"}`: ask the driver for fresh statistics (they come later: watch
        `stats_replies` in the status grow); `{"op": "status"}`: the target, what the driver
        holds, the latest statistics and what was given back to the host."""
        op = request.get("op")
        if op == "set_target":
            pages = request.get("pages")
            if not isinstance(pages, int) or not 0 <= pages <= 0xFFFFFFFF:
                raise ValueError(f"balloon target {pages!r} is not a page count")
            self._set_target(pages)
        elif op == "request_stats":
            with self._lock:
                self._stats_wanted = True
            os.eventfd_write(self._wake, 1)
        elif op != "status":
            raise ValueError(f"the balloon has no command {op!r}")
        with self._lock:
            return {
                "target_pages": self._target_pages,
                "actual_pages": self._actual_pages,
                "stats": dict(self._stats) if self._stats is not None else None,
                "stats_replies": self._stats_replies,
                "discarded_pages": self._discarded_pages,
                "driver": self._active,
            }

    def _set_target(self, pages: int) -> None:
        with self._lock:
            changed = pages != self._target_pages
            self._target_pages = pages
            tell = changed and self._active
        if tell:
            self.interrupt.signal_config_changed()

    # ---- the queues ----

    def _pages(self, role: Role, head: int, readable: list[memoryview], length: int) -> None:
        if length % PFN.size or length > MAX_PFNS_PER_BUFFER * PFN.size:
            self.guest_log.info("bad buffer", "%s chain %d: %d bytes is not a list of frame "
                                "numbers", role.value, head, length)  # fmt: skip
            return
        data = read_at(readable, 0, length)
        pfns = sorted(set(struct.unpack(f"<{length // PFN.size}I", data)))
        if role is Role.DEFLATE and pfns:
            # Nothing to do but refuse frames outside RAM: one look when all lie in one region.
            span = (pfns[-1] - pfns[0] + 1) << PFN_SHIFT
            if self.mem.is_ram(pfns[0] << PFN_SHIFT, span):
                return
        for first, count in _runs(pfns):
            if role is Role.INFLATE:
                self._discard_pages(role, first, count)
            elif not self.mem.is_ram(first << PFN_SHIFT, count << PFN_SHIFT):
                self._bad_pfns(role, first, count)

    def _discard_pages(self, role: Role, first: int, count: int) -> None:
        discarded = count
        try:
            self.mem.discard(first << PFN_SHIFT, count << PFN_SHIFT)
        except GuestMemoryError:
            # Part of the run may be RAM (a run across the end of a region): page by page.
            discarded = 0
            for pfn in range(first, first + count):
                try:
                    self.mem.discard(pfn << PFN_SHIFT, PAGE_SIZE)
                    discarded += 1
                except GuestMemoryError:
                    self._bad_pfns(role, pfn, 1)
        with self._lock:
            self._discarded_pages += discarded

    def _bad_pfns(self, role: Role, first: int, count: int) -> None:
        self._pfn_log.warning("bad pfn", "%s: %d frame(s) from %#x (guest address %#x) are not "
                              "guest RAM; refused", role.value, count, first,
                              first << PFN_SHIFT)  # fmt: skip

    def _reported(self, writable: list[memoryview]) -> None:
        """Free page reporting: each buffer is a range of free guest memory, lent to the host."""
        for view in writable:
            addr, length = self.mem.guest_range(view)
            start = -(-addr // PAGE_SIZE) * PAGE_SIZE
            end = (addr + length) // PAGE_SIZE * PAGE_SIZE
            if end > start:
                self.mem.discard(start, end - start)
                with self._lock:
                    self._discarded_pages += (end - start) // PAGE_SIZE

    def _stats_buffer(self, readable: list[memoryview], length: int) -> None:
        count = min(length // STAT.size, MAX_STATS)
        data = read_at(readable, 0, count * STAT.size)
        stats: dict[str, int] = {}
        for tag, value in STAT.iter_unpack(data):
            with contextlib.suppress(ValueError):  # tags from a later spec: not ours to name
                stats[Stat(tag).name] = value
        with self._lock:
            self._stats = stats
            if self._awaiting_reply:
                self._stats_replies += 1
                self._awaiting_reply = False

    def _stats_wanted_now(self) -> bool:
        with self._lock:
            wanted, self._stats_wanted = self._stats_wanted, False
            return wanted

    def _give_back_stats(self, queue: SplitQueue) -> None:
        """The driver refreshes its statistics when its buffer comes back, and sends it again."""
        if self._held_stats is None:
            return
        with self._lock:
            self._awaiting_reply = True
        queue.add_used(self._held_stats, 0)
        self._held_stats = None
        if queue.needs_interrupt():
            index = next(i for i, r in self._roles.items() if r is Role.STATS)
            self.interrupt.signal_used(index)

    def _on_wake(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        stats = next((i for i, r in self._roles.items() if r is Role.STATS), None)
        queue = self.queues.get(stats) if stats is not None else None
        if queue is not None and self._held_stats is not None and self._stats_wanted_now():
            self._give_back_stats(queue)
        return True


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Sorted, distinct frame numbers as (first, count) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
