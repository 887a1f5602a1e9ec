"""Format detection and file errors of load_kernel, and garbage that must fail cleanly."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64.layout import ram_ranges
from pyvmm.arch.x86_64.machine import LOAD_AREA
from pyvmm.loader import KernelLoadError, format_size, load_kernel
from pyvmm.loader.errors import KernelFileError, NotAKernelError
from pyvmm.memory import GuestMemory
from tests.unit.loader.images import MiB, Seg, make_bzimage, make_elf, write_image


def test_missing_file(mem: GuestMemory, tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(KernelFileError, match=rf"^kernel {path}: no such file$"):
        load_kernel(mem, path, LOAD_AREA)


def test_directory(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(KernelFileError, match=r"is a directory; expected a regular file$"):
        load_kernel(mem, str(tmp_path), LOAD_AREA)


@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_waiting_for_a_writer(mem: GuestMemory, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(KernelFileError) as e:
        load_kernel(mem, str(fifo), LOAD_AREA)
    assert str(e.value) == f"kernel {fifo}: is a FIFO (named pipe); expected a regular file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable(mem: GuestMemory, tmp_path: Path) -> None:
    path = write_image(tmp_path, make_elf([Seg(0x100000, b"\xf4")]))
    os.chmod(path, 0)
    with pytest.raises(KernelFileError, match="permission denied"):
        load_kernel(mem, path, LOAD_AREA)


@pytest.mark.parametrize("data", [b"", b"MZ" + bytes(1000), b"\x7fEL", bytes(0x300)])
def test_not_a_kernel(mem: GuestMemory, tmp_path: Path, data: bytes) -> None:
    path = write_image(tmp_path, data)
    with pytest.raises(NotAKernelError, match=r"neither an ELF vmlinux nor a bzImage$"):
        load_kernel(mem, path, LOAD_AREA)


def test_detects_by_content_not_name(mem: GuestMemory, tmp_path: Path) -> None:
    assert (
        load_kernel(mem, write_image(tmp_path, make_bzimage(), "vmlinux"), LOAD_AREA).kind
        == "bzImage"
    )
    elf = make_elf([Seg(0x100000, b"\xf4")])
    assert load_kernel(mem, write_image(tmp_path, elf, "bzImage"), LOAD_AREA).kind == "elf"


# Hypothesis: whatever the bytes, the loader succeeds or raises KernelLoadError - never anything
# else. One small guest memory is shared by all examples.
_MEM = GuestMemory(ram_ranges(32 * MiB))
_DIR = tempfile.TemporaryDirectory(prefix="pyvmm-loader-fuzz-")
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _try_load(data: bytes) -> None:
    path = write_image(Path(_DIR.name), data, "fuzz")
    try:
        kernel = load_kernel(_MEM, path, LOAD_AREA)
    except KernelLoadError as exc:
        assert "\n" not in str(exc)
        assert path in str(exc)
        return
    assert kernel.load_start <= kernel.entry < kernel.load_end or kernel.kind == "bzImage"
    assert _MEM.is_ram(kernel.load_start, kernel.load_end - kernel.load_start)


@_FUZZ
@given(st.binary(max_size=4096))
def test_garbage_fails_cleanly(data: bytes) -> None:
    _try_load(data)


@_FUZZ
@given(st.binary(max_size=4096))
def test_garbage_after_elf_magic_fails_cleanly(data: bytes) -> None:
    _try_load(b"\x7fELF" + data)


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[: max(cut, 1)])


_ELF = make_elf([Seg(0x100000, b"\x90" * 64), Seg(0x200000, b"\x01" * 64, memsz=0x1000)])
_BZ = make_bzimage()


@_FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 0x200), st.integers(0, 255)), max_size=8),
    st.integers(0, len(_ELF)),
)
def test_mutated_elf_fails_cleanly(edits: list[tuple[int, int]], cut: int) -> None:
    _try_load(_mutate(_ELF, edits, cut))


@_FUZZ
@given(
    st.lists(st.tuples(st.integers(0x1F1, 0x270), st.integers(0, 255)), max_size=8),
    st.integers(0x1F0, len(_BZ)),
)
def test_mutated_bzimage_fails_cleanly(edits: list[tuple[int, int]], cut: int) -> None:
    _try_load(_mutate(_BZ, edits, cut))


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (10_000, "9.8 KiB"),
        (4 * MiB, "4 MiB"),
        (50 * MiB + MiB // 2, "50.5 MiB"),
        (3 << 30, "3 GiB"),
    ],
)
def test_sizes_in_messages(n: int, text: str) -> None:
    assert format_size(n) == text
