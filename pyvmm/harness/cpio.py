"""A writer (and reader) for the "newc" cpio format, which the kernel's initramfs unpacker reads.

Output is deterministic: entries in sorted path order, mtime 0, uid/gid 0, inode numbers counted
from 1 in that order, so the same inputs always give the same bytes (gzipped or not).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

NEWC_MAGIC = b"070701"
HEADER_FIELDS = 13  # after the magic: 13 fields of 8 hex digits
FIELD_WIDTH = 8
HEADER_SIZE = len(NEWC_MAGIC) + HEADER_FIELDS * FIELD_WIDTH  # 110
ALIGNMENT = 4
TRAILER_NAME = "TRAILER!!!"
DIR_MODE = 0o755
FILE_MODE = 0o644
SYMLINK_MODE = 0o777
PERMISSION_BITS = 0o7777
GZIP_LEVEL = 6


class CpioError(ValueError):
    """A path, mode or archive that the newc format cannot represent (or that is malformed)."""


@dataclass(frozen=True)
class Entry:
    """One archive member: `mode` includes the file-type bits (S_IFDIR, S_IFREG, S_IFLNK)."""

    path: str
    mode: int
    data: bytes = b""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _normalize(path: str) -> str:
    """'/bin//busybox' -> 'bin/busybox'; rejects '', '/', '.' and '..' components."""
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    if not parts or any(p in (".", "..") for p in parts):
        raise CpioError(f"cpio: bad archive path {path!r}")
    return "/".join(parts)


def _pad_len(length: int) -> int:
    return -length % ALIGNMENT


def _pad(length: int) -> bytes:
    return b"\0" * _pad_len(length)


def _header(ino: int, mode: int, nlink: int, size: int, namesize: int) -> bytes:
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


class Archive:
    """An in-memory newc archive: add directories, regular files and symlinks, then serialize.

    Missing parent directories are added (mode 0755); adding a path twice replaces it.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _normalize(path) in self._entries

    def _add(self, path: str, mode: int, data: bytes) -> None:
        name = _normalize(path)
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            existing = self._entries.get(str(parent))
            if existing is None:
                self._entries[str(parent)] = Entry(str(parent), stat.S_IFDIR | DIR_MODE)
            elif not existing.is_dir:
                raise CpioError(f"cpio: {parent} is not a directory (needed for {name})")
            parent = parent.parent
        existing = self._entries.get(name)
        if existing is not None and existing.is_dir and not stat.S_ISDIR(mode):
            raise CpioError(f"cpio: {name} is already a directory")
        self._entries[name] = Entry(name, mode, data)

    def add_dir(self, path: str, mode: int = DIR_MODE) -> None:
        self._add(path, stat.S_IFDIR | (mode & PERMISSION_BITS), b"")

    def add_file(self, path: str, data: bytes, mode: int = FILE_MODE) -> None:
        self._add(path, stat.S_IFREG | (mode & PERMISSION_BITS), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise CpioError(f"cpio: empty symlink target for {path!r}")
        self._add(path, stat.S_IFLNK | SYMLINK_MODE, target.encode())

    def entries(self) -> list[Entry]:
        return [self._entries[name] for name in sorted(self._entries)]

    def to_bytes(self, compress: bool = False) -> bytes:
        """The archive in newc format, ending with TRAILER!!!; gzip-compressed if `compress`."""
        out = bytearray()
        for ino, entry in enumerate(self.entries(), start=1):
            name = entry.path.encode() + b"\0"
            nlink = 2 if entry.is_dir else 1
            out += _header(ino, entry.mode, nlink, len(entry.data), len(name))
            out += name + _pad(HEADER_SIZE + len(name))
            out += entry.data + _pad(len(entry.data))
        trailer = TRAILER_NAME.encode() + b"\0"
        out += _header(0, 0, 1, 0, len(trailer)) + trailer + _pad(HEADER_SIZE + len(trailer))
        raw = bytes(out)
        return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0) if compress else raw


def parse(data: bytes) -> list[Entry]:
    """The members of a newc archive (gzip-compressed or not), up to TRAILER!!!."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries: list[Entry] = []
    pos = 0
    while True:
        header = data[pos : pos + HEADER_SIZE]
        if len(header) < HEADER_SIZE or header[: len(NEWC_MAGIC)] != NEWC_MAGIC:
            raise CpioError(f"cpio: no newc header at offset {pos}")
        try:
            fields = [
                int(header[off : off + FIELD_WIDTH], 16)
                for off in range(len(NEWC_MAGIC), HEADER_SIZE, FIELD_WIDTH)
            ]
        except ValueError as e:
            raise CpioError(f"cpio: bad header field at offset {pos}") from e
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + HEADER_SIZE
        name = data[name_start : name_start + namesize].rstrip(b"\0").decode()
        data_start = name_start + namesize + _pad_len(HEADER_SIZE + namesize)
        if name == TRAILER_NAME:
            return entries
        body = data[data_start : data_start + size]
        if len(body) != size:
            raise CpioError(f"cpio: {name} truncated")
        entries.append(Entry(name, mode, body))
        pos = data_start + size + _pad_len(size)
