"""The TAP declarations match <linux/if.h> and <linux/if_tun.h>, and a --tap-fd that is not a
usable TAP is refused with a line naming it. (Creating TAPs is tested in network namespaces, by
the integration tests.)"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pyvmm.net.tap import Offload, Tap, TapError, TunFlag, TunIoctl, ffi
from tests.cheaders import layout_facts, mismatches

HEADERS = ["sys/ioctl.h", "linux/if.h", "linux/if_tun.h"]


def test_ifreq_matches_the_header(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, ["net/if.h"], layout_facts(ffi, ["ifreq", "ifmap"]))


def test_constants_match_the_header(tmp_path: Path) -> None:
    facts = [(r.name, int(r)) for r in TunIoctl]
    facts += [(f"IFF_{f.name}", int(f)) for f in TunFlag]
    facts += [(f"TUN_F_{f.name}", int(f)) for f in Offload]
    facts += [("IFNAMSIZ", 16)]
    assert not mismatches(tmp_path, HEADERS, facts)


def test_a_closed_fd_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(TapError, match=rf"^--tap-fd {fd}: not an open file descriptor$"):
        Tap.from_fd(fd)


def test_a_socket_is_not_a_tap() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(TapError, match=r"^--tap-fd \d+: not a TAP device"):
        Tap.from_fd(a.fileno())
