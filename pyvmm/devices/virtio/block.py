"""virtio-blk: a disk image as a virtio block device (virtio 1.2 section 5.2).

Requests are a header (struct virtio_blk_outhdr: type, priority, sector), data buffers and a
one-byte status the device writes last; discard and write-zeroes data are arrays of struct
virtio_blk_discard_write_zeroes. Data moves between the image and guest memory in place
(preadv/pwritev on the chain's memoryviews). Requests past the end of the disk, writes to a
read-only disk and malformed requests complete with IOERR; an unknown type with UNSUPP. The
layouts are declared below as <linux/virtio_blk.h> declares them
(tests/unit/devices/virtio/test_headers.py checks them against it).
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from pyvmm.cdecl import declare, struct_for
from pyvmm.devices.virtio.device import DeviceType, VirtioDevice, available_chains
from pyvmm.devices.virtio.queue import DescriptorChain, SplitQueue
from pyvmm.disk import SECTOR_SIZE, Disk

log = logging.getLogger(__name__)

# Packed as the header packs virtio_blk_config; the request structs have no padding to lose.
ffi: Any = declare(
    "virtio_blk",
    """
    struct virtio_blk_config {
        uint64_t capacity;
        uint32_t size_max;
        uint32_t seg_max;
        struct virtio_blk_geometry {
            uint16_t cylinders;
            uint8_t  heads;
            uint8_t  sectors;
        } geometry;
        uint32_t blk_size;
        uint8_t  physical_block_exp;
        uint8_t  alignment_offset;
        uint16_t min_io_size;
        uint32_t opt_io_size;
        uint8_t  wce;
        uint8_t  unused;
        uint16_t num_queues;
        uint32_t max_discard_sectors;
        uint32_t max_discard_seg;
        uint32_t discard_sector_alignment;
        uint32_t max_write_zeroes_sectors;
        uint32_t max_write_zeroes_seg;
        uint8_t  write_zeroes_may_unmap;
        uint8_t  unused1[3];
        uint32_t max_secure_erase_sectors;
        uint32_t max_secure_erase_seg;
        uint32_t secure_erase_sector_alignment;
    };
    struct virtio_blk_outhdr {
        uint32_t type;
        uint32_t ioprio;
        uint64_t sector;
    };
    struct virtio_blk_discard_write_zeroes {
        uint64_t sector;
        uint32_t num_sectors;
        uint32_t flags;
    };
    """,
    packed=True,
)

QUEUE_SIZE = 256
ID_BYTES = 20
HEADER = struct_for(ffi, "struct virtio_blk_outhdr", "type", "ioprio", "sector")
DISCARD_SEGMENT = struct_for(
    ffi, "struct virtio_blk_discard_write_zeroes", "sector", "num_sectors", "flags"
)
MAX_DISCARD_SEGMENTS = 32
# Largest discard/write-zeroes per segment: 4 GiB in sectors, minus one sector.
MAX_DISCARD_SECTORS = (1 << 23) - 1
WRITE_ZEROES_UNMAP = 1


class BlkFeature(enum.IntFlag):
    SEG_MAX = 1 << 2
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class RequestError(Exception):
    """The request cannot be done; it completes with `status`."""

    def __init__(self, status: Status, why: str) -> None:
        super().__init__(why)
        self.status = status


def split(buffers: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first `n` bytes of `buffers` and the rest, as memoryviews (no copies)."""
    head: list[memoryview] = []
    rest: list[memoryview] = []
    for b in buffers:
        if n >= len(b):
            head.append(b)
            n -= len(b)
        elif n > 0:
            head.append(b[:n])
            rest.append(b[n:])
            n = 0
        else:
            rest.append(b)
    return head, rest


def total(buffers: list[memoryview]) -> int:
    return sum(len(b) for b in buffers)


class Block(VirtioDevice):
    """One disk."""

    device_type = DeviceType.BLOCK

    def __init__(self, disk: Disk, name: str, serial: str) -> None:
        self.disk = disk
        self.name = name
        self.serial = serial.encode("ascii", "replace")[:ID_BYTES]
        config: Any = ffi.new("struct virtio_blk_config *")
        config.capacity = disk.size // SECTOR_SIZE
        config.seg_max = QUEUE_SIZE - 2
        config.blk_size = SECTOR_SIZE
        config.num_queues = 1
        config.max_discard_sectors = MAX_DISCARD_SECTORS
        config.max_discard_seg = MAX_DISCARD_SEGMENTS
        config.discard_sector_alignment = 1
        config.max_write_zeroes_sectors = MAX_DISCARD_SECTORS
        config.max_write_zeroes_seg = MAX_DISCARD_SEGMENTS
        config.write_zeroes_may_unmap = 1
        self._config = bytes(ffi.buffer(config))

    @property
    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE]

    @property
    def device_features(self) -> int:
        features = BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
        if self.disk.writable:
            features |= BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
        else:
            features |= BlkFeature.RO
        return int(features)

    def config_read(self, offset: int, data: memoryview) -> None:
        chunk = self._config[offset : offset + len(data)]
        data[:] = chunk + b"\x00" * (len(data) - len(chunk))

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        for chain in available_chains(queue, self.guest_log):
            queue.add_used(chain.head, self._handle(chain))

    def _handle(self, chain: DescriptorChain) -> int:
        """Do one request; the number of bytes written to the chain."""
        if chain.writable_len < 1 or chain.readable_len < HEADER.size:
            self.guest_log.info(
                "bad request", "request %d without header or status byte", chain.head
            )
            return 0
        readable, writable = chain.readable, chain.writable
        # Drivers put the header and the status byte in descriptors of their own (Linux does);
        # take those directly, and split the buffers only for other layouts.
        if len(readable[0]) == HEADER.size:
            rtype, _, sector = HEADER.unpack(readable[0])
            data_out = readable[1:]
        else:
            header, data_out = split(readable, HEADER.size)
            rtype, _, sector = HEADER.unpack(b"".join(bytes(h) for h in header))
        if len(writable[-1]) == 1:
            data_in, status_view = writable[:-1], writable[-1:]
        else:
            data_in, status_view = split(writable, chain.writable_len - 1)
        written = 0
        try:
            written = self._execute(rtype, sector, data_out, data_in, chain.writable_len - 1)
            status = Status.OK
        except RequestError as e:
            log.debug("%s: request %d: %s", self.name, chain.head, e)
            status = e.status
        except OSError as e:
            self.guest_log.warning("I/O error", "%s: %s", self.disk.path, e.strerror or e)
            status = Status.IOERR
        status_view[0][0] = status
        return written + 1

    def _range(self, sector: int, length: int) -> int:
        if length % SECTOR_SIZE:
            raise RequestError(Status.IOERR, f"length {length} is not whole sectors")
        offset = sector * SECTOR_SIZE
        if sector >= 1 << 55 or offset + length > self.disk.size:
            raise RequestError(Status.IOERR, f"sector {sector}+{length // SECTOR_SIZE} past end")
        return offset

    def _execute(
        self,
        rtype: int,
        sector: int,
        data_out: list[memoryview],
        data_in: list[memoryview],
        in_len: int,
    ) -> int:
        """Do the request; the bytes written to `data_in` (`in_len` bytes long)."""
        writes = (RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES)
        if rtype in writes and not self.disk.writable:
            raise RequestError(Status.IOERR, "write to a read-only disk")
        if rtype == RequestType.IN:
            length = in_len
            offset = self._range(sector, length)
            if self.disk.read_into(offset, data_in) != length:
                raise RequestError(Status.IOERR, "short read")
            return length
        if rtype == RequestType.OUT:
            length = total(data_out)
            offset = self._range(sector, length)
            if self.disk.write_from(offset, data_out) != length:
                raise RequestError(Status.IOERR, "short write")
            return 0
        if rtype == RequestType.FLUSH:
            self.disk.flush()
            return 0
        if rtype == RequestType.GET_ID:
            serial = self.serial + b"\x00" * ID_BYTES
            n = 0
            for view in data_in:
                take = min(len(view), ID_BYTES - n)
                view[:take] = serial[n : n + take]
                n += take
            return n
        if rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            # Sized from the descriptor lengths first: only a valid request's few hundred bytes
            # are ever copied, however much guest RAM the chain names.
            length = total(data_out)
            if not length or length % DISCARD_SEGMENT.size:
                raise RequestError(Status.IOERR, f"malformed discard segments ({length} bytes)")
            if length // DISCARD_SEGMENT.size > MAX_DISCARD_SEGMENTS:
                raise RequestError(Status.IOERR, f"{length // DISCARD_SEGMENT.size} segments")
            segments = b"".join(bytes(v) for v in data_out)
            allowed_flags = WRITE_ZEROES_UNMAP if rtype == RequestType.WRITE_ZEROES else 0
            for start, count, flags in DISCARD_SEGMENT.iter_unpack(segments):
                if flags & ~allowed_flags:
                    # Discard with unmap, or any flag the spec does not define (5.2.6.2).
                    raise RequestError(Status.UNSUPP, f"segment flags {flags:#x}")
                if count > MAX_DISCARD_SECTORS:
                    raise RequestError(Status.IOERR, f"discard of {count} sectors")
                offset = self._range(start, count * SECTOR_SIZE)
                if rtype == RequestType.DISCARD:
                    self.disk.discard(offset, count * SECTOR_SIZE)
                else:
                    unmap = bool(flags & WRITE_ZEROES_UNMAP)
                    self.disk.write_zeroes(offset, count * SECTOR_SIZE, unmap)
            return 0
        raise RequestError(Status.UNSUPP, f"request type {rtype}")

    def keep_fds(self) -> list[int]:
        return [self.disk.fd]

    def close(self) -> None:
        self.disk.close()
