"""bzImage loading: setup header parsing, placement at pref_address, and rejected headers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pyvmm.arch.x86_64.machine import LOAD_AREA
from pyvmm.loader import load_kernel
from pyvmm.loader.bootparams import SETUP_HEADER_OFFSET, ffi
from pyvmm.loader.errors import (
    BzImageHeaderError,
    BzImageProtocolError,
    KernelOutsideRamError,
    KernelTooLargeError,
    KernelTruncatedError,
)
from pyvmm.memory import GuestMemory
from tests.unit.loader.images import (
    HEADER_END_BASE,
    SETUP_HEADER_SIZE,
    BzParams,
    MiB,
    make_bzimage,
    write_image,
)

DEFAULT = BzParams()


def load(mem: GuestMemory, tmp_path: Path, params: BzParams) -> object:
    return load_kernel(mem, write_image(tmp_path, make_bzimage(params)), LOAD_AREA)


def test_loads_payload_at_pref_address(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_bzimage(DEFAULT)
    kernel = load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert kernel.kind == "bzImage"
    assert kernel.entry == 16 * MiB + 0x200
    assert kernel.load_start == 16 * MiB
    assert kernel.load_end == 16 * MiB + DEFAULT.init_size
    assert kernel.cmdline_max == 2047
    assert kernel.initrd_addr_max == 0x7FFF_FFFF
    assert mem.read(16 * MiB, len(DEFAULT.payload)) == DEFAULT.payload
    end = SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE
    assert kernel.setup_header == image[SETUP_HEADER_OFFSET:end]
    assert kernel.setup_header is not None
    hdr: Any = ffi.from_buffer("struct setup_header *", bytearray(kernel.setup_header))
    assert hdr.version == DEFAULT.version


def test_short_header_is_returned_as_declared(mem: GuestMemory, tmp_path: Path) -> None:
    end = SETUP_HEADER_OFFSET + ffi.offsetof("struct setup_header", "handover_offset")
    image = make_bzimage(replace(DEFAULT, header_end=end))
    kernel = load_kernel(mem, write_image(tmp_path, image), LOAD_AREA)
    assert kernel.setup_header == image[SETUP_HEADER_OFFSET:end]


def test_setup_sects_zero_means_four(mem: GuestMemory, tmp_path: Path) -> None:
    image = bytearray(make_bzimage(replace(DEFAULT, setup_sects=4)))
    image[SETUP_HEADER_OFFSET] = 0
    kernel = load_kernel(mem, write_image(tmp_path, bytes(image)), LOAD_AREA)
    assert mem.read(kernel.load_start, len(DEFAULT.payload)) == DEFAULT.payload


def test_loads_bytes_after_syssize(mem: GuestMemory, tmp_path: Path) -> None:
    # A signed kernel carries its signature after the payload; syssize does not count it.
    params = replace(DEFAULT, trailer=b"SIGNATURE")
    kernel = load(mem, tmp_path, params)
    assert isinstance(kernel, object)
    assert mem.read(16 * MiB + len(DEFAULT.payload), 9) == b"SIGNATURE"


def test_payload_larger_than_init_size_counts(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = load_kernel(
        mem, write_image(tmp_path, make_bzimage(replace(DEFAULT, init_size=16))), LOAD_AREA
    )
    assert kernel.load_end == 16 * MiB + len(DEFAULT.payload)


@pytest.mark.parametrize("version", [0x0205, 0x0206, 0x020A, 0x020B])
def test_rejects_old_protocol(mem: GuestMemory, tmp_path: Path, version: int) -> None:
    text = f"{version >> 8}.{version & 0xFF:02d}"
    with pytest.raises(BzImageProtocolError, match=rf"boot protocol {text} lacks the 64-bit entry"):
        load(mem, tmp_path, replace(DEFAULT, version=version))


def test_rejects_kernel_without_64_bit_entry(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(BzImageProtocolError, match=r"2\.15\) lacks .* XLF_KERNEL_64 is clear"):
        load(mem, tmp_path, replace(DEFAULT, xloadflags=0))


@pytest.mark.parametrize("end", [HEADER_END_BASE, 0x250, 0x291])
def test_rejects_bad_header_length(mem: GuestMemory, tmp_path: Path, end: int) -> None:
    with pytest.raises(BzImageHeaderError, match=rf"setup header ends at {end:#x}"):
        load(mem, tmp_path, replace(DEFAULT, header_end=end))


def test_rejects_cut_header(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_bzimage(DEFAULT)[:0x230])
    with pytest.raises(KernelTruncatedError, match="the setup header ends at 0x26c"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_truncated_payload(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_bzimage(DEFAULT)
    path = write_image(tmp_path, image[:-1])
    with pytest.raises(KernelTruncatedError, match=r"truncated bzImage: setup_sects 4"):
        load_kernel(mem, path, LOAD_AREA)


def test_rejects_zero_syssize(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(BzImageHeaderError, match="syssize is 0"):
        load(mem, tmp_path, replace(DEFAULT, syssize=0))


def test_rejects_low_pref_address(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(KernelOutsideRamError, match=r"pref_address 0x10000 is below 1 MiB"):
        load(mem, tmp_path, replace(DEFAULT, pref_address=0x10000))


def test_rejects_init_size_beyond_ram(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(KernelTooLargeError, match="needs RAM up to 80 MiB but -m/--mem gives 64"):
        load(mem, tmp_path, replace(DEFAULT, init_size=64 * MiB))
