"""What a disk image gives virtio-blk, whatever its format: the `Disk` protocol and its error.

A disk is opened once, before the guest starts, and then only read and written at byte offsets
straight into and out of guest memory; in multiprocess mode (to come) a device process will be
handed the open fd (`keep_fds`)."""

from __future__ import annotations

from typing import Protocol

SECTOR_SIZE = 512


class DiskError(Exception):
    """The image cannot be used; the message names the file and the flag."""


class Disk(Protocol):
    """An open disk image of `size` bytes, as the guest sees it."""

    path: str
    writable: bool
    size: int

    @property
    def fd(self) -> int:
        """The open image file (what a device process will need to hold)."""

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill `buffers` from the disk at `offset`; the bytes read (short only at the end)."""

    def write_from(self, offset: int, buffers: list[memoryview]) -> int:
        """Write `buffers` to the disk at `offset`; the bytes written."""

    def flush(self) -> None:
        """Make what was written durable."""

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs the range (a hint)."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeroes, giving its space back if `unmap` allows."""

    def close(self) -> None: ...
