"""Disk images for virtio-blk: the `Disk` protocol, and `open_disk`, which picks the format.

Raw is the only format today; when another comes (qcow2), `open_disk` tells them apart by the
image's header, never by its file name.
"""

from pyvmm.disk.image import SECTOR_SIZE, Disk, DiskError
from pyvmm.disk.raw import RawDisk

__all__ = ["SECTOR_SIZE", "Disk", "DiskError", "RawDisk", "open_disk"]


def open_disk(path: str, writable: bool, flag: str) -> Disk:
    """Open and lock the image at `path` (given with `flag`), read-only unless `writable`."""
    return RawDisk(path, writable, flag)
