"""Network namespaces for tests that move packets: every test that makes a TAP or sends a frame
does it in a namespace of its own (DESIGN.md), made here and removed with all it holds."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from pyroute2 import IPRoute, netns

T = TypeVar("T")
_numbers = itertools.count()
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
        """Call `fn` on a thread that has entered the namespace (setns is per thread), so that
        the sockets and TAPs it opens belong there; the calling thread stays where it is."""
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                netns.pushns(self.name)
                result.append(fn())
            except BaseException as e:  # handed back to the caller
                error.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

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


def namespaces_work() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


@contextlib.contextmanager
def network_namespace() -> Iterator[Namespace]:
    """A fresh namespace, deleted afterwards (with every interface still in it)."""
    why = namespaces_work()
    if why:
        pytest.skip(why)
    name = f"pyvmm-test-{os.getpid()}-{next(_numbers)}"
    # `ip`, not pyroute2's netns.create, which forks this (threaded) process to make it.
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Namespace(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
