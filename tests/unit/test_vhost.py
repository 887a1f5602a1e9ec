"""The vhost declarations match <linux/vhost.h>: structs field by field, ioctl numbers by value."""

from __future__ import annotations

from pathlib import Path

from pyvmm.vhost import VHOST_FILE_UNBIND, VHOST_VIRTIO, VhostIoctl, ffi
from tests.cheaders import layout_facts, mismatches

HEADERS = ["sys/ioctl.h", "linux/vhost.h"]
STRUCTS = [
    "vhost_vring_state",
    "vhost_vring_file",
    "vhost_vring_addr",
    "vhost_memory_region",
    "vhost_memory",
]


def test_structs_match_the_header(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, HEADERS, layout_facts(ffi, STRUCTS))


def test_constants_match_the_header(tmp_path: Path) -> None:
    facts = [(r.name, int(r)) for r in VhostIoctl]
    facts += [
        ("VHOST_VIRTIO", VHOST_VIRTIO),
        ("VHOST_FILE_UNBIND", VHOST_FILE_UNBIND & (2**64 - 1)),
    ]
    assert not mismatches(tmp_path, HEADERS, facts)
