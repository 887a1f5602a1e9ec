"""The one allocator of MMIO ranges, GSIs and memory slots: nothing is handed out twice, and a
used-up pool is an error that says what asked."""

from __future__ import annotations

import itertools

import pytest

from pyvmm.allocator import AllocationError, SystemAllocator


def test_mmio_ranges_are_size_aligned_and_never_overlap() -> None:
    a = SystemAllocator(0xC000_0000, 0xC010_0000, 24, 32, 4)
    ranges = [(a.allocate_mmio(size, f"r{size}"), size) for size in (0x1000, 0x8000, 0x1000)]
    for base, size in ranges:
        assert base % size == 0 and base >= 0xC000_0000 and base + size <= 0xC010_0000
    spans = sorted((base, base + size) for base, size in ranges)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_a_used_up_pool_names_what_asked() -> None:
    a = SystemAllocator(0xC000_0000, 0xC000_2000, 24, 26, 1)
    a.allocate_mmio(0x2000, "first")
    with pytest.raises(AllocationError, match=r"^vdb BAR0: no room for 0x1000 bytes of MMIO"):
        a.allocate_mmio(0x1000, "vdb BAR0")
    assert [a.allocate_gsi("x"), a.allocate_gsi("x")] == [24, 25]
    with pytest.raises(AllocationError, match=r"^rng MSI-X: all GSIs below 26 are in use"):
        a.allocate_gsi("rng MSI-X")
    assert a.allocate_slot("RAM") == 0
    with pytest.raises(AllocationError, match=r"^pmem: all 1 memory slots are in use"):
        a.allocate_slot("pmem")


def test_mmio_sizes_must_be_powers_of_two() -> None:
    with pytest.raises(ValueError, match="0x3000 is not a power of two"):
        SystemAllocator(0, 1 << 20, 0, 1, 1).allocate_mmio(0x3000, "odd")
