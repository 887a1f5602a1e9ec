"""A raw disk image: the file's bytes are the disk's bytes.

Opened once at VM start, locked with flock so two VMs cannot both write one image (a read-only
open takes a shared lock, a writable one an exclusive lock). Data moves between the file and
guest memory in place with preadv/pwritev on memoryviews of guest RAM; discard punches holes and
write-zeroes zeroes ranges with fallocate.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

from pyvmm.cdecl import declare
from pyvmm.disk.image import DiskError
from pyvmm.files import FileKindError, open_file

_ffi: Any = declare("fallocate", "int fallocate(int fd, int mode, int64_t offset, int64_t len);")
_libc: Any = _ffi.dlopen(None)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class RawDisk:
    """An open raw image (a `Disk`)."""

    def __init__(self, path: str, writable: bool, flag: str = "--disk") -> None:
        self.path = path
        self.writable = writable
        where = f"{flag} {path}"
        try:
            self.fd = open_file(path, writable=writable, block_device_ok=True)
        except FileNotFoundError:
            raise DiskError(f"{where}: no such file") from None
        except PermissionError:
            what = "not writable" if writable else "not readable"
            raise DiskError(f"{where}: {what} (permission denied)") from None
        except FileKindError as e:
            raise DiskError(f"{where}: {e}") from None
        except OSError as e:
            raise DiskError(f"{where}: cannot open: {e.strerror or e}") from None
        try:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskError(
                    f"{where}: in use by another VM (locked{'' if writable else ' for writing'})"
                ) from None
            except OSError as e:
                raise DiskError(f"{where}: cannot lock: {e.strerror or e}") from None
            self.size = _size_of(self.fd, where)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, path: str, writable: bool) -> RawDisk:
        """A raw disk on an image already open (and locked) as `fd`, named `path` in messages;
        the disk owns the fd from now on (how a device process will receive it)."""
        disk = cls.__new__(cls)
        disk.path, disk.writable, disk.fd = path, writable, fd
        disk.size = _size_of(fd, path)
        return disk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill `buffers` from the image at `offset`; the bytes read (short at the end)."""
        return _all(os.preadv, self.fd, buffers, offset)

    def write_from(self, offset: int, buffers: list[memoryview]) -> int:
        return _all(os.pwritev, self.fd, buffers, offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Give the range back to the host filesystem. Discard is a hint, so a filesystem that
        cannot punch holes (9p, some FUSE) makes it a successful no-op, as QEMU does."""
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap:
            try:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        try:
            _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            zeroes = bytes(min(length, 1 << 20))
            done = 0
            while done < length:
                n = os.pwrite(self.fd, zeroes[: length - done], offset + done)
                done += n


def _size_of(fd: int, where: str) -> int:
    try:
        # Not st_size: a block device has none; lseek gives both kinds' real size.
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        raise DiskError(f"{where}: cannot find its size: {e.strerror or e}") from None


def _all(
    op: Callable[[int, list[memoryview], int], int], fd: int, buffers: list[memoryview], offset: int
) -> int:
    """preadv/pwritev until every buffer is done or the file ends (short transfers resume)."""
    pending = [b for b in buffers if len(b)]
    want = sum(len(b) for b in pending)
    total = 0
    while pending:
        n = op(fd, pending, offset + total)
        total += n
        if n == 0 or total == want:  # the end of the file, or (usually at once) all of it
            break
        while n >= len(pending[0]):  # drop the buffers done; resume inside the next
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
    return total


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) < 0:
        err = _ffi.errno
        raise OSError(err, os.strerror(err))
