"""GuestMemory: every guest address is bounds-checked; data lands in the shared memfd."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.memory import GuestMemory, GuestMemoryError

MiB = 1 << 20
HIGH = 1 << 32


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, 2 * MiB), (HIGH, MiB)])
    yield m
    m.close()


def test_round_trip_in_both_regions(mem: GuestMemory) -> None:
    mem.write_u64(0x1000, 0x1122334455667788)
    mem.write(HIGH + 0x10, b"hello")
    assert mem.read_u32(0x1000) == 0x55667788
    assert mem.read(HIGH + 0x10, 5) == b"hello"


def test_other_processes_see_the_same_bytes_through_the_memfd(mem: GuestMemory) -> None:
    mem.write(HIGH + 0x20, b"shared")
    with mmap.mmap(mem.memfd, MiB, mmap.MAP_SHARED, offset=2 * MiB) as m:
        assert m[0x20:0x26] == b"shared"


def test_views_are_zero_copy(mem: GuestMemory) -> None:
    view = mem.view(0x2000, 4)
    view[:] = b"abcd"
    assert mem.read(0x2000, 4) == b"abcd"


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (2 * MiB, 1),  # just past the first region
        (2 * MiB - 4, 8),  # straddles the end of the first region
        (HIGH - 1, 2),  # straddles into the second
        (HIGH + MiB, 1),
        (-1, 1),
        (0, -1),
        (1 << 63, 8),
    ],
)
def test_out_of_ram_access_raises(mem: GuestMemory, addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.view(addr, length)
    assert not mem.is_ram(addr, max(length, 1)) or length < 0


@given(addr=st.integers(min_value=-(1 << 64), max_value=1 << 64), length=st.integers(0, 1 << 33))
def test_any_range_is_either_inside_one_region_or_refused(addr: int, length: int) -> None:
    m = _shared_mem()
    inside = any(r.guest_addr <= addr and addr + length <= r.end for r in m.regions)
    if inside:
        assert len(m.view(addr, length)) == length
    else:
        with pytest.raises(GuestMemoryError):
            m.view(addr, length)


_SHARED: list[GuestMemory] = []


def _shared_mem() -> GuestMemory:
    if not _SHARED:
        _SHARED.append(GuestMemory([(0, 2 * MiB), (HIGH, MiB)]))
    return _SHARED[0]


def test_memfd_size_is_sealed(mem: GuestMemory) -> None:
    with pytest.raises(PermissionError):
        os.ftruncate(mem.memfd, 1)


def test_overlapping_or_unaligned_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        GuestMemory([(0, 2 * MiB), (MiB, MiB)])
    with pytest.raises(ValueError, match="page-aligned"):
        GuestMemory([(0x10, MiB)])
