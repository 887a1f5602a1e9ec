"""Guest memory: RAM in one memfd mapped MAP_SHARED, every access bounds-checked.

All guest memory access in pyvmm goes through `GuestMemory`. A guest physical address and length
either lie wholly inside one region or the access raises `GuestMemoryError`; no guest-supplied
number ever becomes a host pointer unchecked. Device processes (multiprocess mode, to come)
will map the same memfd (a `GuestMemory` built from it), so the data a device writes is the
data the guest sees, with no copies. Besides RAM, a file can be mapped into guest-physical
memory (pmem): such a region is not RAM (not in the e820 map) and may be read-only.

The compiled virtqueue walker (pyvmm/native/virtq.c) checks guest addresses against the same
regions, through `GuestMemory.native`: a table of them that pins their mappings while in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvmm.native import virtq

PAGE_SIZE = 4096
# The most guest RAM pyvmm maps, in MiB (what -m/--mem accepts). Guest RAM above 4 GiB is not
# limited otherwise; this keeps typos like `-m 1000000000` from reserving absurd address space.
MAX_MEM_MIB = 1 << 20
# The most bytes fill() and zero() write at once: their host buffer never grows with the range.
FILL_CHUNK = 1 << 20
_ZEROES = bytes(FILL_CHUNK)

log = logging.getLogger(__name__)


SHMEM_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def _advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages, as QEMU does for guest RAM: one fault per 2 MiB instead
    of per 4 KiB, and fewer TLB misses. For a memfd the kernel honours this only when the host's
    shmem_enabled setting is `advise` (or always/within_size); otherwise it is a no-op."""
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages
        mapping.madvise(mmap.MADV_HUGEPAGE)


def shmem_huge_pages() -> str:
    """The host's setting for huge pages in shared memory (`never` when it has none)."""
    try:
        with open(SHMEM_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return "never"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "never"


class GuestMemoryError(Exception):
    """A guest address range that is not wholly inside guest RAM."""

    def __init__(self, addr: int, length: int) -> None:
        super().__init__(f"guest address range {addr:#x}+{length:#x} is outside guest RAM")
        self.addr = addr
        self.length = length


@dataclass
class MemoryRegion:
    """A contiguous range of guest-physical memory backed by `file_offset..` of `fd`: guest RAM
    (the guest memfd), or a file mapped into the guest that is not RAM (a pmem image)."""

    guest_addr: int
    size: int
    file_offset: int
    mapping: mmap.mmap = field(repr=False)
    fd: int = -1
    readonly: bool = False
    ram: bool = True

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    @property
    def host_addr(self) -> int:
        """The host virtual address of the region's first byte (for KVM memory slots)."""
        addr: int = int(virtq.ffi.cast("uintptr_t", virtq.ffi.from_buffer(self.mapping)))
        return addr


def _check_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` sorted; ValueError if they overlap or are not page-aligned."""
    ordered = sorted(ranges)
    for (a, s), (b, _) in itertools.pairwise(ordered):
        if a + s > b:
            raise ValueError(f"guest memory ranges overlap at {b:#x}")
    for addr, size in ordered:
        if addr % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"guest memory range {addr:#x}+{size:#x} is not page-aligned")
    return ordered


class GuestMemory:
    """Guest memory made of non-overlapping regions: RAM, all backed by one memfd, and any
    file-backed regions added with `add_file_region`."""

    def __init__(
        self,
        ranges: list[tuple[int, int]],
        name: str = "pyvmm-guest-ram",
        *,
        memfd: int | None = None,
    ) -> None:
        """RAM for `ranges` of (guest address, size), page-aligned: in a new memfd, or in
        `memfd` (of exactly that size), as a device process will map the VM's RAM. The object owns
        the memfd either way and closes it in `close`."""
        ordered = _check_ranges(ranges)
        total = sum(size for _, size in ordered)
        if memfd is None:
            memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(memfd, total)
                # Its size is fixed from here on: whoever else maps it can rely on it.
                fcntl_seal(memfd)
            except BaseException:
                os.close(memfd)
                raise
        self.memfd = memfd
        self.regions: list[MemoryRegion] = []
        try:
            if os.fstat(memfd).st_size != total:
                raise ValueError(
                    f"guest RAM memfd holds {os.fstat(memfd).st_size:#x} bytes, not {total:#x}"
                )
            offset = 0
            for addr, size in ordered:
                mapping = mmap.mmap(
                    memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
                )
                _advise_huge_pages(mapping)
                self.regions.append(MemoryRegion(addr, size, offset, mapping, memfd))
                offset += size
        except BaseException:
            for r in self.regions:
                r.mapping.close()
            os.close(memfd)
            raise
        self.size = total
        """Bytes of RAM (file-backed regions not counted)."""
        self._views: list[memoryview] = []
        # (start, end, view) per region: what view() scans on every device access.
        self._spans: list[tuple[int, int, memoryview]] = []
        self.native = NativeRegions([])
        """The regions as the compiled walker sees them (see NativeRegions)."""
        for r in self.regions:
            self._add_span(r)

    def _add_span(self, region: MemoryRegion) -> None:
        view = memoryview(region.mapping)
        self._views.append(view)
        self._spans = sorted([*self._spans, (region.guest_addr, region.end, view)], key=_start)
        self.native = NativeRegions(
            sorted(self.regions, key=lambda r: r.guest_addr), [span[2] for span in self._spans]
        )

    @property
    def ram_regions(self) -> list[MemoryRegion]:
        return [r for r in self.regions if r.ram]

    def add_file_region(
        self, guest_addr: int, fd: int, size: int, readonly: bool, offset: int = 0
    ) -> MemoryRegion:
        """Map `size` bytes of file `fd` from `offset` at `guest_addr` as memory that is not RAM
        (a pmem image): shared with the file, read-only to the guest if `readonly`. The caller
        keeps `fd`; the mapping is released by `close`."""
        _check_ranges([(guest_addr, size)])
        for r in self.regions:
            if guest_addr < r.end and r.guest_addr < guest_addr + size:
                raise ValueError(f"guest memory range {guest_addr:#x}+{size:#x} overlaps {r}")
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        region = MemoryRegion(guest_addr, size, offset, mapping, fd, readonly=readonly, ram=False)
        self.regions.append(region)
        self._add_span(region)
        return region

    def close(self) -> None:
        """Give up this object's use of guest RAM; idempotent, never raises.

        Views handed out earlier may outlive this call (a worker that was abandoned, a chain
        not yet dropped): a mapping that still has views is not unmapped here but unmaps itself
        when the last of them goes. So no view ever points at unmapped memory, and nothing
        depends on when the garbage collector runs. The same holds for the compiled walker: a
        walk in progress holds the table it was given (and its pins); later walks get an empty
        one, in which no address is guest memory."""
        self._spans = []
        self.native = NativeRegions([])
        for v in self._views:
            v.release()
        self._views = []
        for r in self.regions:
            try:
                r.mapping.close()
            except BufferError:
                log.debug(
                    "guest RAM at %#x: still viewed; unmapped once the views go", r.guest_addr
                )
        if self.memfd >= 0:
            os.close(self.memfd)  # the mappings keep the memory itself alive
            self.memfd = -1

    @property
    def end(self) -> int:
        """One past the highest guest RAM address."""
        return self.ram_regions[-1].end

    def is_ram(self, addr: int, length: int = 1) -> bool:
        try:
            self.view(addr, length).release()
        except GuestMemoryError:
            return False
        return True

    def view(self, addr: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM [addr, addr+length), for in-place I/O."""
        if addr >= 0 and length >= 0:
            end = addr + length
            for start, stop, view in self._spans:
                if start <= addr and end <= stop:
                    return view[addr - start : end - start]
        raise GuestMemoryError(addr, length)

    def host_address(self, addr: int, length: int) -> int:
        """Where guest RAM [addr, addr+length) is in this process (for a kernel that reads it
        directly: vhost); GuestMemoryError unless it lies within one RAM region."""
        if addr >= 0 and length >= 0:
            for region in self.ram_regions:
                if region.guest_addr <= addr and addr + length <= region.end:
                    return region.host_addr + addr - region.guest_addr
        raise GuestMemoryError(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set [addr, addr+length) to `byte`, a bounded chunk at a time."""
        if byte == 0:
            self.zero(addr, length)
            return
        view = self.view(addr, length)
        pattern = bytes([byte]) * min(length, FILL_CHUNK)
        for at in range(0, length, FILL_CHUNK):
            part = view[at : at + FILL_CHUNK]
            part[:] = pattern[: len(part)]

    def discard(self, addr: int, length: int) -> None:
        """Give guest RAM [addr, addr+length), whole pages within one region, back to the host
        (MADV_REMOVE on the memfd: freed for every process that maps it, and read as zero until
        written again). GuestMemoryError unless it is page-aligned RAM of one region."""
        if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise GuestMemoryError(addr, length)
        for region in self.ram_regions:
            if region.guest_addr <= addr and addr + length <= region.end:
                region.mapping.madvise(mmap.MADV_REMOVE, addr - region.guest_addr, length)
                return
        raise GuestMemoryError(addr, length)

    def guest_range(self, view: memoryview) -> tuple[int, int]:
        """The guest address and length of `view`, a view of guest memory this object gave
        (a descriptor's buffer); GuestMemoryError if it is not one."""
        where = int(virtq.ffi.cast("uintptr_t", virtq.ffi.from_buffer(view)))
        for start, stop, region_view in self._spans:
            base = int(virtq.ffi.cast("uintptr_t", virtq.ffi.from_buffer(region_view)))
            if base <= where and where + len(view) <= base + (stop - start):
                return start + where - base, len(view)
        raise GuestMemoryError(where, len(view))

    def zero(self, addr: int, length: int) -> None:
        """Zero [addr, addr+length) with no host buffer of that size: the whole pages go back
        to the memfd (MADV_REMOVE: they read as zero in every process that maps them and cost
        nothing until touched again); the partial pages at either end are cleared in place."""
        view = self.view(addr, length)
        if length == 0:
            return
        region = next(r for r in self.regions if r.guest_addr <= addr < r.end)
        offset = addr - region.guest_addr
        pages_start = -(-offset // PAGE_SIZE) * PAGE_SIZE - offset  # both relative to `addr`
        pages_end = (offset + length) // PAGE_SIZE * PAGE_SIZE - offset
        if pages_end > pages_start and region.ram:  # never punch holes in a user's file
            try:
                region.mapping.madvise(
                    mmap.MADV_REMOVE, offset + pages_start, pages_end - pages_start
                )
            except OSError:  # memory that cannot give pages back: clear it all by hand
                pages_start = pages_end = length
        else:
            pages_start = pages_end = length
        for start, end in ((0, pages_start), (pages_end, length)):
            for at in range(start, end, FILL_CHUNK):
                part = view[at : min(end, at + FILL_CHUNK)]
                part[:] = _ZEROES[: len(part)]

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.view(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.view(addr, size)[:] = value.to_bytes(size, "little")

    def read_u8(self, addr: int) -> int:
        return self.read_int(addr, 1)

    def read_u16(self, addr: int) -> int:
        return self.read_int(addr, 2)

    def read_u32(self, addr: int) -> int:
        return self.read_int(addr, 4)

    def read_u64(self, addr: int) -> int:
        return self.read_int(addr, 8)

    def write_u8(self, addr: int, value: int) -> None:
        self.write_int(addr, 1, value)

    def write_u16(self, addr: int, value: int) -> None:
        self.write_int(addr, 2, value)

    def write_u32(self, addr: int, value: int) -> None:
        self.write_int(addr, 4, value)

    def write_u64(self, addr: int, value: int) -> None:
        self.write_int(addr, 8, value)

    def unpack(self, fmt: str, addr: int) -> tuple[Any, ...]:
        return struct.unpack_from(fmt, self.view(addr, struct.calcsize(fmt)))


class NativeRegions:
    """Guest memory's regions as `struct pyvmm_memory` for the compiled walker, in address
    order, with a pin (a cffi buffer) on each mapping: a mapping is not unmapped while a table
    that names it exists. `views[i]` is region i's memoryview, for views of what the walker
    found there."""

    def __init__(self, regions: list[MemoryRegion], views: list[memoryview] | None = None) -> None:
        self.views = views or []
        self._pins = [virtq.ffi.from_buffer(r.mapping) for r in regions]
        self._table: Any = virtq.ffi.new("struct pyvmm_region[]", max(len(regions), 1))
        for i, (region, pin) in enumerate(zip(regions, self._pins, strict=True)):
            entry = self._table[i]
            entry.guest_addr = region.guest_addr
            entry.size = region.size
            entry.host_addr = int(virtq.ffi.cast("uintptr_t", pin))
            entry.readonly = region.readonly
        self.c: Any = virtq.ffi.new("struct pyvmm_memory *")
        self.c.regions = self._table
        self.c.count = len(regions)


def _start(span: tuple[int, int, memoryview]) -> int:
    return span[0]


def fcntl_seal(fd: int) -> None:
    """Forbid the memfd from shrinking or growing."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
