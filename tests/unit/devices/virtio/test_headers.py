"""The virtio layouts and constants pyvmm declares match the system's <linux/virtio_*.h>: every
struct field by field, every named constant by value."""

from __future__ import annotations

from pathlib import Path

from pyvmm.devices.pci.msix import NO_VECTOR
from pyvmm.devices.virtio import block, net, pci, queue
from pyvmm.devices.virtio.block import BlkFeature, RequestType, Status
from pyvmm.devices.virtio.device import DeviceStatus, DeviceType, Feature
from pyvmm.devices.virtio.interrupt import Isr
from pyvmm.devices.virtio.net import NetFeature
from pyvmm.devices.virtio.pci import CfgType, CommonReg
from pyvmm.devices.virtio.queue import VirtqFlags
from tests.cheaders import c_facts, layout_facts, mismatches

HEADERS = [
    "linux/virtio_ring.h",
    "linux/virtio_config.h",
    "linux/virtio_ids.h",
    "linux/virtio_blk.h",
    "linux/virtio_pci.h",
    "linux/virtio_net.h",
]
RING_STRUCTS = ["vring_desc", "vring_avail", "vring_used_elem", "vring_used"]
BLK_STRUCTS = ["virtio_blk_config", "virtio_blk_outhdr", "virtio_blk_discard_write_zeroes"]
NET_STRUCTS = ["virtio_net_config", "virtio_net_hdr_v1"]
PCI_STRUCTS = [
    "virtio_pci_cap",
    "virtio_pci_notify_cap",
    "virtio_pci_cfg_cap",
    "virtio_pci_cap64",
    "virtio_pci_common_cfg",
]
# pyvmm's names where they are not the header's.
DEVICE_STATUS = {DeviceStatus.DEVICE_NEEDS_RESET: "VIRTIO_CONFIG_S_NEEDS_RESET"}
FEATURE = {
    Feature.RING_INDIRECT_DESC: "VIRTIO_RING_F_INDIRECT_DESC",
    Feature.RING_EVENT_IDX: "VIRTIO_RING_F_EVENT_IDX",
    Feature.VERSION_1: "VIRTIO_F_VERSION_1",
}
COMMON_MACRO = {
    CommonReg.DEVICE_FEATURE_SELECT: "DFSELECT",
    CommonReg.DEVICE_FEATURE: "DF",
    CommonReg.GUEST_FEATURE_SELECT: "GFSELECT",
    CommonReg.GUEST_FEATURE: "GF",
    CommonReg.MSIX_CONFIG: "MSIX",
    CommonReg.NUM_QUEUES: "NUMQ",
    CommonReg.DEVICE_STATUS: "STATUS",
    CommonReg.CONFIG_GENERATION: "CFGGENERATION",
    CommonReg.QUEUE_SELECT: "Q_SELECT",
    CommonReg.QUEUE_SIZE: "Q_SIZE",
    CommonReg.QUEUE_MSIX_VECTOR: "Q_MSIX",
    CommonReg.QUEUE_ENABLE: "Q_ENABLE",
    CommonReg.QUEUE_NOTIFY_OFF: "Q_NOFF",
    CommonReg.QUEUE_DESC_LO: "Q_DESCLO",
    CommonReg.QUEUE_DESC_HI: "Q_DESCHI",
    CommonReg.QUEUE_AVAIL_LO: "Q_AVAILLO",
    CommonReg.QUEUE_AVAIL_HI: "Q_AVAILHI",
    CommonReg.QUEUE_USED_LO: "Q_USEDLO",
    CommonReg.QUEUE_USED_HI: "Q_USEDHI",
}
# The capability macros give offsets in a struct virtio_pci_cap (and the notify cap's last field).
CAP_MACRO = {
    "VIRTIO_PCI_CAP_VNDR": ("struct virtio_pci_cap", "cap_vndr"),
    "VIRTIO_PCI_CAP_NEXT": ("struct virtio_pci_cap", "cap_next"),
    "VIRTIO_PCI_CAP_LEN": ("struct virtio_pci_cap", "cap_len"),
    "VIRTIO_PCI_CAP_CFG_TYPE": ("struct virtio_pci_cap", "cfg_type"),
    "VIRTIO_PCI_CAP_BAR": ("struct virtio_pci_cap", "bar"),
    "VIRTIO_PCI_CAP_OFFSET": ("struct virtio_pci_cap", "offset"),
    "VIRTIO_PCI_CAP_LENGTH": ("struct virtio_pci_cap", "length"),
    "VIRTIO_PCI_NOTIFY_CAP_MULT": ("struct virtio_pci_notify_cap", "notify_off_multiplier"),
}


def constants() -> list[tuple[str, int]]:
    """(the header's expression, pyvmm's value) for every virtio constant pyvmm names."""
    facts: list[tuple[str, int]] = []
    facts += [(f"VRING_DESC_F_{f.name}", f) for f in VirtqFlags]
    facts += [
        ("VRING_AVAIL_F_NO_INTERRUPT", queue.VIRTQ_AVAIL_F_NO_INTERRUPT),
        ("VRING_USED_F_NO_NOTIFY", queue.VIRTQ_USED_F_NO_NOTIFY),
        ("VRING_DESC_ALIGN_SIZE", queue.DESC_ALIGN),
        ("VRING_AVAIL_ALIGN_SIZE", queue.AVAIL_ALIGN),
        ("VRING_USED_ALIGN_SIZE", queue.USED_ALIGN),
    ]
    facts += [(f"1ULL << {FEATURE[f]}", f) for f in Feature]
    facts += [(DEVICE_STATUS.get(s, f"VIRTIO_CONFIG_S_{s.name}"), s) for s in DeviceStatus]
    facts += [(f"VIRTIO_ID_{t.name}", t) for t in DeviceType]
    facts += [(f"1ULL << VIRTIO_BLK_F_{f.name}", f) for f in BlkFeature]
    facts += [(f"VIRTIO_BLK_T_{t.name}", t) for t in RequestType]
    facts += [(f"VIRTIO_BLK_S_{s.name}", s) for s in Status]
    facts += [
        ("VIRTIO_BLK_ID_BYTES", block.ID_BYTES),
        ("VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", block.WRITE_ZEROES_UNMAP),
    ]
    facts += [(f"1ULL << VIRTIO_NET_F_{f.name}", f) for f in NetFeature]
    facts += [("VIRTIO_NET_S_LINK_UP", net.LINK_UP)]
    facts += [(f"VIRTIO_PCI_CAP_{t.name}_CFG", t) for t in CfgType]
    facts += [
        ("VIRTIO_PCI_ISR_CONFIG", Isr.CONFIG),
        ("VIRTIO_MSI_NO_VECTOR", NO_VECTOR),
    ]
    facts += [(f"VIRTIO_PCI_COMMON_{COMMON_MACRO[r]}", r) for r in CommonReg]
    facts += [(f"offsetof(struct virtio_pci_common_cfg, {r.name.lower()})", r) for r in CommonReg]
    facts += [(macro, pci.ffi.offsetof(*where)) for macro, where in CAP_MACRO.items()]
    return facts


def test_ring_structs_match_linux_headers(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, HEADERS, layout_facts(queue.ffi, RING_STRUCTS))


def test_blk_structs_match_linux_headers(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, HEADERS, layout_facts(block.ffi, BLK_STRUCTS))


def test_net_structs_match_linux_headers(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, HEADERS, layout_facts(net.ffi, NET_STRUCTS))


def test_pci_structs_match_linux_headers(tmp_path: Path) -> None:
    assert not mismatches(tmp_path, HEADERS, layout_facts(pci.ffi, PCI_STRUCTS))


def test_constants_match_linux_headers(tmp_path: Path) -> None:
    facts = [(expr, int(value)) for expr, value in constants()]
    assert not mismatches(tmp_path, HEADERS, facts)


def test_every_common_config_field_is_a_register() -> None:
    fields = [name for name, _ in pci.ffi.typeof("struct virtio_pci_common_cfg").fields]
    assert [r.name.lower() for r in CommonReg] == fields
    assert all(pci.COMMON_WIDTH[r] in (1, 2, 4) for r in CommonReg)


def test_ring_sizes_are_the_headers_vring_size(tmp_path: Path) -> None:
    """The header's legacy vring_size: descriptor table and avail ring, aligned, then the used
    ring; each with its event field."""
    align = 4096
    sizes = [1, 2, 256, queue.MAX_QUEUE_SIZE]
    expected = c_facts(tmp_path, HEADERS, [f"vring_size({n}, {align})" for n in sizes])
    mine = [
        -(-(queue.desc_table_size(n) + queue.avail_ring_size(n)) // align) * align
        + queue.used_ring_size(n)
        for n in sizes
    ]
    assert mine == expected


def test_hot_path_formats_cover_their_whole_struct() -> None:
    """The struct.Structs the data path decodes with span the declared struct exactly."""
    assert block.HEADER.size == block.ffi.sizeof("struct virtio_blk_outhdr")
    assert block.DISCARD_SEGMENT.size == block.ffi.sizeof("struct virtio_blk_discard_write_zeroes")
