"""Initrd placement: as high as allowed, page-aligned, clear of the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.arch.x86_64.machine import LOAD_AREA
from pyvmm.loader import KernelImage
from pyvmm.loader.errors import InitrdEmptyError, InitrdFileError, InitrdTooLargeError
from pyvmm.loader.initrd import load_initrd, place_initrd
from pyvmm.memory import PAGE_SIZE, GuestMemory
from tests.unit.loader.images import MiB, write_image

LOW_RAM_END = 64 * MiB


def kernel_at(start: int, end: int, initrd_addr_max: int = 0xFFFF_FFFF) -> KernelImage:
    return KernelImage(
        entry=start,
        load_start=start,
        load_end=end,
        setup_header=None,
        cmdline_max=2047,
        initrd_addr_max=initrd_addr_max,
        kind="elf",
    )


KERNEL = kernel_at(16 * MiB, 20 * MiB)


def test_placed_page_aligned_at_top_of_low_ram(mem: GuestMemory, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40 + b"tail"
    addr, size = load_initrd(mem, write_image(tmp_path, data), KERNEL, LOW_RAM_END, LOAD_AREA)
    assert size == len(data)
    assert addr % PAGE_SIZE == 0
    assert addr + size <= LOW_RAM_END < addr + size + PAGE_SIZE
    assert mem.read(addr, size) == data


def test_respects_initrd_addr_max(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = kernel_at(16 * MiB, 20 * MiB, initrd_addr_max=48 * MiB - 1)
    addr, size = load_initrd(
        mem, write_image(tmp_path, b"x" * 5000), kernel, LOW_RAM_END, LOAD_AREA
    )
    assert addr + size <= 48 * MiB
    assert addr == 48 * MiB - 2 * PAGE_SIZE


def test_goes_below_a_kernel_at_the_top(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = kernel_at(40 * MiB, 63 * MiB)
    addr, size = load_initrd(
        mem, write_image(tmp_path, b"y" * 2 * MiB), kernel, LOW_RAM_END, LOAD_AREA
    )
    assert (addr, size) == (38 * MiB, 2 * MiB)


def test_too_large_names_m(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, b"z" * (50 * MiB))
    with pytest.raises(InitrdTooLargeError) as exc:
        load_initrd(mem, path, KERNEL, LOW_RAM_END, LOAD_AREA)
    assert str(exc.value) == (
        f"initrd {path} (50 MiB) does not fit below 64 MiB beside the kernel at "
        "[0x1000000, 0x1400000) with -m 64; raise -m"
    )


def test_a_small_initrd_is_sized_in_kib(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = kernel_at(16 * MiB, 20 * MiB, initrd_addr_max=1 * MiB + 4095)
    path = write_image(tmp_path, b"z" * 10_000)
    with pytest.raises(InitrdTooLargeError, match=r"\(9\.8 KiB\) does not fit below 0x101000"):
        load_initrd(mem, path, kernel, LOW_RAM_END, LOAD_AREA)


def test_low_ram_that_more_memory_cannot_grow_does_not_say_raise_m(tmp_path: Path) -> None:
    """Low RAM ends at the PCI hole (3 GiB) whatever -m is: the hint is a smaller initrd."""
    kernel = kernel_at(16 * MiB, 3 * 1024 * MiB - MiB)
    mem = GuestMemory([(0, 3 * 1024 * MiB), (4 * 1024 * MiB, MiB)])  # sparse memfd
    try:
        path = write_image(tmp_path, b"z" * (16 * MiB))
        with pytest.raises(InitrdTooLargeError) as exc:
            load_initrd(mem, path, kernel, 3 * 1024 * MiB, LOAD_AREA)
        assert "(where the PCI hole starts; a larger -m adds RAM only above 4 GiB)" in str(
            exc.value
        )
        assert str(exc.value).endswith("; use a smaller initrd")
    finally:
        mem.close()


def test_too_large_for_initrd_addr_max(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = kernel_at(16 * MiB, 20 * MiB, initrd_addr_max=24 * MiB - 1)
    path = write_image(tmp_path, b"z" * (16 * MiB))  # fits neither above nor below
    with pytest.raises(InitrdTooLargeError, match=r"below 0x1800000 \(the kernel's initrd_addr"):
        load_initrd(mem, path, kernel, LOW_RAM_END, LOAD_AREA)


def test_missing_file_names_flag(mem: GuestMemory, tmp_path: Path) -> None:
    path = str(tmp_path / "initrd.img")
    with pytest.raises(InitrdFileError, match=rf"^initrd {path} \(-i/--initrd\): no such file$"):
        load_initrd(mem, path, KERNEL, LOW_RAM_END, LOAD_AREA)


def test_directory(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(InitrdFileError, match=r"-i/--initrd\): is a directory; expected a"):
        load_initrd(mem, str(tmp_path), KERNEL, LOW_RAM_END, LOAD_AREA)


@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_waiting_for_a_writer(mem: GuestMemory, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InitrdFileError, match=r"-i/--initrd\): is a FIFO \(named pipe\)"):
        load_initrd(mem, str(fifo), KERNEL, LOW_RAM_END, LOAD_AREA)


def test_empty(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(InitrdEmptyError, match="is empty"):
        load_initrd(mem, write_image(tmp_path, b""), KERNEL, LOW_RAM_END, LOAD_AREA)


@given(
    st.integers(1, 64 * MiB),
    st.integers(1 * MiB, 64 * MiB),
    st.integers(0, 64 * MiB),
    st.integers(1 * MiB, 1 << 32),
)
def test_placement_invariants(size: int, kstart: int, klen: int, addr_max: int) -> None:
    kernel = kernel_at(kstart, kstart + klen, initrd_addr_max=addr_max - 1)
    addr = place_initrd(size, kernel, LOW_RAM_END, LOAD_AREA.floor)
    if addr is None:
        return
    assert addr % PAGE_SIZE == 0
    assert 1 * MiB <= addr
    assert addr + size <= min(LOW_RAM_END, addr_max)
    assert addr + size <= kernel.load_start or addr >= kernel.load_end
