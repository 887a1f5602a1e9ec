"""virtio-blk against a test-side driver: requests laid out in guest RAM as Linux's virtio_blk
lays them out, completed into the used ring, with the image file as the other end."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvmm.devices.virtio.block import BlkFeature, Block, RequestType, ffi
from pyvmm.devices.virtio.device import DeviceError, DeviceType
from pyvmm.devices.virtio.queue import SplitQueue, VirtqFlags
from pyvmm.disk.raw import RawDisk
from pyvmm.memory import GuestMemory
from tests.unit.devices.virtio import rings

MiB = 1 << 20
SIZE = 16
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x10000
SECTORS = 64
IMAGE_BYTES = SECTORS * 512
SERIAL = "pyvmm-disk-0"

OK, IOERR, UNSUPP = 0, 1, 2
NO_STATUS = 0xAA  # what the driver leaves in the status byte before submitting
HEADER_SIZE: int = ffi.sizeof("struct virtio_blk_outhdr")


def outhdr(rtype: int, sector: int) -> bytes:
    """A struct virtio_blk_outhdr."""
    hdr: Any = ffi.new("struct virtio_blk_outhdr *")
    hdr.type, hdr.sector = rtype, sector
    return bytes(ffi.buffer(hdr))


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    """A struct virtio_blk_discard_write_zeroes."""
    seg: Any = ffi.new("struct virtio_blk_discard_write_zeroes *")
    seg.sector, seg.num_sectors, seg.flags = sector, count, flags
    return bytes(ffi.buffer(seg))


@dataclass
class Request:
    head: int
    data_in: list[tuple[int, int]]  # guest address, length
    status_at: int | None


class Driver:
    """The guest's half of one virtqueue, submitting virtio-blk requests."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        mem.fill(0, MiB)
        self.queue = SplitQueue(mem, SIZE, DESC, AVAIL, USED, False)
        self.avail_idx = 0
        self.used_seen = 0
        self.free = 0
        self.next_buf = DATA

    def alloc_buf(self, length: int) -> int:
        addr = self.next_buf
        self.next_buf += (length + 15) & ~15
        assert self.next_buf < MiB
        return addr

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(DESC + rings.DESC_SIZE * i, rings.descriptor(addr, length, flags, nxt))

    def chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        idxs = []
        for _ in bufs:
            idxs.append(self.free)
            self.free = (self.free + 1) % SIZE
        for n, (addr, length, writable) in enumerate(bufs):
            last = n == len(bufs) - 1
            flags = (VirtqFlags.WRITE if writable else 0) | (0 if last else VirtqFlags.NEXT)
            self.desc(idxs[n], addr, length, flags, 0 if last else idxs[n + 1])
        return idxs[0]

    def publish(self, head: int) -> None:
        self.mem.write_u16(AVAIL + rings.avail_entry(self.avail_idx % SIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(AVAIL + rings.AVAIL_IDX, self.avail_idx)

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        out: list[bytes] | None = None,
        data_in: list[int] | None = None,
        status: bool = True,
        header: bool = True,
    ) -> Request:
        bufs: list[tuple[int, int, bool]] = []
        if header:
            at = self.alloc_buf(HEADER_SIZE)
            self.mem.write(at, outhdr(rtype, sector))
            bufs.append((at, HEADER_SIZE, False))
        for chunk in out or []:
            at = self.alloc_buf(len(chunk))
            self.mem.write(at, chunk)
            bufs.append((at, len(chunk), False))
        ins = []
        for length in data_in or []:
            at = self.alloc_buf(length)
            self.mem.write(at, b"\xcc" * length)
            ins.append((at, length))
            bufs.append((at, length, True))
        status_at = None
        if status:
            status_at = self.alloc_buf(1)
            self.mem.write(status_at, bytes([NO_STATUS]))
            bufs.append((status_at, 1, True))
        head = self.chain(bufs)
        self.publish(head)
        return Request(head, ins, status_at)

    def status(self, req: Request) -> int:
        assert req.status_at is not None
        return self.mem.read(req.status_at, 1)[0]

    def data(self, req: Request) -> bytes:
        return b"".join(self.mem.read(a, n) for a, n in req.data_in)

    def used(self) -> list[tuple[int, int]]:
        """(head, length) of the chains completed since the last call, in used-ring order."""
        idx = self.mem.read_u16(USED + rings.USED_IDX)
        out = []
        while self.used_seen != idx:
            at = USED + rings.used_elem(self.used_seen % SIZE)
            out.append(rings.used_element(self.mem.read(at, rings.USED_ELEM_SIZE)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


@pytest.fixture(scope="module")
def module_mem() -> Iterator[GuestMemory]:
    m = GuestMemory([(0, MiB)])
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(IMAGE_BYTES)))
    return path


@pytest.fixture
def driver(module_mem: GuestMemory) -> Iterator[Driver]:
    d = Driver(module_mem)
    yield d
    d.queue.release()


@pytest.fixture
def blk(image: Path) -> Iterator[Block]:
    dev = Block(RawDisk(str(image), True), "vda", SERIAL)
    yield dev
    dev.close()


@pytest.fixture
def ro_blk(image: Path) -> Iterator[Block]:
    dev = Block(RawDisk(str(image), False, "--disk-ro"), "vdb", SERIAL)
    yield dev
    dev.close()


def run(dev: Block, driver: Driver) -> list[tuple[int, int]]:
    dev.process_queue(0, driver.queue)
    return driver.used()


# --- what the driver sees before any request ------------------------------------------------------


def test_config_space_and_features(blk: Block, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4096))
    ro_blk = Block(RawDisk(str(other), False), "vdb", SERIAL)
    ro_blk.close()
    assert blk.device_type == DeviceType.BLOCK
    assert blk.queue_max_sizes == [256]
    buf = bytearray(ffi.sizeof("struct virtio_blk_config"))
    blk.config_read(0, memoryview(buf))
    config: Any = ffi.from_buffer("struct virtio_blk_config *", buf)
    assert (config.capacity, config.size_max, config.seg_max) == (SECTORS, 0, 254)
    buf4 = bytearray(4)
    blk.config_read(ffi.offsetof("struct virtio_blk_config", "blk_size"), memoryview(buf4))
    assert int.from_bytes(buf4, "little") == 512
    past = bytearray(b"\xff" * 8)
    blk.config_read(0x100, memoryview(past))
    assert past == bytes(8)

    rw, ro = BlkFeature(blk.device_features), BlkFeature(ro_blk.device_features)
    assert BlkFeature.DISCARD in rw and BlkFeature.WRITE_ZEROES in rw
    assert BlkFeature.RO not in rw
    assert BlkFeature.RO in ro
    assert BlkFeature.DISCARD not in ro and BlkFeature.WRITE_ZEROES not in ro
    assert BlkFeature.FLUSH in rw and BlkFeature.FLUSH in ro


# --- reads and writes ---------------------------------------------------------------------------


def test_read_returns_the_file_bytes(blk: Block, driver: Driver, image: Path) -> None:
    req = driver.submit(RequestType.IN, sector=3, data_in=[512, 1024])
    assert run(blk, driver) == [(req.head, 1536 + 1)]
    assert driver.status(req) == OK
    assert driver.data(req) == image.read_bytes()[3 * 512 : 6 * 512]


def test_read_into_one_descriptor_with_the_status_byte(
    blk: Block, driver: Driver, image: Path
) -> None:
    """A driver may put the data and the status in one writable buffer."""
    hdr = driver.alloc_buf(HEADER_SIZE)
    driver.mem.write(hdr, outhdr(RequestType.IN, 1))
    buf = driver.alloc_buf(513)
    half = HEADER_SIZE // 2
    driver.publish(driver.chain([(hdr, half, False), (hdr + half, half, False), (buf, 513, True)]))
    assert run(blk, driver) == [(0, 513)]
    assert driver.mem.read(buf, 512) == image.read_bytes()[512:1024]
    assert driver.mem.read(buf + 512, 1) == bytes([OK])


def test_write_lands_in_the_file(blk: Block, driver: Driver, image: Path) -> None:
    before = image.read_bytes()
    req = driver.submit(RequestType.OUT, sector=10, out=[b"\x11" * 512, b"\x22" * 1024])
    assert run(blk, driver) == [(req.head, 1)]
    assert driver.status(req) == OK
    after = image.read_bytes()
    assert after[10 * 512 : 13 * 512] == b"\x11" * 512 + b"\x22" * 1024
    assert after[: 10 * 512] == before[: 10 * 512]
    assert after[13 * 512 :] == before[13 * 512 :]


def test_written_data_reads_back(blk: Block, driver: Driver) -> None:
    driver.submit(RequestType.OUT, sector=SECTORS - 1, out=[b"last sector!" * 42 + b"\0" * 8])
    req = driver.submit(RequestType.IN, sector=SECTORS - 1, data_in=[512])
    run(blk, driver)
    assert driver.data(req) == b"last sector!" * 42 + b"\0" * 8


@pytest.mark.parametrize(
    ("rtype", "out"),
    [
        (RequestType.OUT, [b"\x55" * 512]),
        (RequestType.DISCARD, [segment(0, 8)]),
        (RequestType.WRITE_ZEROES, [segment(0, 8)]),
        (RequestType.WRITE_ZEROES, [segment(0, 8, 1)]),
    ],
)
def test_writes_to_a_read_only_disk_fail_and_leave_the_file(
    ro_blk: Block, driver: Driver, image: Path, rtype: int, out: list[bytes]
) -> None:
    before = image.read_bytes()
    req = driver.submit(rtype, sector=0, out=out)
    assert run(ro_blk, driver) == [(req.head, 1)]
    assert driver.status(req) == IOERR
    assert image.read_bytes() == before


def test_reads_and_flush_work_on_a_read_only_disk(
    ro_blk: Block, driver: Driver, image: Path
) -> None:
    read = driver.submit(RequestType.IN, sector=0, data_in=[512])
    flush = driver.submit(RequestType.FLUSH)
    assert run(ro_blk, driver) == [(read.head, 513), (flush.head, 1)]
    assert (driver.status(read), driver.status(flush)) == (OK, OK)
    assert driver.data(read) == image.read_bytes()[:512]


@pytest.mark.parametrize(
    ("sector", "length"),
    [(SECTORS - 1, 1024), (SECTORS, 512), (1 << 54, 512), ((1 << 64) - 1, 512)],
)
def test_a_read_past_the_end_fails(blk: Block, driver: Driver, sector: int, length: int) -> None:
    req = driver.submit(RequestType.IN, sector=sector, data_in=[length])
    assert run(blk, driver) == [(req.head, 1)]
    assert driver.status(req) == IOERR


@pytest.mark.parametrize("sector", [SECTORS - 1, SECTORS, (1 << 64) - 1])
def test_a_write_past_the_end_fails_and_does_not_grow_the_image(
    blk: Block, driver: Driver, image: Path, sector: int
) -> None:
    before = image.read_bytes()
    req = driver.submit(RequestType.OUT, sector=sector, out=[b"\x77" * 1024])
    run(blk, driver)
    assert driver.status(req) == IOERR
    assert image.read_bytes() == before


@pytest.mark.parametrize("length", [1, 100, 511, 513, 1000])
def test_lengths_that_are_not_whole_sectors_fail(
    blk: Block, driver: Driver, image: Path, length: int
) -> None:
    before = image.read_bytes()
    read = driver.submit(RequestType.IN, sector=0, data_in=[length])
    write = driver.submit(RequestType.OUT, sector=0, out=[b"\x99" * length])
    assert run(blk, driver) == [(read.head, 1), (write.head, 1)]
    assert (driver.status(read), driver.status(write)) == (IOERR, IOERR)
    assert image.read_bytes() == before


# --- other request types ------------------------------------------------------------------------


def test_flush(blk: Block, driver: Driver) -> None:
    req = driver.submit(RequestType.FLUSH)
    assert run(blk, driver) == [(req.head, 1)]
    assert driver.status(req) == OK


def test_get_id_gives_the_serial_nul_padded(blk: Block, driver: Driver) -> None:
    req = driver.submit(RequestType.GET_ID, data_in=[20])
    assert run(blk, driver) == [(req.head, 21)]
    assert driver.status(req) == OK
    assert driver.data(req) == SERIAL.encode() + b"\0" * (20 - len(SERIAL))


def test_get_id_with_a_long_serial_and_split_buffers(image: Path, driver: Driver) -> None:
    dev = Block(RawDisk(str(image), False), "vdc", "S" * 30)
    try:
        req = driver.submit(RequestType.GET_ID, data_in=[8, 16])
        assert run(dev, driver) == [(req.head, 21)]
        assert driver.data(req) == b"S" * 20 + b"\xcc" * 4  # 20 bytes, no terminator
    finally:
        dev.close()


@pytest.mark.parametrize("rtype", [2, 5, 7, 99, 0xFFFFFFFF])
def test_unknown_request_types_are_unsupported(
    blk: Block, driver: Driver, image: Path, rtype: int
) -> None:
    before = image.read_bytes()
    req = driver.submit(rtype, out=[b"\x01" * 512], data_in=[512])
    assert run(blk, driver) == [(req.head, 1)]
    assert driver.status(req) == UNSUPP
    assert image.read_bytes() == before


# --- discard and write zeroes --------------------------------------------------------------------


@pytest.fixture
def big_image(tmp_path: Path) -> Iterator[tuple[Path, Block]]:
    path = tmp_path / "big.img"
    path.write_bytes(os.urandom(MiB))
    dev = Block(RawDisk(str(path), True), "vdd", SERIAL)
    yield path, dev
    dev.close()


def test_discard_punches_a_hole(big_image: tuple[Path, Block], driver: Driver) -> None:
    path, dev = big_image
    before = os.stat(path).st_blocks
    original = path.read_bytes()
    req = driver.submit(RequestType.DISCARD, out=[segment(512, 1024)])
    assert run(dev, driver) == [(req.head, 1)]
    assert driver.status(req) == OK
    after = os.stat(path)
    assert after.st_size == MiB
    assert after.st_blocks <= before - 1024 + 8
    data = path.read_bytes()
    assert data[256 * 1024 : 768 * 1024] == bytes(512 * 1024)
    assert data[: 256 * 1024] == original[: 256 * 1024]
    assert data[768 * 1024 :] == original[768 * 1024 :]
    read = driver.submit(RequestType.IN, sector=512, data_in=[512])
    run(dev, driver)
    assert driver.data(read) == bytes(512)


def test_discard_of_several_segments(big_image: tuple[Path, Block], driver: Driver) -> None:
    path, dev = big_image
    original = path.read_bytes()
    req = driver.submit(RequestType.DISCARD, out=[segment(0, 8) + segment(100, 8)])
    run(dev, driver)
    assert driver.status(req) == OK
    data = path.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[4096 : 100 * 512] == original[4096 : 100 * 512]
    assert data[100 * 512 : 108 * 512] == bytes(4096)


@pytest.mark.parametrize("flags", [0, 1])
def test_write_zeroes(big_image: tuple[Path, Block], driver: Driver, flags: int) -> None:
    path, dev = big_image
    original = path.read_bytes()
    req = driver.submit(RequestType.WRITE_ZEROES, out=[segment(3, 5, flags)])
    assert run(dev, driver) == [(req.head, 1)]
    assert driver.status(req) == OK
    data = path.read_bytes()
    assert data[3 * 512 : 8 * 512] == bytes(5 * 512)
    assert data[: 3 * 512] == original[: 3 * 512]
    assert data[8 * 512 :] == original[8 * 512 :]
    assert len(data) == MiB


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no segment
        segment(0, 8)[:15],  # truncated segment
        segment(0, 8) * 33,  # more than max_discard_seg
        segment(2040, 16),  # past the end
        segment(0, 1 << 23),  # more than max_discard_sectors
    ],
)
@pytest.mark.parametrize("rtype", [RequestType.DISCARD, RequestType.WRITE_ZEROES])
def test_bad_discard_and_write_zeroes_requests_fail(
    big_image: tuple[Path, Block], driver: Driver, rtype: int, payload: bytes
) -> None:
    path, dev = big_image
    original = path.read_bytes()
    req = driver.submit(rtype, out=[payload] if payload else [])
    assert run(dev, driver) == [(req.head, 1)]
    assert driver.status(req) == IOERR
    assert path.read_bytes() == original


@pytest.mark.parametrize("rtype", [RequestType.DISCARD, RequestType.WRITE_ZEROES])
def test_huge_segment_data_is_refused_before_it_is_read(
    big_image: tuple[Path, Block], driver: Driver, rtype: int
) -> None:
    """A segment list of 14 descriptors all over the same 1 MiB of RAM: the device must refuse
    it from the descriptor lengths, not join 14 MiB of guest memory first (4 GiB chains of
    this shape grew pyvmm by gigabytes)."""
    _, dev = big_image
    hdr = driver.alloc_buf(HEADER_SIZE)
    driver.mem.write(hdr, outhdr(rtype, 0))
    status = driver.alloc_buf(1)
    bufs = [(hdr, HEADER_SIZE, False), *[(0, MiB, False)] * (SIZE - 2), (status, 1, True)]
    req = Request(driver.chain(bufs), [], status)
    driver.publish(req.head)
    tracemalloc.start()
    try:
        assert run(dev, driver) == [(req.head, 1)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert driver.status(req) == IOERR
    assert peak < MiB  # host memory allocated while handling it: nowhere near the 14 MiB named


def test_discard_with_the_unmap_flag_is_unsupported(
    big_image: tuple[Path, Block], driver: Driver
) -> None:
    path, dev = big_image
    original = path.read_bytes()
    req = driver.submit(RequestType.DISCARD, out=[segment(0, 8, flags=1)])
    run(dev, driver)
    assert driver.status(req) == UNSUPP
    assert path.read_bytes() == original


def test_write_zeroes_with_an_unknown_flag_is_unsupported(
    big_image: tuple[Path, Block], driver: Driver
) -> None:
    path, dev = big_image
    original = path.read_bytes()
    req = driver.submit(RequestType.WRITE_ZEROES, out=[segment(0, 8, flags=2)])
    run(dev, driver)
    assert driver.status(req) == UNSUPP
    assert path.read_bytes() == original


# --- malformed chains and queue behaviour --------------------------------------------------------


def test_a_request_without_a_status_byte_completes_empty(
    blk: Block, driver: Driver, image: Path
) -> None:
    before = image.read_bytes()
    bad = driver.submit(RequestType.OUT, sector=0, out=[b"\x42" * 512], status=False)
    good = driver.submit(RequestType.FLUSH)
    assert run(blk, driver) == [(bad.head, 0), (good.head, 1)]
    assert driver.status(good) == OK
    assert image.read_bytes() == before


def test_a_request_without_a_header_completes_empty(blk: Block, driver: Driver) -> None:
    bad = driver.submit(RequestType.IN, data_in=[512], header=False)
    short = driver.alloc_buf(8)
    status = driver.alloc_buf(1)
    driver.mem.write(status, bytes([NO_STATUS]))
    driver.publish(driver.chain([(short, 8, False), (status, 1, True)]))  # half a header
    assert run(blk, driver) == [(bad.head, 0), (bad.head + 2, 0)]
    assert driver.status(bad) == NO_STATUS
    assert driver.mem.read(status, 1) == bytes([NO_STATUS])
    assert driver.data(bad) == b"\xcc" * 512


def test_queued_requests_all_complete_in_order(blk: Block, driver: Driver, image: Path) -> None:
    reqs = [
        driver.submit(RequestType.OUT, sector=5, out=[b"\x5a" * 512]),
        driver.submit(RequestType.IN, sector=5, data_in=[512]),
        driver.submit(RequestType.FLUSH),
        driver.submit(RequestType.GET_ID, data_in=[20]),
        driver.submit(RequestType.IN, sector=SECTORS, data_in=[512]),
    ]
    used = run(blk, driver)
    assert used == [(r.head, n) for r, n in zip(reqs, [1, 513, 1, 21, 1], strict=True)]
    assert [driver.status(r) for r in reqs] == [OK, OK, OK, OK, IOERR]
    assert driver.data(reqs[1]) == b"\x5a" * 512
    assert run(blk, driver) == []  # nothing left


def test_a_chain_outside_ram_is_returned_empty_and_the_next_request_works(
    blk: Block, driver: Driver, image: Path
) -> None:
    hdr = driver.alloc_buf(HEADER_SIZE)
    driver.mem.write(hdr, outhdr(RequestType.IN, 0))
    bad = driver.chain(
        [(hdr, HEADER_SIZE, False), (MiB - 256, 512, True), (hdr + HEADER_SIZE, 1, True)]
    )
    driver.publish(bad)
    good = driver.submit(RequestType.IN, sector=1, data_in=[512])
    assert run(blk, driver) == [(bad, 0), (good.head, 513)]
    assert driver.status(good) == OK
    assert driver.data(good) == image.read_bytes()[512:1024]


def test_a_bad_head_index_needs_a_reset(blk: Block, driver: Driver) -> None:
    driver.publish(SIZE + 3)
    with pytest.raises(DeviceError):
        blk.process_queue(0, driver.queue)
    assert driver.used() == []


def test_a_partial_last_sector_is_not_part_of_the_capacity(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * (512 * 3 + 100))
    dev = Block(RawDisk(str(path), False, "-d"), "vda", SERIAL)
    try:
        buf = bytearray(8)
        dev.config_read(0, memoryview(buf))  # capacity, in 512-byte sectors
        assert int.from_bytes(buf, "little") == 3
    finally:
        dev.close()
