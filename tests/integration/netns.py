"""A network namespace for each test that moves packets (pyvmm.harness.netns), with what the
tests ask of it: its interfaces, a UDP socket in it, a command prefix to run inside it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from pyroute2 import IPRoute

from pyvmm.harness import netns

T = TypeVar("T")
IP_FREEBIND = 15  # <linux/in.h>; not in Python's socket module


class Namespace:
    """A named network namespace (`ip netns`), with its loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def wrapper(self) -> list[str]:
        """A command prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def inside(self, fn: Callable[[], T]) -> T:
        """Call `fn` on a thread inside the namespace (see pyvmm.harness.netns.call_inside)."""
        return netns.call_inside(self.name, fn)

    def udp_socket(self, address: str, port: int) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)  # bound before the TAP has the address
            s.bind((address, port))
            return s

        return self.inside(make)

    def links(self) -> dict[str, dict[str, object]]:
        """Each interface by name: whether it is up, and its IPv4 addresses."""

        def read() -> dict[str, dict[str, object]]:
            # IPRoute's netlink socket belongs to the namespace of the thread that opens it
            # (pyroute2's NetNS would fork this process instead, threads and all).
            with IPRoute() as ipr:
                out: dict[str, dict[str, object]] = {}
                for link in ipr.get_links():
                    index = link["index"]
                    out[link.get_attr("IFLA_IFNAME")] = {
                        "up": bool(link["flags"] & 1),
                        "addresses": [
                            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                            for a in ipr.get_addr(index=index, family=socket.AF_INET)
                        ],
                    }
                return out

        return self.inside(read)


@contextlib.contextmanager
def network_namespace() -> Iterator[Namespace]:
    """A fresh namespace, deleted afterwards (with every interface still in it)."""
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    with netns.network_namespace("pyvmm-test") as name:
        yield Namespace(name)
