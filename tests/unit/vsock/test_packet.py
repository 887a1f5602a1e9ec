"""virtio-vsock's layouts and constants as pyvmm declares them match <linux/virtio_vsock.h>."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.vsock import packet
from pyvmm.vsock.packet import Header, Op, Shutdown, check_guest_cid
from tests.cheaders import layout_facts, mismatches

HEADERS = ["linux/virtio_vsock.h"]
STRUCTS = ["virtio_vsock_config", "virtio_vsock_event", "virtio_vsock_hdr"]


def test_structs_match_linux_headers(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, HEADERS, layout_facts(packet.ffi, STRUCTS))


def test_constants_match_linux_headers(tmp_path: Path) -> None:
    facts = [(f"VIRTIO_VSOCK_OP_{op.name}", int(op)) for op in Op]
    facts += [(f"VIRTIO_VSOCK_SHUTDOWN_{flag.name}", int(flag)) for flag in Shutdown]
    facts += [
        ("VIRTIO_VSOCK_TYPE_STREAM", packet.TYPE_STREAM),
        ("VIRTIO_VSOCK_EVENT_TRANSPORT_RESET", packet.EVENT_TRANSPORT_RESET),
        ("sizeof(struct virtio_vsock_hdr)", packet.HEADER.size),
    ]
    assert not mismatches(tmp_path, HEADERS, facts)


def test_a_header_packs_and_unpacks_to_itself() -> None:
    hdr = Header(2, 3, 1 << 30, 1234, 5, 1, Op.RW, 0, 65536, 77)
    data = hdr.pack()
    assert len(data) == packet.HEADER_SIZE
    assert Header.unpack(data) == hdr


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 32, -1])
def test_reserved_cids_are_refused(cid: int) -> None:
    assert check_guest_cid(cid) is not None


@pytest.mark.parametrize("cid", [3, 42, 0xFFFFFFFE])
def test_guest_cids(cid: int) -> None:
    assert check_guest_cid(cid) is None
