"""The compiled virtqueue helper agrees with the declarations Python uses for it."""

from __future__ import annotations

from pyvmm.devices.virtio import queue
from pyvmm.native import virtq

RING_FACTS = 6  # the ring layout facts at the end of pyvmm_virtq_layout's list


def test_the_c_structs_match_their_python_declarations() -> None:
    c_side = virtq.layout()
    assert c_side[:-RING_FACTS] == virtq.expected_layout()


def test_the_c_side_assumes_the_ring_layout_of_the_header() -> None:
    """virtq.c's ring offsets are those of pyvmm's vring declarations, which test_headers.py
    checks against <linux/virtio_ring.h>."""
    ffi = queue.ffi
    assert virtq.layout()[-RING_FACTS:] == [
        ffi.sizeof("struct vring_desc"),
        ffi.offsetof("struct vring_avail", "idx"),
        ffi.offsetof("struct vring_avail", "ring"),
        ffi.offsetof("struct vring_used", "idx"),
        ffi.offsetof("struct vring_used", "ring"),
        ffi.sizeof("struct vring_used_elem"),
    ]


def test_an_iovec_is_the_kernels() -> None:
    """The loops hand their iovec arrays to readv and writev as they are."""
    import ctypes

    class Iovec(ctypes.Structure):
        _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]

    assert virtq.ffi.sizeof("struct pyvmm_iovec") == ctypes.sizeof(Iovec)
    assert virtq.ffi.offsetof("struct pyvmm_iovec", "len") == Iovec.iov_len.offset
