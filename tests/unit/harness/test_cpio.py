"""The newc cpio writer: layout, determinism, and round trips through our reader and cpio -i."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyvmm.harness.cpio import (
    ALIGNMENT,
    HEADER_SIZE,
    NEWC_MAGIC,
    TRAILER_NAME,
    Archive,
    CpioError,
    Entry,
    parse,
)


def sample() -> Archive:
    a = Archive()
    a.add_dir("bin")
    a.add_file("/bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    a.add_file("init", b"#!/bin/busybox sh\necho hi\n", 0o755)
    a.add_file("etc/deep/nested/motd", b"hello", 0o600)  # parents made implicitly
    a.add_file("empty", b"")
    a.add_symlink("bin/sh", "busybox")
    a.add_dir("tmp", 0o1777)
    return a


def by_path(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


def test_round_trip_through_parse() -> None:
    entries = by_path(parse(sample().to_bytes()))
    assert sorted(entries) == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "empty",
        "etc",
        "etc/deep",
        "etc/deep/nested",
        "etc/deep/nested/motd",
        "init",
        "tmp",
    ]
    assert entries["bin/busybox"].is_file
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/busybox"].data == b"\x7fELF" + bytes(range(256)) * 3
    assert entries["etc/deep/nested/motd"].mode == stat.S_IFREG | 0o600
    assert entries["etc/deep"].mode == stat.S_IFDIR | 0o755
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    assert entries["bin/sh"].is_symlink
    assert entries["bin/sh"].data == b"busybox"
    assert entries["empty"].data == b""


def test_output_is_deterministic_whatever_the_insertion_order() -> None:
    a, b = Archive(), Archive()
    a.add_file("z", b"1")
    a.add_file("a/b", b"2")
    b.add_file("a/b", b"2")
    b.add_file("z", b"1")
    assert a.to_bytes() == b.to_bytes()
    assert a.to_bytes(compress=True) == b.to_bytes(compress=True)
    assert gzip.decompress(a.to_bytes(compress=True)) == a.to_bytes()


def test_layout_headers_aligned_fixed_fields_and_trailer() -> None:
    raw = sample().to_bytes()
    assert len(raw) % ALIGNMENT == 0
    pos, inodes = 0, []
    while True:
        assert pos % ALIGNMENT == 0
        header = raw[pos : pos + HEADER_SIZE]
        assert header[:6] == NEWC_MAGIC
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, _mode, uid, gid, _nlink, mtime, size, *_, namesize, check = fields
        assert (uid, gid, mtime, check) == (0, 0, 0, 0)
        name = raw[pos + HEADER_SIZE : pos + HEADER_SIZE + namesize]
        assert name.endswith(b"\0")
        if name == TRAILER_NAME.encode() + b"\0":
            break
        inodes.append(ino)
        data_start = pos + HEADER_SIZE + namesize
        data_start += -data_start % ALIGNMENT
        pos = data_start + size + (-size % ALIGNMENT)
    assert inodes == list(range(1, len(inodes) + 1))


def test_adding_a_path_twice_replaces_it() -> None:
    a = Archive()
    a.add_file("f", b"old")
    a.add_file("./f", b"new", 0o700)
    assert parse(a.to_bytes()) == [Entry("f", stat.S_IFREG | 0o700, b"new")]
    assert "f" in a


@pytest.mark.parametrize("path", ["", "/", ".", "a/../b", "../x"])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(CpioError):
        Archive().add_file(path, b"")


def test_a_file_cannot_be_a_parent_or_replace_a_directory() -> None:
    a = Archive()
    a.add_file("f", b"")
    with pytest.raises(CpioError, match="not a directory"):
        a.add_file("f/g", b"")
    a.add_dir("d")
    with pytest.raises(CpioError, match="already a directory"):
        a.add_file("d", b"")


def test_parse_rejects_garbage() -> None:
    with pytest.raises(CpioError):
        parse(b"not a cpio archive at all, no sir")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_i_extracts_what_we_wrote(tmp_path: Path) -> None:
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
        input=sample().to_bytes(),
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "init").read_bytes() == b"#!/bin/busybox sh\necho hi\n"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    assert (tmp_path / "etc/deep/nested/motd").read_bytes() == b"hello"
    assert stat.S_IMODE((tmp_path / "etc/deep/nested/motd").stat().st_mode) == 0o600
    assert (tmp_path / "bin/sh").is_symlink()
    assert (tmp_path / "bin/sh").readlink() == Path("busybox")
    assert (tmp_path / "empty").read_bytes() == b""
