"""Raw disk images: opening (errors a user can act on), locking between VMs, and the bytes
that reach the file or come back from it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.disk import SECTOR_SIZE, DiskError, RawDisk

NOBODY = 65534


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 32)  # 8 KiB, 16 sectors
    return path


@pytest.fixture
def opened() -> Iterator[list[RawDisk]]:
    disks: list[RawDisk] = []
    yield disks
    for d in disks:
        d.close()


def open_disk(opened: list[RawDisk], path: Path, writable: bool) -> RawDisk:
    disk = RawDisk(str(path), writable, "--disk")
    opened.append(disk)
    return disk


# --- opening ------------------------------------------------------------------------------------


def test_size(image: Path, opened: list[RawDisk]) -> None:
    disk = open_disk(opened, image, writable=False)
    assert disk.size == 8192
    assert not disk.writable


@pytest.mark.parametrize("writable", [False, True])
def test_missing_file(tmp_path: Path, writable: bool) -> None:
    path = tmp_path / "nope.img"
    with pytest.raises(DiskError) as e:
        RawDisk(str(path), writable, "--disk")
    assert str(e.value) == f"--disk {path}: no such file"


@pytest.mark.parametrize("writable", [False, True])
def test_a_directory_is_refused(tmp_path: Path, writable: bool) -> None:
    with pytest.raises(DiskError) as e:
        RawDisk(str(tmp_path), writable, "--disk-ro")
    assert str(e.value) == (
        f"--disk-ro {tmp_path}: is a directory; expected a regular file or block device"
    )


@pytest.mark.timeout(20)
@pytest.mark.parametrize("writable", [False, True])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path, writable: bool) -> None:
    """No process has the FIFO open: a plain open() would wait for one for ever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DiskError) as e:
        RawDisk(str(fifo), writable, "--disk")
    assert str(e.value) == (
        f"--disk {fifo}: is a FIFO (named pipe); expected a regular file or block device"
    )


@pytest.mark.parametrize("path", ["/proc/version", "/proc/self/mem"])
def test_a_file_that_cannot_be_sized_is_refused(path: str) -> None:
    """procfs files are regular files whose end cannot be sought."""
    with pytest.raises(DiskError) as e:
        RawDisk(path, False, "-d/--disk")
    assert str(e.value) == f"-d/--disk {path}: cannot find its size: Invalid argument"


def test_a_character_device_is_refused_unopened() -> None:
    with pytest.raises(DiskError) as e:
        RawDisk("/dev/null", False, "-d/--disk")
    assert str(e.value).endswith("is a character device; expected a regular file or block device")


def _open_as_nobody(path: str, writable: bool) -> str:
    """Try RawDisk in a child process with uid/gid nobody; the DiskError message or 'opened'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                RawDisk(path, writable, "--disk").close()
                result = "opened"
            except DiskError as e:
                result = str(e)
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can search (pytest's tmp_path is private to its owner)."""
    d = Path(tempfile.mkdtemp(prefix="pyvmm-raw-"))
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _permission_error(path: Path, writable: bool) -> str:
    if os.getuid() == 0:
        return _open_as_nobody(str(path), writable)
    try:
        RawDisk(str(path), writable, "--disk").close()
    except DiskError as e:
        return str(e)
    return "opened"


def test_an_unreadable_image(shared_dir: Path) -> None:
    path = shared_dir / "secret.img"
    path.write_bytes(b"\0" * 512)
    path.chmod(0)
    assert _permission_error(path, False) == f"--disk {path}: not readable (permission denied)"


def test_an_image_that_is_not_writable(shared_dir: Path) -> None:
    path = shared_dir / "ro.img"
    path.write_bytes(b"\0" * 512)
    path.chmod(0o444)
    assert _permission_error(path, True) == f"--disk {path}: not writable (permission denied)"
    assert _permission_error(path, False) == "opened"  # read-only use is fine


# --- locking between VMs ------------------------------------------------------------------------


def test_a_second_writable_open_is_refused(image: Path, opened: list[RawDisk]) -> None:
    open_disk(opened, image, writable=True)
    with pytest.raises(DiskError) as e:
        RawDisk(str(image), True, "--disk")
    assert str(e.value) == f"--disk {image}: in use by another VM (locked)"


def test_a_read_only_open_of_an_image_being_written_is_refused(
    image: Path, opened: list[RawDisk]
) -> None:
    open_disk(opened, image, writable=True)
    with pytest.raises(DiskError) as e:
        RawDisk(str(image), False, "--disk-ro")
    assert str(e.value) == f"--disk-ro {image}: in use by another VM (locked for writing)"


def test_a_writable_open_of_an_image_being_read_is_refused(
    image: Path, opened: list[RawDisk]
) -> None:
    open_disk(opened, image, writable=False)
    with pytest.raises(DiskError, match="in use by another VM"):
        RawDisk(str(image), True, "--disk")


def test_two_read_only_opens_share_the_image(image: Path, opened: list[RawDisk]) -> None:
    a = open_disk(opened, image, writable=False)
    b = open_disk(opened, image, writable=False)
    assert a.size == b.size == 8192


def test_closing_releases_the_lock(image: Path, opened: list[RawDisk]) -> None:
    first = RawDisk(str(image), True)
    first.close()
    first.close()  # twice is harmless
    assert open_disk(opened, image, writable=True).writable


def test_a_refused_open_leaks_no_descriptor(image: Path, opened: list[RawDisk]) -> None:
    open_disk(opened, image, writable=True)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(DiskError):
            RawDisk(str(image), True)
    assert len(os.listdir("/proc/self/fd")) == before


# --- data ----------------------------------------------------------------------------------------


def test_read_into_scattered_buffers(image: Path, opened: list[RawDisk]) -> None:
    disk = open_disk(opened, image, writable=False)
    a, b, c = bytearray(100), bytearray(0), bytearray(412)
    n = disk.read_into(1000, [memoryview(a), memoryview(b), memoryview(c)])
    assert n == 512
    assert bytes(a + c) == image.read_bytes()[1000:1512]


def test_short_read_at_the_end_of_the_file(image: Path, opened: list[RawDisk]) -> None:
    disk = open_disk(opened, image, writable=False)
    a, b = bytearray(b"\xee" * 300), bytearray(b"\xee" * 300)
    assert disk.read_into(8192 - 400, [memoryview(a), memoryview(b)]) == 400
    assert bytes(a) == image.read_bytes()[-400:-100]
    assert bytes(b[:100]) == image.read_bytes()[-100:]
    assert bytes(b[100:]) == b"\xee" * 200  # nothing written past what was read
    assert disk.read_into(8192, [memoryview(a)]) == 0


def test_write_from_scattered_buffers(image: Path, opened: list[RawDisk]) -> None:
    disk = open_disk(opened, image, writable=True)
    bufs = [memoryview(b"A" * 10), memoryview(b""), memoryview(b"B" * 502)]
    assert disk.write_from(512, bufs) == 512
    disk.flush()
    data = image.read_bytes()
    assert data[512:1024] == b"A" * 10 + b"B" * 502
    assert data[:512] == (bytes(range(256)) * 2)
    assert len(data) == 8192


def test_discard_punches_a_hole_that_reads_as_zeroes(tmp_path: Path, opened: list[RawDisk]) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(os.urandom(1 << 20))
    disk = open_disk(opened, path, writable=True)
    before = os.stat(path).st_blocks
    disk.discard(256 * 1024, 512 * 1024)
    after = os.stat(path)
    assert after.st_size == 1 << 20
    assert after.st_blocks <= before - (512 * 1024 // 512) + 8  # allow for fs granularity
    data = path.read_bytes()
    assert data[256 * 1024 : 768 * 1024] == bytes(512 * 1024)
    assert data[: 256 * 1024] != bytes(256 * 1024)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(image: Path, opened: list[RawDisk], unmap: bool) -> None:
    disk = open_disk(opened, image, writable=True)
    original = image.read_bytes()
    disk.write_zeroes(1024, 1536, unmap)
    data = image.read_bytes()
    assert data[1024:2560] == bytes(1536)
    assert data[:1024] == original[:1024]
    assert data[2560:] == original[2560:]
    assert len(data) == 8192


def test_a_disk_from_an_open_fd_as_a_device_process_gets_it(image: Path) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    disk = RawDisk.from_fd(fd, str(image), writable=True)
    try:
        assert (disk.fd, disk.size) == (fd, image.stat().st_size)
        buf = bytearray(SECTOR_SIZE)
        assert disk.read_into(0, [memoryview(buf)]) == SECTOR_SIZE
        assert bytes(buf) == image.read_bytes()[:SECTOR_SIZE]
    finally:
        disk.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the disk owned it


def test_a_disk_from_an_fd_that_cannot_be_sized() -> None:
    fd = os.open("/proc/version", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(DiskError, match=r"^/proc/version: cannot find its size"):
            RawDisk.from_fd(fd, "/proc/version", writable=False)
    finally:
        os.close(fd)
