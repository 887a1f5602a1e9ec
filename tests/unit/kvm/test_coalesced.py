"""The coalesced-write ring: replayed in order, only for registered zones, indexes checked."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm.kvm.abi import ffi
from pyvmm.kvm.coalesced import PAGE_SIZE, RING_ENTRIES, CoalescedRing

RING_PAGE = 2


@pytest.fixture
def mapping() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, (RING_PAGE + 1) * PAGE_SIZE)
    yield m
    m.close()


def kernel_view(mapping: mmap.mmap) -> Any:
    """The ring as the kernel sees it, to play its part."""
    return ffi.cast(
        "struct kvm_coalesced_mmio_ring *", ffi.from_buffer(mapping) + RING_PAGE * PAGE_SIZE
    )


def record(ring: Any, addr: int, data: bytes, pio: bool = True) -> None:
    entry = ring.coalesced_mmio[ring.last]
    entry.phys_addr = addr
    entry.len = len(data)
    entry.pio = int(pio)
    ffi.memmove(entry.data, data, len(data))
    ring.last = (ring.last + 1) % RING_ENTRIES


def test_writes_are_replayed_in_order_and_the_slots_handed_back(mapping: mmap.mmap) -> None:
    kernel = kernel_view(mapping)
    ring = CoalescedRing(mapping, RING_PAGE)
    ring.add_zone(0xCF8, 4, pio=True)
    seen: list[tuple[str, int, bytes]] = []
    assert not ring.pending()
    record(kernel, 0xCF8, (0x80000000).to_bytes(4, "little"))
    record(kernel, 0xCF8, (0x80000804).to_bytes(4, "little"))
    assert ring.pending()
    n = ring.drain(
        lambda a, d: seen.append(("pio", a, bytes(d))),
        lambda a, d: seen.append(("mmio", a, bytes(d))),
    )
    assert n == 2
    assert seen == [
        ("pio", 0xCF8, b"\x00\x00\x00\x80"),
        ("pio", 0xCF8, b"\x04\x08\x00\x80"),
    ]
    assert kernel.first == kernel.last == 2
    assert not ring.pending()
    ring.close()


def test_the_ring_wraps_around(mapping: mmap.mmap) -> None:
    kernel = kernel_view(mapping)
    kernel.first = kernel.last = RING_ENTRIES - 1
    ring = CoalescedRing(mapping, RING_PAGE)
    ring.add_zone(0xCF8, 4, pio=True)
    record(kernel, 0xCF8, b"\x01\x00\x00\x80")
    record(kernel, 0xCF8, b"\x02\x00\x00\x80")
    seen: list[bytes] = []
    assert ring.drain(lambda a, d: seen.append(bytes(d)), lambda a, d: None) == 2
    assert seen == [b"\x01\x00\x00\x80", b"\x02\x00\x00\x80"]
    assert kernel.first == 1
    ring.close()


def test_entries_outside_every_zone_are_dropped_not_dispatched(mapping: mmap.mmap) -> None:
    kernel = kernel_view(mapping)
    ring = CoalescedRing(mapping, RING_PAGE)
    ring.add_zone(0xCF8, 4, pio=True)
    record(kernel, 0xCF8, b"\x00" * 4, pio=False)  # MMIO at that address: no such zone
    record(kernel, 0xCFA, b"\x00" * 4)  # runs past the zone's end
    record(kernel, 0x80, b"\x01")
    calls: list[int] = []
    assert ring.drain(lambda a, d: calls.append(a), lambda a, d: calls.append(a)) == 3
    assert calls == []
    assert ring.dropped == 3
    ring.close()


def test_an_index_past_the_ring_is_refused(mapping: mmap.mmap) -> None:
    kernel = kernel_view(mapping)
    kernel.last = RING_ENTRIES + 5
    ring = CoalescedRing(mapping, RING_PAGE)
    with pytest.raises(ValueError, match="out of range"):
        ring.drain(lambda a, d: None, lambda a, d: None)
    ring.close()


def test_a_ring_page_outside_the_mapping_is_refused(mapping: mmap.mmap) -> None:
    with pytest.raises(ValueError, match="outside the vCPU mapping"):
        CoalescedRing(mapping, RING_PAGE + 1)
