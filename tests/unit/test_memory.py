"""GuestMemory: every guest address is bounds-checked; data lands in the shared memfd."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm import memory
from pyvmm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

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


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that starts at `addr` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            inside = int(line.split("-")[0], 16) == addr
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping at {addr:#x}")


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="no transparent huge pages"
)
def test_guest_ram_asks_for_huge_pages(mem: GuestMemory) -> None:
    for region in mem.regions:
        assert "hg" in _vm_flags(region.host_addr)


def test_the_shmem_huge_page_setting_is_read_from_its_brackets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    setting = tmp_path / "shmem_enabled"
    setting.write_text("always within_size [advise] never deny force\n")
    monkeypatch.setattr(memory, "SHMEM_THP_SETTING", str(setting))
    assert memory.shmem_huge_pages() == "advise"
    monkeypatch.setattr(memory, "SHMEM_THP_SETTING", str(tmp_path / "absent"))
    assert memory.shmem_huge_pages() == "never"


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x1003, 5),  # inside one page
        (0x1003, 0x3000),  # partial page, whole pages, partial page
        (0x2000, 0x2000),  # whole pages only
        (HIGH + 0xFFF, 2),  # across a page boundary in the second region
        (0, 2 * MiB),  # a whole region
    ],
)
def test_zero_clears_exactly_the_range(addr: int, length: int) -> None:
    m = GuestMemory([(0, 2 * MiB), (HIGH, MiB)])
    try:
        for r in m.regions:
            r.mapping[:] = b"\xab" * r.size
        m.zero(addr, length)
        assert m.read(addr, length) == bytes(length)
        region = next(r for r in m.regions if r.guest_addr <= addr < r.end)
        if addr > region.guest_addr:
            assert m.read_u8(addr - 1) == 0xAB
        if addr + length < region.end:
            assert m.read_u8(addr + length) == 0xAB
        # Another process mapping the memfd sees the zeroes too.
        offset = region.file_offset + addr - region.guest_addr
        with mmap.mmap(m.memfd, region.file_offset + region.size, mmap.MAP_SHARED) as other:
            assert other[offset : offset + length] == bytes(length)
    finally:
        m.close()


def test_fill_and_zero_check_the_range(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        mem.zero(2 * MiB - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.fill(HIGH, MiB + 1, 0x55)
    mem.fill(HIGH + 3, 5000, 0x55)
    assert mem.read(HIGH + 3, 5000) == b"\x55" * 5000


def test_close_with_views_still_alive_neither_raises_nor_unmaps_them() -> None:
    """A view that outlives close() (a queue not yet released, garbage not yet collected) keeps
    its memory mapped; close() must not depend on when it goes."""
    m = GuestMemory([(0, 2 * MiB), (HIGH, MiB)])
    view = m.view(0x1000, 16).cast("B")
    chained = [m.view(HIGH, 8)]
    m.close()
    m.close()  # idempotent
    view[0] = 7  # still mapped: no crash
    assert view[0] == 7 and len(chained[0]) == 8
    with pytest.raises(GuestMemoryError):
        m.view(0x1000, 1)
    assert m.memfd == -1


def test_a_second_guest_memory_on_the_same_memfd_sees_the_same_bytes() -> None:
    """How a device process maps the VM's RAM: a GuestMemory built from the memfd it got."""
    ranges = [(0, 2 * MiB), (HIGH, MiB)]
    vm = GuestMemory(ranges)
    device = GuestMemory(ranges, memfd=os.dup(vm.memfd))
    try:
        vm.write(HIGH + 8, b"from the vm")
        assert device.read(HIGH + 8, 11) == b"from the vm"
        device.write(0x100, b"from the device")
        assert vm.read(0x100, 15) == b"from the device"
    finally:
        device.close()
        vm.close()


def test_a_memfd_of_another_size_is_refused() -> None:
    vm = GuestMemory([(0, 2 * MiB)])
    try:
        with pytest.raises(ValueError, match="holds 0x200000 bytes, not 0x100000"):
            GuestMemory([(0, MiB)], memfd=os.dup(vm.memfd))
    finally:
        vm.close()


def test_a_file_region_is_memory_but_not_ram(tmp_path: Path) -> None:
    """A pmem image mapped into guest-physical memory: reachable through the same checks,
    shared with its file, read-only when asked, and not counted as RAM."""
    image = tmp_path / "pmem.img"
    image.write_bytes(b"\x42" * (2 * MiB))
    m = GuestMemory([(0, 2 * MiB)])
    fd = os.open(image, os.O_RDWR)
    try:
        rw = m.add_file_region(HIGH, fd, 2 * MiB, readonly=False)
        ro = m.add_file_region(HIGH + 4 * MiB, fd, MiB, readonly=True, offset=MiB)
        assert (rw.ram, ro.readonly, m.size, m.end) == (False, True, 2 * MiB, 2 * MiB)
        assert [r.guest_addr for r in m.ram_regions] == [0]
        m.write(HIGH + 1, b"pm")
        assert image.read_bytes()[1:3] == b"pm"
        assert m.read(HIGH + 4 * MiB, 2) == b"\x42\x42"
        with pytest.raises(TypeError):
            m.write(HIGH + 4 * MiB, b"no")
        with pytest.raises(ValueError, match="overlaps"):
            m.add_file_region(MiB, fd, MiB, readonly=True)
        m.zero(HIGH, PAGE_SIZE * 2)  # cleared in place: no hole punched in the user's file
        assert os.stat(image).st_blocks * 512 >= 2 * MiB
    finally:
        m.close()
        os.close(fd)
