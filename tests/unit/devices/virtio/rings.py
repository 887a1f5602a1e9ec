"""The driver's side of split virtqueues for tests: where ring fields are and how descriptors are
encoded, from pyvmm's declarations (checked against <linux/virtio_ring.h>), so the tests and the
device agree with the header rather than with each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvmm.devices.virtio.queue import SplitQueue, VirtqFlags, ffi
from pyvmm.memory import GuestMemory

DESC_SIZE: int = ffi.sizeof("struct vring_desc")
USED_ELEM_SIZE: int = ffi.sizeof("struct vring_used_elem")
AVAIL_FLAGS: int = ffi.offsetof("struct vring_avail", "flags")
AVAIL_IDX: int = ffi.offsetof("struct vring_avail", "idx")
USED_FLAGS: int = ffi.offsetof("struct vring_used", "flags")
USED_IDX: int = ffi.offsetof("struct vring_used", "idx")


def avail_entry(i: int) -> int:
    """Offset of avail ring entry `i` in the avail ring; entry `size` is used_event."""
    offset: int = ffi.offsetof("struct vring_avail", "ring", i)
    return offset


def used_elem(i: int) -> int:
    """Offset of used element `i` in the used ring; avail_event is where element `size` would be."""
    offset: int = ffi.offsetof("struct vring_used", "ring", i)
    return offset


def descriptor(addr: int, length: int, flags: int = 0, next: int = 0) -> bytes:
    """A struct vring_desc."""
    desc: Any = ffi.new("struct vring_desc *")
    desc.addr, desc.len, desc.flags, desc.next = addr, length, flags, next
    return bytes(ffi.buffer(desc))


def used_element(data: bytes) -> tuple[int, int]:
    """The (id, len) of a struct vring_used_elem."""
    elem: Any = ffi.from_buffer("struct vring_used_elem *", data)
    return elem.id, elem.len


class QueueDriver:
    """The guest's half of one virtqueue at `base` (descriptors, avail, used, 4 KiB each)."""

    def __init__(self, mem: GuestMemory, base: int, data: int, size: int = 16) -> None:
        self.mem = mem
        self.size = size
        self.desc_at, self.avail_at, self.used_at = base, base + 0x1000, base + 0x2000
        self.avail_idx = self.used_seen = self.free = 0
        self.next_data = data

    def queue(self) -> SplitQueue:
        return SplitQueue(self.mem, self.size, self.desc_at, self.avail_at, self.used_at, False)

    def buffer(self, data: bytes | int) -> int:
        length = data if isinstance(data, int) else len(data)
        at = self.next_data
        self.next_data += (length + 15) & ~15
        self.mem.write(at, b"\xee" * length if isinstance(data, int) else data)
        return at

    def add(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Publish a chain of (address, length, device-writable); returns its head."""
        idxs = [(self.free + n) % self.size for n in range(len(bufs))]
        self.free = (self.free + len(bufs)) % self.size
        for n, (addr, length, writable) in enumerate(bufs):
            last = n == len(bufs) - 1
            flags = (VirtqFlags.WRITE if writable else 0) | (0 if last else VirtqFlags.NEXT)
            at = self.desc_at + DESC_SIZE * idxs[n]
            self.mem.write(at, descriptor(addr, length, flags, 0 if last else idxs[n + 1]))
        self.mem.write_u16(self.avail_at + avail_entry(self.avail_idx % self.size), idxs[0])
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_at + AVAIL_IDX, self.avail_idx)
        return idxs[0]

    def written(self, head: int, length: int) -> bytes:
        """The first `length` bytes of chain `head`'s buffers, in chain order."""
        out = b""
        index = head
        while len(out) < length:
            desc: Any = ffi.from_buffer(
                "struct vring_desc *", self.mem.read(self.desc_at + DESC_SIZE * index, DESC_SIZE)
            )
            out += self.mem.read(desc.addr, min(desc.len, length - len(out)))
            if not desc.flags & VirtqFlags.NEXT:
                break
            index = desc.next
        return out

    def used(self) -> list[tuple[int, int]]:
        idx = self.mem.read_u16(self.used_at + USED_IDX)
        out = []
        while self.used_seen != idx:
            at = self.used_at + used_elem(self.used_seen % self.size)
            out.append(used_element(self.mem.read(at, USED_ELEM_SIZE)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Interrupts:
    """A device's interrupt that records which queues were signalled."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.direct: dict[int, int] = {}
        self.watcher: Callable[[], None] | None = None

    def signal_used(self, queue: int) -> None:
        self.used.append(queue)

    def signal_config_changed(self) -> None:
        raise AssertionError("no config change expected")

    def set_needs_reset(self) -> None:
        raise AssertionError("no reset expected")

    @property
    def resample_fd(self) -> int:
        return -1

    def resample(self) -> None:
        pass

    def direct_fd(self, queue: int) -> int | None:
        """Each queue's irqfd in `direct` (set by a test), else None: signal_used it is."""
        return self.direct.get(queue)

    def watch_delivery(self, callback: Callable[[], None] | None) -> None:
        self.watcher = callback
