"""ELF vmlinux loader: each PT_LOAD segment goes to its physical address (p_paddr).

For a Linux vmlinux, e_entry is the physical address of the 64-bit entry point (startup_64).
Notes (such as the PVH entry note) are ignored: pyvmm always enters in 64-bit long mode.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
from dataclasses import dataclass
from typing import Any

from pyvmm.loader import (
    KernelImage,
    LoadArea,
    check_kernel_ram,
    describe_os_error,
    file_size,
    format_size,
    read_into_guest,
)
from pyvmm.loader.errors import (
    ElfByteOrderError,
    ElfClassError,
    ElfEntryError,
    ElfHeaderError,
    ElfMachineError,
    ElfNoLoadableSegmentError,
    ElfSegmentOverlapError,
    ElfSegmentSizeError,
    ElfTypeError,
    KernelFileError,
    KernelOutsideRamError,
    KernelTruncatedError,
)
from pyvmm.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 64
EM_X86_64 = "EM_X86_64"
LOADABLE_TYPES = ("ET_EXEC", "ET_DYN")
PT_LOAD = "PT_LOAD"
# e_phnum's escape value: the program header count is in section header 0's sh_info.
PN_XNUM = 0xFFFF
# x86_64 Linux: COMMAND_LINE_SIZE is 2048 including the terminating NUL.
ELF_CMDLINE_MAX = 2047
# A vmlinux has no setup header to say otherwise; the caller caps the initrd to low RAM anyway.
ELF_INITRD_ADDR_MAX = 0xFFFF_FFFF


def _parse_errors() -> tuple[type[Exception], ...]:
    """What pyelftools raises on malformed input: its own errors, its construct library's, and
    a few plain ones from decoding garbage."""
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError

    return (ELFError, ConstructError, struct.error, ValueError, EOFError, KeyError, IndexError)


@dataclass(frozen=True)
class _Segment:
    index: int
    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz

    def describe(self) -> str:
        return f"PT_LOAD segment {self.index} at [{self.paddr:#x}, {self.end:#x})"


def is_elf(head: bytes) -> bool:
    return head.startswith(ELF_MAGIC)


def load_elf(mem: GuestMemory, fd: int, path: str, area: LoadArea) -> KernelImage:
    """Load the ELF kernel open on `fd` (named `path` in errors) into `mem`."""
    label = f"kernel {path}"
    size = file_size(fd, label, KernelFileError)
    segments, entry = _parse(fd, label)
    if not segments:
        raise ElfNoLoadableSegmentError(f"{label}: ELF has no PT_LOAD segment; nothing to load")
    for seg in segments:
        _check_segment(seg, size, label, area)
    ordered = sorted(segments, key=lambda s: s.paddr)
    for lower, upper in itertools.pairwise(ordered):
        if lower.end > upper.paddr:
            raise ElfSegmentOverlapError(
                f"{label}: {lower.describe()} overlaps {upper.describe()} in physical memory"
            )
    # Highest first, so that a too-small -m is reported with the RAM the whole kernel needs.
    for seg in sorted(segments, key=lambda s: s.end, reverse=True):
        check_kernel_ram(mem, area, seg.paddr, seg.end, label, f"PT_LOAD segment {seg.index}")
    if not any(s.paddr <= entry < s.end for s in segments):
        raise ElfEntryError(
            f"{label}: ELF entry point e_entry={entry:#x} is not inside any PT_LOAD segment "
            "(expected the physical address of the 64-bit entry)"
        )
    for seg in ordered:
        got = read_into_guest(fd, mem, seg.paddr, seg.filesz, seg.offset, label, KernelFileError)
        if got != seg.filesz:
            raise KernelTruncatedError(
                f"{label}: truncated ELF: {seg.describe()} needs file bytes up to "
                f"{seg.offset + seg.filesz:#x}, the file ended at {seg.offset + got:#x}"
            )
        if seg.memsz > seg.filesz:
            mem.zero(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    return KernelImage(
        entry=entry,
        load_start=ordered[0].paddr,
        load_end=max(s.end for s in segments),
        setup_header=None,
        cmdline_max=ELF_CMDLINE_MAX,
        initrd_addr_max=ELF_INITRD_ADDR_MAX,
        kind="elf",
    )


def _parse(fd: int, label: str) -> tuple[list[_Segment], int]:
    """The non-empty PT_LOAD segments and e_entry, after checking the ELF header."""
    try:
        with os.fdopen(os.dup(fd), "rb", closefd=True) as stream:
            return _parse_stream(stream, label)
    except OSError as exc:
        raise KernelFileError(f"{label}: {describe_os_error(exc)}") from exc


def _parse_stream(stream: io.BufferedReader, label: str) -> tuple[list[_Segment], int]:
    # pyelftools is imported here, not at the top: it adds ~20 ms to every start-up otherwise,
    # and most boots load a bzImage.
    from elftools.common.utils import struct_parse
    from elftools.elf.elffile import ELFFile

    parse_errors = _parse_errors()
    try:
        elf: Any = ELFFile(stream)
        elfclass = elf.elfclass
        little_endian = elf.little_endian
        header = elf.header
    except parse_errors as exc:
        raise ElfHeaderError(f"{label}: unreadable ELF header ({_one_line(exc)})") from exc
    if elfclass != ELFCLASS64:
        raise ElfClassError(f"{label}: 32-bit ELF; pyvmm boots 64-bit x86_64 kernels")
    if not little_endian:
        raise ElfByteOrderError(f"{label}: big-endian ELF; x86_64 kernels are little-endian")
    machine = header["e_machine"]
    if machine != EM_X86_64:
        raise ElfMachineError(
            f"{label}: ELF for machine {machine}; pyvmm boots x86_64 kernels ({EM_X86_64})"
        )
    e_type = header["e_type"]
    if e_type not in LOADABLE_TYPES:
        raise ElfTypeError(
            f"{label}: ELF type {e_type}; expected an executable ({' or '.join(LOADABLE_TYPES)})"
        )
    segments: list[_Segment] = []
    try:
        phoff, count = _program_header_table(elf, stream, label)
        for i in range(count):
            # The raw program header: pyelftools' Segment objects would also parse notes etc.
            ph = struct_parse(elf.structs.Elf_Phdr, stream, phoff + i * header["e_phentsize"])
            if ph["p_type"] == PT_LOAD and ph["p_memsz"] > 0:
                segments.append(
                    _Segment(i, ph["p_paddr"], ph["p_offset"], ph["p_filesz"], ph["p_memsz"])
                )
    except parse_errors as exc:
        raise ElfHeaderError(f"{label}: unreadable ELF program headers ({_one_line(exc)})") from exc
    return segments, int(header["e_entry"])


def _program_header_table(elf: Any, stream: io.BufferedReader, label: str) -> tuple[int, int]:
    """(e_phoff, number of entries) of a program header table the file really holds.

    Every header field that sizes work is checked against the file first, so no loop or
    allocation can grow with a number the file does not back with bytes."""
    from elftools.common.utils import struct_parse

    header = elf.header
    size = elf.stream_len
    phdr_size = elf.structs.Elf_Phdr.sizeof()
    count = header["e_phnum"]
    if count == PN_XNUM:
        # More entries than e_phnum can hold: the count is section header 0's sh_info.
        shoff = header["e_shoff"]
        if shoff == 0 or shoff + elf.structs.Elf_Shdr.sizeof() > size:
            raise ElfHeaderError(
                f"{label}: e_phnum is PN_XNUM ({PN_XNUM:#x}) but section header 0, which holds "
                f"the real count, is not in the file (e_shoff {shoff:#x}, file size {size:#x})"
            )
        count = struct_parse(elf.structs.Elf_Shdr, stream, shoff)["sh_info"]
    if count == 0:
        return 0, 0
    phentsize = header["e_phentsize"]
    if phentsize != phdr_size:
        raise ElfHeaderError(
            f"{label}: e_phentsize {phentsize}; a 64-bit program header is {phdr_size} bytes"
        )
    phoff = header["e_phoff"]
    end = phoff + count * phdr_size
    if end > size:
        raise KernelTruncatedError(
            f"{label}: truncated ELF: the program header table ({count} entries at e_phoff "
            f"{phoff:#x}) needs file bytes up to {end:#x}, the file has {size:#x}"
        )
    return phoff, count


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_segment(seg: _Segment, size: int, label: str, area: LoadArea) -> None:
    if seg.filesz > seg.memsz:
        raise ElfSegmentSizeError(
            f"{label}: {seg.describe()} has p_filesz {seg.filesz:#x} > p_memsz {seg.memsz:#x}"
        )
    if seg.offset + seg.filesz > size:
        raise KernelTruncatedError(
            f"{label}: truncated ELF: {seg.describe()} needs file bytes up to "
            f"{seg.offset + seg.filesz:#x}, the file has {size:#x}"
        )
    if seg.paddr < area.floor:
        raise KernelOutsideRamError(
            f"{label}: {seg.describe()} starts below {format_size(area.floor)} ({area.floor:#x}), "
            f"where pyvmm keeps {area.below_floor}"
        )
