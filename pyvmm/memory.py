"""Guest RAM: one memfd mapped MAP_SHARED in regions, with every access bounds-checked.

All guest memory access in pyvmm goes through `GuestMemory`. A guest physical address and length
either lie wholly inside one RAM region or the access raises `GuestMemoryError`; no guest-supplied
number ever becomes a host pointer unchecked. Device processes map the same memfd, so the data a
device writes is the data the guest sees, with no copies.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvmm.kvm.abi import ffi

PAGE_SIZE = 4096


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
    """A contiguous range of guest RAM backed by `file_offset..` of the guest memfd."""

    guest_addr: int
    size: int
    file_offset: int
    mapping: mmap.mmap = field(repr=False)

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    @property
    def host_addr(self) -> int:
        """The host virtual address of the region's first byte (for KVM memory slots)."""
        addr: int = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mapping)))
        return addr


class GuestMemory:
    """Guest RAM made of non-overlapping regions, all backed by one memfd."""

    def __init__(self, ranges: list[tuple[int, int]], name: str = "pyvmm-guest-ram") -> None:
        """Create RAM for `ranges` of (guest address, size); sizes and addresses page-aligned."""
        ordered = sorted(ranges)
        for (a, s), (b, _) in itertools.pairwise(ordered):
            if a + s > b:
                raise ValueError(f"guest RAM ranges overlap at {b:#x}")
        for addr, size in ordered:
            if addr % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise ValueError(f"guest RAM range {addr:#x}+{size:#x} is not page-aligned")
        total = sum(size for _, size in ordered)
        self.memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.memfd, total)
            # The size is fixed from here on: a device process that maps the memfd can rely on it.
            fcntl_seal(self.memfd)
            self.regions: list[MemoryRegion] = []
            offset = 0
            for addr, size in ordered:
                mapping = mmap.mmap(
                    self.memfd,
                    size,
                    mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=offset,
                )
                _advise_huge_pages(mapping)
                self.regions.append(MemoryRegion(addr, size, offset, mapping))
                offset += size
        except BaseException:
            os.close(self.memfd)
            raise
        self.size = total
        self._views = [memoryview(r.mapping) for r in self.regions]
        # (start, end, view) per region: what view() scans on every device access.
        self._spans = [
            (r.guest_addr, r.end, v) for r, v in zip(self.regions, self._views, strict=True)
        ]

    def close(self) -> None:
        for v in self._views:
            v.release()
        for r in self.regions:
            r.mapping.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    @property
    def end(self) -> int:
        """One past the highest guest RAM address."""
        return self.regions[-1].end

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

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        self.view(addr, length)[:] = bytes([byte]) * length

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


def fcntl_seal(fd: int) -> None:
    """Forbid the memfd from shrinking or growing."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
