"""TAP devices, the host end of virtio-net: one Ethernet frame per read or write, each behind a
virtio-net header (IFF_VNET_HDR) that carries the checksum and segmentation offloads.

pyvmm either creates a TAP (`--host_ip`/`--netmask`/`--mac`; it needs CAP_NET_ADMIN and goes
away when the last fd to it closes, since pyvmm never makes it persistent) or takes one the
caller opened and configured (`--tap-fd N`), which it checks is a TAP opened with IFF_TAP |
IFF_NO_PI | IFF_VNET_HDR. `struct ifreq` and the ioctl numbers are declared from <linux/if.h>
and <linux/if_tun.h> (tests/unit/net/test_tap.py checks them against the headers).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from typing import Any

from pyvmm.cdecl import declare
from pyvmm.ioc import IOC_READ, IOC_WRITE, ioc

ffi: Any = declare(
    "tap",
    """
    struct ifmap {
        unsigned long mem_start;
        unsigned long mem_end;
        unsigned short base_addr;
        unsigned char irq;
        unsigned char dma;
        unsigned char port;
    };
    struct ifreq {
        char ifr_name[16];
        union {
            short ifr_flags;
            int ifr_ifindex;
            struct ifmap ifr_map;
        };
    };
    """,
)

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
# The name pattern of TAPs pyvmm creates; the kernel fills in the number.
NAME_TEMPLATE = "pyvmm%d"
_INT = struct.Struct("i")
_TUN_TYPE = ord("T")


class TunFlag(enum.IntFlag):
    """ifr_flags of TUNSETIFF/TUNGETIFF."""

    TUN = 0x0001
    TAP = 0x0002
    NO_PI = 0x1000
    VNET_HDR = 0x4000


REQUIRED_FLAGS = TunFlag.TAP | TunFlag.NO_PI | TunFlag.VNET_HDR


class Offload(enum.IntFlag):
    """TUNSETOFFLOAD bits: what the TAP may hand us unchecksummed or unsegmented."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10


class TunIoctl(enum.IntEnum):
    TUNSETIFF = ioc(IOC_WRITE, _TUN_TYPE, 202, _INT.size)
    TUNGETFEATURES = ioc(IOC_READ, _TUN_TYPE, 207, _INT.size)
    TUNSETOFFLOAD = ioc(IOC_WRITE, _TUN_TYPE, 208, _INT.size)
    TUNGETIFF = ioc(IOC_READ, _TUN_TYPE, 210, _INT.size)
    TUNGETVNETHDRSZ = ioc(IOC_READ, _TUN_TYPE, 215, _INT.size)
    TUNSETVNETHDRSZ = ioc(IOC_WRITE, _TUN_TYPE, 216, _INT.size)


class TapError(Exception):
    """A TAP cannot be created or used; the message names the flag at fault."""


class Tap:
    """An open TAP device (non-blocking, close-on-exec)."""

    def __init__(self, fd: int, name: str, created: bool) -> None:
        self.fd = fd
        self.name = name
        self.created = created  # pyvmm made it: it goes away with pyvmm's fds

    @classmethod
    def create(cls, flag: str) -> Tap:
        """A new TAP named pyvmmN; `flag` is what the errors blame."""
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(
                f"{flag}: {TUN_PATH} does not exist (load the tun module: modprobe tun)"
            ) from None
        except OSError as e:
            raise TapError(f"{flag}: cannot open {TUN_PATH}: {e.strerror}") from None
        request = ffi.new("struct ifreq *")
        request.ifr_name = NAME_TEMPLATE.encode()
        request.ifr_flags = int(REQUIRED_FLAGS)
        buf = bytearray(ffi.buffer(request))
        try:
            fcntl.ioctl(fd, TunIoctl.TUNSETIFF, buf, True)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EPERM:
                raise TapError(
                    f"{flag}: creating a TAP device needs CAP_NET_ADMIN (run pyvmm as root, or "
                    "give it a configured TAP with --tap-fd)"
                ) from None
            raise TapError(f"{flag}: cannot create a TAP device: {e.strerror}") from None
        return cls(fd, _name_of(buf), created=True)

    @classmethod
    def from_fd(cls, fd: int, flag: str = "--tap-fd") -> Tap:
        """The caller's TAP on `fd`, checked; pyvmm owns the fd from now on."""
        name = check_tap_fd(fd, flag)
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return cls(fd, name, created=False)

    def set_vnet_hdr_size(self, size: int) -> None:
        """The virtio-net header length in front of every frame (10, or 12 with num_buffers)."""
        fcntl.ioctl(self.fd, TunIoctl.TUNSETVNETHDRSZ, _INT.pack(size))

    def set_offload(self, offload: Offload) -> None:
        """Which offloads frames the guest receives may use (as the guest negotiated them)."""
        fcntl.ioctl(self.fd, TunIoctl.TUNSETOFFLOAD, int(offload))

    def supports_offload(self, offload: Offload) -> bool:
        """Whether the kernel's TAP takes `offload` (UFO came and went across versions); the
        TAP is left with no offloads."""
        try:
            self.set_offload(offload)
        except OSError:
            return False
        self.set_offload(Offload(0))
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_tap_fd(fd: int, flag: str = "--tap-fd") -> str:
    """The name of the TAP open on `fd`; TapError if it is not one pyvmm can use."""
    where = f"{flag} {fd}"
    try:
        os.fstat(fd)
    except OSError:
        raise TapError(f"{where}: not an open file descriptor") from None
    buf = bytearray(ffi.sizeof("struct ifreq"))
    try:
        fcntl.ioctl(fd, TunIoctl.TUNGETIFF, buf, True)
    except OSError:
        raise TapError(f"{where}: not a TAP device (it is not a /dev/net/tun fd)") from None
    request = ffi.from_buffer("struct ifreq *", buf)
    flags = TunFlag(request.ifr_flags & 0xFFFF)
    name = _name_of(buf)
    if TunFlag.TAP not in flags:
        raise TapError(f"{where}: {name} is a TUN (IP) device, not a TAP (Ethernet) device")
    missing = REQUIRED_FLAGS & ~flags
    if missing:
        names = " | ".join(f"IFF_{f.name}" for f in TunFlag if f in missing)
        raise TapError(
            f"{where}: the TAP {name} was opened without {names} (pyvmm needs IFF_TAP | "
            "IFF_NO_PI | IFF_VNET_HDR)"
        )
    return name


def _name_of(ifreq: bytearray) -> str:
    return bytes(ifreq[:IFNAMSIZ]).split(b"\0", 1)[0].decode(errors="replace")
