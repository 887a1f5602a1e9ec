"""bzImage loader (Linux x86 boot protocol): the protected-mode kernel goes to its pref_address.

pyvmm enters the kernel at its 64-bit entry point, 0x200 past the load address, so it needs boot
protocol 2.12 or later with XLF_KERNEL_64 set. The setup header is handed back raw for the zero
page; the real-mode setup code is never run.
"""

from __future__ import annotations

from typing import Any

from pyvmm.loader import (
    KernelImage,
    LoadArea,
    check_kernel_ram,
    file_size,
    format_size,
    read_head,
    read_into_guest,
)
from pyvmm.loader.bootparams import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    ffi,
)
from pyvmm.loader.errors import (
    BzImageHeaderError,
    BzImageProtocolError,
    KernelFileError,
    KernelOutsideRamError,
    KernelTruncatedError,
)
from pyvmm.memory import GuestMemory

SECTOR_SIZE = 512
# setup_sects == 0 means 4, for compatibility with ancient kernels.
DEFAULT_SETUP_SECTS = 4
# syssize counts 16-byte paragraphs.
SYSSIZE_UNIT = 16
# The 64-bit entry point is this far into the protected-mode kernel.
ENTRY_64_OFFSET = 0x200
# Boot protocol 2.12: xloadflags (and with it XLF_KERNEL_64) exists.
MIN_PROTOCOL = 0x020C

_HEADER_SIZE = ffi.sizeof("struct setup_header")
# The header's "jump" field is a short jmp whose displacement byte (the field's high byte) points
# at the end of the header, counted from the "header" ("HdrS") field that follows it.
_HEADER_END_BASE = SETUP_HEADER_OFFSET + ffi.offsetof("struct setup_header", "header")
# The header must reach at least the last field pyvmm reads (init_size, protocol 2.10)...
_HEADER_MIN_END = (
    SETUP_HEADER_OFFSET + ffi.offsetof("struct setup_header", "init_size") + ffi.sizeof("uint32_t")
)
# ...and may not spill past its place in the zero page.
_HEADER_MAX_END = ffi.offsetof("struct boot_params", "edd_mbr_sig_buffer")


def protocol_str(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def _parse_header(head: bytes) -> Any:
    """The setup header in `head` (the file's first bytes) as a cffi struct; missing bytes are 0."""
    buf = ffi.new("struct setup_header *")
    raw = head[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + _HEADER_SIZE]
    ffi.memmove(buf, raw, len(raw))
    return buf


def is_bzimage(head: bytes) -> bool:
    """Whether the file starting with `head` has the bzImage boot sector and setup header magic."""
    if len(head) <= _HEADER_END_BASE:
        return False
    hdr = _parse_header(head)
    return bool(hdr.boot_flag == BOOT_FLAG_MAGIC and hdr.header == HDRS_MAGIC)


def load_bzimage(mem: GuestMemory, fd: int, path: str, area: LoadArea) -> KernelImage:
    """Load the bzImage open on `fd` (named `path` in errors) into `mem`."""
    label = f"kernel {path}"
    size = file_size(fd, label, KernelFileError)
    head = read_head(fd, SETUP_HEADER_OFFSET + _HEADER_SIZE, label, KernelFileError)
    hdr = _parse_header(head)
    version = int(hdr.version)
    if version < MIN_PROTOCOL:
        raise BzImageProtocolError(
            f"{label}: bzImage boot protocol {protocol_str(version)} lacks the 64-bit entry point "
            f"(pyvmm needs {protocol_str(MIN_PROTOCOL)} or later with XLF_KERNEL_64)"
        )
    header_end = _HEADER_END_BASE + (int(hdr.jump) >> 8)
    if not _HEADER_MIN_END <= header_end <= _HEADER_MAX_END:
        raise BzImageHeaderError(
            f"{label}: setup header ends at {header_end:#x} (jump byte at {_HEADER_END_BASE - 1:#x}"
            f"); boot protocol {protocol_str(version)} expects an end in "
            f"[{_HEADER_MIN_END:#x}, {_HEADER_MAX_END:#x}]"
        )
    if len(head) < header_end:
        raise KernelTruncatedError(
            f"{label}: truncated bzImage: the setup header ends at {header_end:#x}, "
            f"the file has {size:#x} bytes"
        )
    # Fields past the end the kernel declares are not part of its header: treat them as 0.
    hdr = _parse_header(head[:header_end])
    xloadflags = int(hdr.xloadflags)
    if not xloadflags & XLF_KERNEL_64:
        raise BzImageProtocolError(
            f"{label}: bzImage (boot protocol {protocol_str(version)}) lacks the 64-bit entry "
            f"point: XLF_KERNEL_64 is clear in xloadflags {xloadflags:#x} (a 32-bit kernel?)"
        )
    setup_sects = int(hdr.setup_sects) or DEFAULT_SETUP_SECTS
    payload_offset = (setup_sects + 1) * SECTOR_SIZE
    syssize = int(hdr.syssize) * SYSSIZE_UNIT
    if syssize == 0:
        raise BzImageHeaderError(
            f"{label}: setup header syssize is 0; expected the protected-mode kernel size"
        )
    if size < payload_offset + syssize:
        raise KernelTruncatedError(
            f"{label}: truncated bzImage: setup_sects {setup_sects} and syssize {hdr.syssize:#x} "
            f"need {payload_offset + syssize:#x} bytes, the file has {size:#x}"
        )
    # Everything after the setup code is loaded: a signed image has its signature appended, and
    # syssize may round the payload down to a whole paragraph.
    payload_size = size - payload_offset
    load_addr = int(hdr.pref_address)
    if load_addr < area.floor:
        raise KernelOutsideRamError(
            f"{label}: bzImage pref_address {load_addr:#x} is below {format_size(area.floor)} "
            f"({area.floor:#x}), where pyvmm keeps {area.below_floor}"
        )
    load_end = load_addr + max(int(hdr.init_size), payload_size)
    check_kernel_ram(
        mem, area, load_addr, load_end, label, "bzImage load range (pref_address + init_size)"
    )
    got = read_into_guest(fd, mem, load_addr, payload_size, payload_offset, label, KernelFileError)
    if got != payload_size:
        raise KernelTruncatedError(
            f"{label}: truncated bzImage: expected {payload_size:#x} bytes of kernel after "
            f"offset {payload_offset:#x}, read {got:#x} (did the file change?)"
        )
    return KernelImage(
        entry=load_addr + ENTRY_64_OFFSET,
        load_start=load_addr,
        load_end=load_end,
        setup_header=bytes(head[SETUP_HEADER_OFFSET:header_end]),
        cmdline_max=int(hdr.cmdline_size),
        initrd_addr_max=int(hdr.initrd_addr_max),
        kind="bzImage",
    )
