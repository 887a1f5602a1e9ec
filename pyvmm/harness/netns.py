"""Network namespaces for the tests and benchmarks that move packets: each makes its own
(DESIGN.md, "Tests that use the network") and removes it, with every interface in it, after.

Namespaces are made and removed with `ip netns`, and entered by one thread at a time (setns is
per thread): pyroute2's NetNS and netns.create fork the calling process, which in a threaded
test or benchmark leaves a copy of it running.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_numbers = itertools.count()


def unavailable() -> str | None:
    """Why network namespaces with TAPs cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and TAPs need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


@contextlib.contextmanager
def network_namespace(prefix: str) -> Iterator[str]:
    """A fresh namespace named `prefix`-<pid>-<n> with its loopback up, deleted afterwards."""
    name = f"{prefix}-{os.getpid()}-{next(_numbers)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def enter(name: str) -> None:
    """Move the calling thread (only) into namespace `name`."""
    from pyroute2 import netns  # ~0.4 s to import: only where packets move

    netns.pushns(name)


def call_inside(name: str, fn: Callable[[], T]) -> T:
    """Call `fn` on a thread that has entered namespace `name`, so that the sockets and netlink
    connections it opens belong there; the calling thread stays where it is."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            enter(name)
            result.append(fn())
        except BaseException as e:  # handed back to the caller
            error.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
