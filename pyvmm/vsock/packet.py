"""virtio-vsock packets (virtio 1.2, 5.10.6): the header in front of each, its fields' values,
and the device's configuration and event layouts, declared as <linux/virtio_vsock.h> declares
them (tests/unit/vsock/test_packet.py checks them against it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pyvmm.cdecl import declare, struct_for

ffi: Any = declare(
    "virtio_vsock",
    """
    struct virtio_vsock_config {
        uint64_t guest_cid;
    };
    struct virtio_vsock_event {
        uint32_t id;
    };
    struct virtio_vsock_hdr {
        uint64_t src_cid;
        uint64_t dst_cid;
        uint32_t src_port;
        uint32_t dst_port;
        uint32_t len;
        uint16_t type;
        uint16_t op;
        uint32_t flags;
        uint32_t buf_alloc;
        uint32_t fwd_cnt;
    };
    """,
    packed=True,
)

HEADER_SIZE: int = ffi.sizeof("struct virtio_vsock_hdr")
HEADER = struct_for(
    ffi, "struct virtio_vsock_hdr", "src_cid", "dst_cid", "src_port", "dst_port", "len", "type",
    "op", "flags", "buf_alloc", "fwd_cnt",
)  # fmt: skip
EVENT = struct_for(ffi, "struct virtio_vsock_event", "id")
CONFIG = struct_for(ffi, "struct virtio_vsock_config", "guest_cid")

HOST_CID = 2
# CIDs a guest may not have (virtio 1.2, 5.10.4): reserved, the host's, and the "any" values.
RESERVED_CIDS = frozenset({0, 1, HOST_CID, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF})
MAX_CID = 0xFFFFFFFF  # the upper 32 bits are reserved and zero
EVENT_TRANSPORT_RESET = 0


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Shutdown(enum.IntFlag):
    """SHUTDOWN's flags, from the sender's side: it will receive / send no more."""

    RCV = 1
    SEND = 2


TYPE_STREAM = 1


@dataclass(frozen=True, slots=True)
class Header:
    """One packet header's fields."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return HEADER.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
            self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip


def check_guest_cid(cid: int) -> str | None:
    """Why `cid` cannot be a guest's context ID (None when it can)."""
    if cid in RESERVED_CIDS or not 0 <= cid <= MAX_CID:
        return f"{cid} is reserved or out of range: a guest's CID is 3 to {MAX_CID - 1}"
    return None
