"""The driver's side of split virtqueues for tests: where ring fields are and how descriptors are
encoded, from pyvmm's declarations (checked against <linux/virtio_ring.h>), so the tests and the
device agree with the header rather than with each other."""

from __future__ import annotations

from typing import Any

from pyvmm.devices.virtio.queue import ffi

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
