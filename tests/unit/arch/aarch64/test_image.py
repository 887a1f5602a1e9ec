"""The arm64 Image loader and initrd placement, on synthetic Image headers."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.arch.aarch64 import image, layout
from pyvmm.arch.aarch64.image import Flag, ImageHeaderError, load_image, load_initrd
from pyvmm.loader.errors import InitrdTooLargeError, KernelTooLargeError, NotAKernelError
from pyvmm.memory import GuestMemory
from tests.unit.loader.images import Seg, make_bzimage, make_elf

MiB = 1 << 20
HEADER = struct.Struct("<IIQQQQQQII")


def make_image(
    text_offset: int = 0,
    image_size: int = 3 * MiB,
    flags: int = Flag.PHYS_BASE_ANYWHERE | 1 << 1,  # 4 KiB pages
    body: bytes = b"",
    magic: bytes = b"ARM\x64",
) -> bytes:
    code0 = 0x91005A4D  # "MZ" and an add, as an EFI-stub kernel starts
    head = HEADER.pack(code0, 0x14000000, text_offset, image_size, flags, 0, 0, 0, 0, 0)
    head = head[:0x38] + magic + head[0x3C:]
    return head + body


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(layout.ram_ranges(64 * MiB))
    yield m
    m.close()


def _file(tmp_path: Path, data: bytes, name: str = "Image") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_the_header_is_laid_out_as_booting_rst_says() -> None:
    assert image.HEADER_SIZE == 64
    assert image.ffi.offsetof("struct arm64_image_header", "text_offset") == 0x08
    assert image.ffi.offsetof("struct arm64_image_header", "image_size") == 0x10
    assert image.ffi.offsetof("struct arm64_image_header", "flags") == 0x18
    assert image.ffi.offsetof("struct arm64_image_header", "magic") == 0x38
    assert image.MAGIC == 0x644D5241


@pytest.mark.parametrize("text_offset", [0, 0x80000])
def test_the_image_goes_text_offset_past_the_start_of_ram(
    tmp_path: Path, mem: GuestMemory, text_offset: int
) -> None:
    data = make_image(text_offset=text_offset, body=b"kernel text" * 100)
    kernel = load_image(mem, _file(tmp_path, data))
    start = layout.RAM_START + text_offset
    assert (kernel.entry, kernel.load_start, kernel.load_end) == (start, start, start + 3 * MiB)
    assert mem.read(start, len(data)) == data
    assert kernel.kind == "Image"
    assert kernel.cmdline_max == 2047


def test_the_initrd_window_is_the_32_gib_from_the_kernels_1_gib_boundary(
    tmp_path: Path, mem: GuestMemory
) -> None:
    kernel = load_image(mem, _file(tmp_path, make_image()))
    assert kernel.initrd_addr_max == 0x8000_0000 + (32 << 30) - 1


def test_an_image_larger_than_ram_says_how_much_it_needs(tmp_path: Path, mem: GuestMemory) -> None:
    path = _file(tmp_path, make_image(text_offset=0x80000, image_size=80 * MiB))
    with pytest.raises(KernelTooLargeError, match=r"Image needs 80.5 MiB .* gives 64 MiB"):
        load_image(mem, path)


def test_a_big_endian_kernel_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    path = _file(tmp_path, make_image(flags=Flag.BIG_ENDIAN))
    with pytest.raises(ImageHeaderError, match=rf"^kernel {path}: a big-endian kernel"):
        load_image(mem, path)


def test_a_kernel_older_than_3_17_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    path = _file(tmp_path, make_image(text_offset=0x80000, image_size=0))
    with pytest.raises(ImageHeaderError, match="image_size is 0"):
        load_image(mem, path)


def test_a_file_longer_than_image_size_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    path = _file(tmp_path, make_image(image_size=100, body=bytes(200)))
    with pytest.raises(ImageHeaderError, match="larger than its header's image_size"):
        load_image(mem, path)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (make_elf([Seg(0x100000, b"x" * 64)]), "an ELF file"),
        (make_bzimage(), "an x86 bzImage"),
        (gzip.compress(make_image(), mtime=0), "gzip-compressed"),
        (b"MZ\x00\x00zimg" + bytes(100), "EFI zboot"),
        (make_image(magic=b"ARM\x00"), 'no "ARM\\x64" magic at offset 0x38'),
        (b"tiny", "shorter than an arm64 Image header"),
    ],
    ids=["elf", "bzimage", "gzip", "zboot", "no-magic", "short"],
)
def test_anything_but_an_image_gets_one_line_naming_the_file(
    tmp_path: Path, mem: GuestMemory, data: bytes, says: str
) -> None:
    path = _file(tmp_path, data, "kernel-file")
    with pytest.raises(NotAKernelError) as info:
        load_image(mem, path)
    message = str(info.value)
    assert message.startswith(f"kernel {path}: ")
    assert says in message
    assert "\n" not in message


def test_the_initrd_goes_high_below_the_device_tree(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = load_image(mem, _file(tmp_path, make_image()))
    fdt = layout.fdt_addr(mem.end)
    assert fdt == layout.RAM_START + 62 * MiB
    initrd = b"07070100" * 1000 + b"x"
    addr, size = load_initrd(mem, _file(tmp_path, initrd, "initrd"), kernel, fdt)
    assert size == len(initrd)
    assert addr % 4096 == 0
    assert addr + size <= fdt
    assert fdt - (addr + size) < 4096
    assert addr >= kernel.load_end
    assert mem.read(addr, size) == initrd


def test_an_initrd_that_does_not_fit_says_where_it_would_go(
    tmp_path: Path, mem: GuestMemory
) -> None:
    kernel = load_image(mem, _file(tmp_path, make_image(image_size=40 * MiB)))
    path = _file(tmp_path, bytes(30 * MiB), "initrd")
    with pytest.raises(InitrdTooLargeError, match=r"30 MiB does not fit .*\(22 MiB free\)"):
        load_initrd(mem, path, kernel, layout.fdt_addr(mem.end))
