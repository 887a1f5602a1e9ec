"""vhost: the host kernel runs a virtio device's queues, as crosvm and QEMU use it where it
exists: vhost-net (/dev/vhost-net) for a NIC, vhost-vsock (/dev/vhost-vsock) for vsock. The VMM
hands it guest memory (as a table of this process's mappings), each queue's rings, size and next
index, the eventfd the guest's notifications arrive on (kick) and the eventfd it signals used
buffers on (call); then the NIC's TAP (vhost-net), or the guest's CID and the go-ahead
(vhost-vsock). Data then moves without waking the VMM.

The structs and ioctl numbers are declared from <linux/vhost.h> and <linux/vhost_types.h>
(tests/unit/test_vhost.py checks them against the headers). Every ioctl is on an fd the
caller opened: a jailed device process receives the vhost fd ready-made, and becomes its owner
(VHOST_SET_OWNER binds it to the calling process's memory) before its filter goes in.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from typing import Any

from pyvmm.cdecl import declare
from pyvmm.ioc import IOC_NONE, IOC_READ, IOC_WRITE, ioc

ffi: Any = declare(
    "vhost",
    """
    struct vhost_vring_state {
        unsigned int index;
        unsigned int num;
    };
    struct vhost_vring_file {
        unsigned int index;
        int fd;
    };
    struct vhost_vring_addr {
        unsigned int index;
        unsigned int flags;
        uint64_t desc_user_addr;
        uint64_t used_user_addr;
        uint64_t avail_user_addr;
        uint64_t log_guest_addr;
    };
    struct vhost_memory_region {
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
        uint64_t flags_padding;
    };
    struct vhost_memory {
        uint32_t nregions;
        uint32_t padding;
        struct vhost_memory_region regions[];
    };
    """,
)

VHOST_NET_PATH = "/dev/vhost-net"
VHOST_VSOCK_PATH = "/dev/vhost-vsock"
VHOST_VIRTIO = 0xAF
VHOST_FILE_UNBIND = -1
_U64 = struct.Struct("Q")
_INT = struct.Struct("i")


def _size(ctype: str) -> int:
    size: int = ffi.sizeof(ctype)
    return size


class VhostIoctl(enum.IntEnum):
    VHOST_GET_FEATURES = ioc(IOC_READ, VHOST_VIRTIO, 0x00, _U64.size)
    VHOST_SET_FEATURES = ioc(IOC_WRITE, VHOST_VIRTIO, 0x00, _U64.size)
    VHOST_SET_OWNER = ioc(IOC_NONE, VHOST_VIRTIO, 0x01)
    VHOST_SET_MEM_TABLE = ioc(IOC_WRITE, VHOST_VIRTIO, 0x03, _size("struct vhost_memory"))
    VHOST_SET_VRING_NUM = ioc(IOC_WRITE, VHOST_VIRTIO, 0x10, _size("struct vhost_vring_state"))
    VHOST_SET_VRING_ADDR = ioc(IOC_WRITE, VHOST_VIRTIO, 0x11, _size("struct vhost_vring_addr"))
    VHOST_SET_VRING_BASE = ioc(IOC_WRITE, VHOST_VIRTIO, 0x12, _size("struct vhost_vring_state"))
    VHOST_GET_VRING_BASE = ioc(
        IOC_READ | IOC_WRITE, VHOST_VIRTIO, 0x12, _size("struct vhost_vring_state")
    )
    VHOST_SET_VRING_KICK = ioc(IOC_WRITE, VHOST_VIRTIO, 0x20, _size("struct vhost_vring_file"))
    VHOST_SET_VRING_CALL = ioc(IOC_WRITE, VHOST_VIRTIO, 0x21, _size("struct vhost_vring_file"))
    VHOST_NET_SET_BACKEND = ioc(IOC_WRITE, VHOST_VIRTIO, 0x30, _size("struct vhost_vring_file"))
    VHOST_VSOCK_SET_GUEST_CID = ioc(IOC_WRITE, VHOST_VIRTIO, 0x60, _U64.size)
    VHOST_VSOCK_SET_RUNNING = ioc(IOC_WRITE, VHOST_VIRTIO, 0x61, _size("int"))


class VhostError(Exception):
    """vhost cannot be used; the message names the flag or step at fault."""


def open_vhost(path: str, flag: str) -> int | None:
    """An fd on a vhost device (`path`), or None where the host has none. Any other failure to
    open it is a VhostError naming `flag`."""
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VhostError(f"{flag}: cannot open {path}: {e.strerror}") from None


def open_vhost_net(flag: str) -> int | None:
    """An fd on /dev/vhost-net, or None where the host has none (the userspace device is used
    then)."""
    return open_vhost(VHOST_NET_PATH, flag)


class Vhost:
    """The ioctls on one vhost fd, each raising VhostError naming what failed."""

    def __init__(self, fd: int, kind: str = "vhost-net") -> None:
        """`kind`: what error messages call it (vhost-net, vhost-vsock)."""
        self.fd = fd
        self.kind = kind

    def close(self) -> None:
        """Close the fd; again does nothing (its number may be another file's by then)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, what: str, request: int, arg: int | bytes | bytearray = 0) -> bytes:
        try:
            out = fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            raise VhostError(f"{self.kind}: {what}: {e.strerror}") from None
        return out if isinstance(out, bytes) else b""

    def set_owner(self) -> None:
        self._ioctl("VHOST_SET_OWNER", VhostIoctl.VHOST_SET_OWNER)

    def features(self) -> int:
        out = self._ioctl("VHOST_GET_FEATURES", VhostIoctl.VHOST_GET_FEATURES, bytes(_U64.size))
        features: int = _U64.unpack(out)[0]
        return features

    def set_features(self, features: int) -> None:
        self._ioctl("VHOST_SET_FEATURES", VhostIoctl.VHOST_SET_FEATURES, _U64.pack(features))

    def set_mem_table(self, regions: list[tuple[int, int, int]]) -> None:
        """Guest memory as (guest address, size, address in this process)."""
        table: Any = ffi.new(
            "struct vhost_memory *",
            {
                "nregions": len(regions),
                "regions": [
                    {"guest_phys_addr": guest, "memory_size": size, "userspace_addr": host}
                    for guest, size, host in regions
                ],
            },
        )
        self._ioctl("VHOST_SET_MEM_TABLE", VhostIoctl.VHOST_SET_MEM_TABLE, bytes(ffi.buffer(table)))

    def _state(self, what: str, request: int, index: int, num: int) -> None:
        state: Any = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        self._ioctl(what, request, bytes(ffi.buffer(state)))

    def set_vring_num(self, index: int, size: int) -> None:
        self._state("VHOST_SET_VRING_NUM", VhostIoctl.VHOST_SET_VRING_NUM, index, size)

    def set_vring_base(self, index: int, next_avail: int) -> None:
        self._state("VHOST_SET_VRING_BASE", VhostIoctl.VHOST_SET_VRING_BASE, index, next_avail)

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; the next avail index it would have taken."""
        state: Any = ffi.new("struct vhost_vring_state *", {"index": index})
        out = self._ioctl(
            "VHOST_GET_VRING_BASE", VhostIoctl.VHOST_GET_VRING_BASE, bytearray(ffi.buffer(state))
        )
        num: int = ffi.from_buffer("struct vhost_vring_state *", out).num
        return num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        """The rings' addresses in this process."""
        addr: Any = ffi.new(
            "struct vhost_vring_addr *",
            {
                "index": index,
                "desc_user_addr": desc,
                "used_user_addr": used,
                "avail_user_addr": avail,
            },
        )
        self._ioctl(
            "VHOST_SET_VRING_ADDR", VhostIoctl.VHOST_SET_VRING_ADDR, bytes(ffi.buffer(addr))
        )

    def _file(self, what: str, request: int, index: int, fd: int) -> None:
        file: Any = ffi.new("struct vhost_vring_file *", {"index": index, "fd": fd})
        self._ioctl(what, request, bytes(ffi.buffer(file)))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._file("VHOST_SET_VRING_KICK", VhostIoctl.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._file("VHOST_SET_VRING_CALL", VhostIoctl.VHOST_SET_VRING_CALL, index, fd)

    def set_backend(self, index: int, fd: int) -> None:
        """The TAP behind queue `index`, or VHOST_FILE_UNBIND to stop it."""
        self._file("VHOST_NET_SET_BACKEND", VhostIoctl.VHOST_NET_SET_BACKEND, index, fd)

    def set_guest_cid(self, cid: int, flag: str) -> None:
        """vhost-vsock: claim `cid` for the guest; a VhostError naming `flag` if another VM on
        this host has it."""
        try:
            fcntl.ioctl(self.fd, VhostIoctl.VHOST_VSOCK_SET_GUEST_CID, _U64.pack(cid))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise VhostError(f"{flag}: another VM on this host has CID {cid}") from None
            raise VhostError(f"{flag}: vhost-vsock refused CID {cid}: {e.strerror}") from None

    def set_running(self, running: bool) -> None:
        """vhost-vsock: start (or stop) moving packets on the queues set up."""
        self._ioctl(
            "VHOST_VSOCK_SET_RUNNING", VhostIoctl.VHOST_VSOCK_SET_RUNNING, _INT.pack(running)
        )
