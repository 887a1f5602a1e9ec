"""Tiny kernel images for the loader tests: ELF64 files and bzImage-shaped files."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvmm.loader.bootparams import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    ffi,
)

MiB = 1 << 20

ELF64_HEADER = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")
PN_XNUM = 0xFFFF
ELF32_HEADER = struct.Struct("<4sBBBBB7xHHIIIIIHHHHHH")
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
ET_REL = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
PT_LOAD = 1
PT_NOTE = 4


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None
    p_type: int = PT_LOAD
    filesz: int | None = None
    offset: int | None = None


def make_elf(
    segments: list[Seg],
    entry: int | None = None,
    *,
    machine: int = EM_X86_64,
    e_type: int = ET_EXEC,
    data_encoding: int = ELFDATA2LSB,
    phnum: int | None = None,
    phentsize: int = ELF64_PHDR.size,
    section0_info: int | None = None,
) -> bytes:
    """An ELF64 executable with one program header per segment and data after the headers.

    `phnum` and `phentsize` override the header fields; `section0_info` appends a section
    header table of one entry whose sh_info is that number (where PN_XNUM sends a loader)."""
    phoff = ELF64_HEADER.size
    data_off = phoff + ELF64_PHDR.size * len(segments)
    phdrs = b""
    body = b""
    for seg in segments:
        offset = seg.offset if seg.offset is not None else data_off + len(body)
        filesz = seg.filesz if seg.filesz is not None else len(seg.data)
        memsz = seg.memsz if seg.memsz is not None else len(seg.data)
        phdrs += ELF64_PHDR.pack(seg.p_type, 7, offset, seg.paddr, seg.paddr, filesz, memsz, 0x1000)
        body += seg.data
    if entry is None:
        entry = segments[0].paddr if segments else 0
    ident = (b"\x7fELF", ELFCLASS64, data_encoding, 1, 0, 0)
    shoff = shnum = 0
    sections = b""
    if section0_info is not None:
        shoff, shnum = data_off + len(body), 1
        sections = ELF64_SHDR.pack(0, 0, 0, 0, 0, 0, 0, section0_info, 0, 0)
    header = ELF64_HEADER.pack(
        *ident, e_type, machine, 1, entry, phoff, shoff, 0, ELF64_HEADER.size, phentsize,
        len(segments) if phnum is None else phnum, ELF64_SHDR.size, shnum, 0,
    )  # fmt: skip
    return header + phdrs + body + sections


def make_elf32() -> bytes:
    ident = (b"\x7fELF", ELFCLASS32, ELFDATA2LSB, 1, 0, 0)
    return ELF32_HEADER.pack(*ident, ET_EXEC, EM_386, 1, 0x100000, 0, 0, 0, 52, 32, 0, 0, 0, 0)


@dataclass
class BzParams:
    version: int = 0x020F
    xloadflags: int = XLF_KERNEL_64
    setup_sects: int = 4
    pref_address: int = 16 * MiB
    init_size: int = 4 * MiB
    payload: bytes = field(default_factory=lambda: bytes(range(256)) * 64)
    syssize: int | None = None
    cmdline_size: int = 2047
    initrd_addr_max: int = 0x7FFF_FFFF
    header_end: int | None = None  # file offset one past the header; default: the whole struct
    trailer: bytes = b""


SETUP_HEADER_SIZE = ffi.sizeof("struct setup_header")
HEADER_END_BASE = SETUP_HEADER_OFFSET + ffi.offsetof("struct setup_header", "header")


def make_bzimage(p: BzParams | None = None) -> bytes:
    """A bzImage-shaped file: boot sector + setup sectors with a setup header, then the payload."""
    p = p or BzParams()
    end = p.header_end if p.header_end is not None else SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE
    hdr: Any = ffi.new("struct setup_header *")
    hdr.setup_sects = p.setup_sects
    hdr.syssize = p.syssize if p.syssize is not None else len(p.payload) // 16
    hdr.boot_flag = BOOT_FLAG_MAGIC
    hdr.jump = 0xEB | ((end - HEADER_END_BASE) << 8)
    hdr.header = HDRS_MAGIC
    hdr.version = p.version
    hdr.xloadflags = p.xloadflags
    hdr.cmdline_size = p.cmdline_size
    hdr.initrd_addr_max = p.initrd_addr_max
    hdr.pref_address = p.pref_address
    hdr.init_size = p.init_size
    setup = bytearray(((p.setup_sects or 4) + 1) * 512)
    setup[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE] = bytes(ffi.buffer(hdr))
    return bytes(setup) + p.payload + p.trailer


def write_image(tmp_path: Path, data: bytes, name: str = "image") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)
