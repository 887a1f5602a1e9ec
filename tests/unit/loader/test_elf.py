"""ELF vmlinux loading: placement at p_paddr, BSS, and every rejected shape."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest

from pyvmm.arch.x86_64.layout import GiB, ram_ranges
from pyvmm.arch.x86_64.machine import LOAD_AREA
from pyvmm.loader import load_kernel
from pyvmm.loader.errors import (
    ElfByteOrderError,
    ElfClassError,
    ElfEntryError,
    ElfHeaderError,
    ElfMachineError,
    ElfNoLoadableSegmentError,
    ElfSegmentOverlapError,
    ElfSegmentSizeError,
    ElfTypeError,
    KernelOutsideRamError,
    KernelTooLargeError,
    KernelTruncatedError,
)
from pyvmm.memory import GuestMemory
from tests.unit.loader.images import (
    ELFDATA2MSB,
    EM_AARCH64,
    ET_DYN,
    ET_REL,
    PN_XNUM,
    PT_NOTE,
    MiB,
    Seg,
    make_elf,
    make_elf32,
    write_image,
)

TEXT = b"\x90" * 100 + b"\xf4"
DATA = bytes(range(200))


def test_loads_segments_at_paddr_and_zeroes_bss(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf(
        [Seg(0x100000, TEXT), Seg(0x200000, DATA, memsz=len(DATA) + 0x3000)], entry=0x100010
    )
    kernel = load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert kernel.kind == "elf"
    assert kernel.entry == 0x100010
    assert kernel.load_start == 0x100000
    assert kernel.load_end == 0x200000 + len(DATA) + 0x3000
    assert kernel.setup_header is None
    assert kernel.cmdline_max == 2047
    assert kernel.initrd_addr_max == 0xFFFF_FFFF
    assert mem.read(0x100000, len(TEXT)) == TEXT
    assert mem.read(0x200000, len(DATA)) == DATA
    assert mem.read(0x200000 + len(DATA), 0x3000) == bytes(0x3000)
    # Nothing past the BSS is touched.
    assert mem.read_u8(0x200000 + len(DATA) + 0x3000) == 0xFF


def test_accepts_et_dyn_and_ignores_notes_and_empty_loads(mem: GuestMemory, tmp_path: Path) -> None:
    pvh_note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)
    image = make_elf(
        [Seg(0x100000, TEXT), Seg(0, pvh_note, p_type=PT_NOTE), Seg(0x80, b"", memsz=0)],
        e_type=ET_DYN,
    )
    kernel = load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert (kernel.load_start, kernel.load_end) == (0x100000, 0x100000 + len(TEXT))


def test_rejects_32_bit_elf(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf32())
    with pytest.raises(ElfClassError, match=r"32-bit ELF; pyvmm boots 64-bit x86_64 kernels"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_big_endian(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT)], data_encoding=ELFDATA2MSB))
    with pytest.raises(ElfByteOrderError, match="big-endian"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_other_machine(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT)], machine=EM_AARCH64))
    with pytest.raises(ElfMachineError, match=r"machine EM_AARCH64.*EM_X86_64") as exc:
        load_kernel(mem, path, LOAD_AREA)
    assert path in str(exc.value)


def test_rejects_relocatable_object(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT)], e_type=ET_REL))
    with pytest.raises(ElfTypeError, match="ET_REL"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_no_pt_load(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT, p_type=PT_NOTE)]))
    with pytest.raises(ElfNoLoadableSegmentError, match="no PT_LOAD"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_segment_past_end_of_file(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT, filesz=len(TEXT) + 1, memsz=4096)]))
    with pytest.raises(KernelTruncatedError, match=r"truncated ELF: PT_LOAD segment 0"):
        load_kernel(mem, path, LOAD_AREA)


@pytest.mark.parametrize("keep", [4, 20, 63])
def test_rejects_cut_headers(mem: GuestMemory, tmp_path: Path, keep: int) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT)])[:keep])
    with pytest.raises(ElfHeaderError, match="unreadable ELF"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_cut_program_headers(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT)])[: 64 + 10])
    with pytest.raises(KernelTruncatedError, match=r"table \(1 entries at e_phoff 0x40\) needs"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_filesz_above_memsz(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT, memsz=10)]))
    with pytest.raises(ElfSegmentSizeError, match=r"p_filesz 0x65 > p_memsz 0xa"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_overlapping_segments(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf([Seg(0x200000, DATA, memsz=0x2000), Seg(0x201000, TEXT)])
    with pytest.raises(ElfSegmentOverlapError, match=r"segment 0 .* overlaps PT_LOAD segment 1"):
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)


def test_rejects_segment_below_1mib(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT), Seg(0x8000, DATA)]))
    with pytest.raises(KernelOutsideRamError, match=r"segment 1 at \[0x8000.*below 1 MiB"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_kernel_larger_than_ram(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf([Seg(0x100000, TEXT), Seg(60 * MiB, DATA, memsz=8 * MiB)])
    with pytest.raises(KernelTooLargeError) as exc:
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert "needs RAM up to 68 MiB but -m/--mem gives 64 MiB" in str(exc.value)


def test_rejects_entry_outside_segments(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, TEXT)], entry=0xFFFFFFFF81000000))
    with pytest.raises(ElfEntryError, match="e_entry=0xffffffff81000000"):
        load_kernel(mem, path, LOAD_AREA)


def test_pci_hole_and_high_ram(tmp_path: Path) -> None:
    big = GuestMemory(ram_ranges(5 * GiB))  # [0, 3 GiB) and [4 GiB, 6 GiB); sparse memfd
    try:
        in_hole = make_elf([Seg(0x100000, TEXT), Seg(3 * GiB + MiB, DATA)])
        with pytest.raises(KernelOutsideRamError, match="PCI hole"):
            load_kernel(big, write_image(tmp_path, in_hole, "hole"), LOAD_AREA)
        too_high = make_elf([Seg(0x100000, TEXT), Seg(7 * GiB, DATA, memsz=MiB)])
        with pytest.raises(KernelTooLargeError, match="up to 6145 MiB but -m/--mem gives 5120"):
            load_kernel(big, write_image(tmp_path, too_high, "high"), LOAD_AREA)
        high = make_elf([Seg(0x100000, TEXT), Seg(4 * GiB, DATA)])
        kernel = load_kernel(big, write_image(tmp_path, high, "ok"), LOAD_AREA)
        assert kernel.load_end == 4 * GiB + len(DATA)
        assert big.read(4 * GiB, len(DATA)) == DATA
    finally:
        big.close()


def test_too_large_names_what_the_whole_kernel_needs(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf([Seg(60 * MiB, TEXT, memsz=8 * MiB), Seg(80 * MiB, DATA, memsz=20 * MiB)])
    with pytest.raises(KernelTooLargeError) as exc:
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert str(exc.value).endswith(
        "PT_LOAD segment 1 [0x5000000, 0x6400000) needs RAM up to 100 MiB but -m/--mem gives "
        "64 MiB; raise -m"
    )


def test_program_header_count_from_section_0(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf([Seg(0x100000, TEXT), Seg(0x200000, DATA)], phnum=PN_XNUM, section0_info=2)
    load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert mem.read(0x200000, len(DATA)) == DATA


@pytest.mark.parametrize(
    ("phentsize", "count", "error", "message"),
    [
        # A zero entry size made every entry the same header, re-parsed billions of times.
        (0, 0xFFFF_FFFF, ElfHeaderError, "e_phentsize 0; a 64-bit program header is 56 bytes"),
        (56, 0xFFFF_FFFF, KernelTruncatedError, "table \\(4294967295 entries at e_phoff"),
        (57, 2, ElfHeaderError, "e_phentsize 57"),
    ],
)
def test_program_header_table_must_be_in_the_file(
    mem: GuestMemory,
    tmp_path: Path,
    phentsize: int,
    count: int,
    error: type[Exception],
    message: str,
) -> None:
    segments = [Seg(0x100000, TEXT), Seg(0x200000, DATA)]
    image = make_elf(segments, phnum=PN_XNUM, phentsize=phentsize, section0_info=count)
    with pytest.raises(error, match=message):
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)


def test_pn_xnum_without_section_headers_is_refused(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf([Seg(0x100000, TEXT)], phnum=PN_XNUM)
    with pytest.raises(ElfHeaderError, match="section header 0, which holds the real count"):
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)


def test_more_program_headers_than_the_file_holds(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf([Seg(0x100000, TEXT)], phnum=0xFFFE)
    with pytest.raises(KernelTruncatedError, match="65534 entries"):
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)


def test_a_huge_bss_costs_no_host_memory(tmp_path: Path) -> None:
    """BSS is zeroed without a host buffer of its size (it was joined in a bytes object)."""
    big = GuestMemory(ram_ranges(2 * GiB))
    try:
        big.write(0x100000 + len(TEXT), b"\xff" * 4096)  # BSS bytes that must come back zero
        image = make_elf([Seg(0x100000, TEXT, memsz=1900 * MiB)])
        tracemalloc.start()
        try:
            load_kernel(big, write_image(tmp_path, image), LOAD_AREA)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * MiB  # host memory allocated while loading: not the BSS's 1.9 GB
        assert big.read(0x100000 + len(TEXT), 4096) == bytes(4096)
        assert big.read(0x100000 + 1900 * MiB - 8, 8) == bytes(8)
    finally:
        big.close()


def test_a_kernel_past_the_largest_memory_does_not_say_raise_m(
    mem: GuestMemory, tmp_path: Path
) -> None:
    image = make_elf([Seg(0x100000, TEXT), Seg(1 << 44, DATA)])
    with pytest.raises(KernelTooLargeError) as exc:
        load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert str(exc.value).endswith("more than the largest -m/--mem (1048576 MiB)")
