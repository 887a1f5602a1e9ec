"""A function's configuration space as a guest sees it: read-only identity, writable command
bits, write-1-to-clear status, the BAR sizing probe and the capability list."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices.pci.config import (
    CONFIG_SPACE_SIZE,
    FIRST_CAPABILITY,
    CapabilityId,
    Command,
    InterruptPin,
    PciConfigError,
    PciConfigSpace,
    PciId,
    Reg,
    Status,
)

IDENT = PciId(
    vendor=0x1AF4,
    device=0x1042,
    class_code=0x018000,
    revision=1,
    subsystem_vendor=0x1AF4,
    subsystem=2,
)
BAR_SIZE = 0x4000


def make_space() -> PciConfigSpace:
    space = PciConfigSpace(IDENT, InterruptPin.INTA)
    space.add_bar64(0, BAR_SIZE)
    return space


def read(space: PciConfigSpace, offset: int, size: int) -> int:
    buf = bytearray(size)
    space.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def write(space: PciConfigSpace, offset: int, size: int, value: int) -> None:
    space.write(offset, value.to_bytes(size, "little"))


# --- identity and read-only fields --------------------------------------------------------------


def test_identity_reads_back() -> None:
    space = make_space()
    assert read(space, Reg.VENDOR_ID, 4) == 0x1042_1AF4
    assert read(space, Reg.REVISION_ID, 4) == 0x0180_0001  # class 01, subclass 80, prog-if 00
    assert read(space, Reg.SUBSYSTEM_VENDOR_ID, 4) == 0x0002_1AF4
    assert read(space, Reg.HEADER_TYPE, 1) == 0  # type 0, single function
    assert read(space, Reg.INTERRUPT_PIN, 1) == InterruptPin.INTA


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (Reg.VENDOR_ID, 4),
        (Reg.REVISION_ID, 4),
        (Reg.SUBSYSTEM_VENDOR_ID, 4),
        (Reg.CAPABILITIES, 1),
        (Reg.INTERRUPT_PIN, 1),
        (Reg.HEADER_TYPE, 1),
        (0x28, 4),  # CardBus CIS pointer
        (0x30, 4),  # expansion ROM BAR (not implemented)
    ],
)
def test_read_only_fields_ignore_writes(offset: int, size: int) -> None:
    space = make_space()
    space.add_capability(CapabilityId.VENDOR, b"\x04\x00")
    before = read(space, offset, size)
    write(space, offset, size, (1 << (8 * size)) - 1)
    write(space, offset, size, 0)
    assert read(space, offset, size) == before


def test_writable_scratch_registers_take_any_value() -> None:
    space = make_space()
    for reg in (Reg.CACHE_LINE_SIZE, Reg.LATENCY_TIMER, Reg.INTERRUPT_LINE):
        write(space, reg, 1, 0xA5)
        assert read(space, reg, 1) == 0xA5


# --- command and status ------------------------------------------------------------------------


def test_command_keeps_only_its_writable_bits() -> None:
    space = make_space()
    write(space, Reg.COMMAND, 2, 0xFFFF)
    expected = (
        Command.IO_SPACE
        | Command.MEMORY_SPACE
        | Command.BUS_MASTER
        | Command.PARITY_ERROR_RESPONSE
        | Command.SERR
        | Command.INTX_DISABLE
    )
    assert read(space, Reg.COMMAND, 2) == expected
    assert space.command == expected
    write(space, Reg.COMMAND, 2, Command.MEMORY_SPACE)
    assert read(space, Reg.COMMAND, 2) == Command.MEMORY_SPACE
    assert space.command == Command.MEMORY_SPACE


def test_status_error_bits_are_write_one_to_clear() -> None:
    space = make_space()
    space.add_capability(CapabilityId.VENDOR, b"\x04\x00")
    errors = Status.RECEIVED_MASTER_ABORT | Status.SIGNALED_SYSTEM_ERROR
    # The device latches two errors (hardware sets them; the guest cannot).
    status = read(space, Reg.STATUS, 2) | errors
    space.data[Reg.STATUS : Reg.STATUS + 2] = status.to_bytes(2, "little")

    write(space, Reg.STATUS, 2, 0)  # writing 0 clears nothing
    assert read(space, Reg.STATUS, 2) == status

    write(space, Reg.STATUS, 2, Status.RECEIVED_MASTER_ABORT)
    assert read(space, Reg.STATUS, 2) == Status.CAPABILITIES_LIST | Status.SIGNALED_SYSTEM_ERROR

    # Writing all ones clears every error bit but not the read-only capabilities bit.
    write(space, Reg.STATUS, 2, 0xFFFF)
    assert read(space, Reg.STATUS, 2) == Status.CAPABILITIES_LIST


def test_a_dword_read_modify_write_of_command_clears_latched_errors() -> None:
    # Linux writes command with a 16-bit access, but firmware often does a dword
    # read-modify-write of command+status, writing back status bits it read as 1.
    space = make_space()
    space.data[Reg.STATUS + 1] |= Status.DETECTED_PARITY_ERROR >> 8
    dword = read(space, Reg.COMMAND, 4)
    write(space, Reg.COMMAND, 4, (dword & 0xFFFF0000) | Command.MEMORY_SPACE)
    assert read(space, Reg.COMMAND, 2) == Command.MEMORY_SPACE
    # The read-modify-write cleared the latched error (W1C semantics, as on real hardware).
    assert not read(space, Reg.STATUS, 2) & Status.DETECTED_PARITY_ERROR


# --- BARs -------------------------------------------------------------------------------------


def probe_bar64(space: PciConfigSpace, index: int) -> tuple[int, int]:
    """Linux's __pci_read_base for a 64-bit BAR: (size, flags); restores the address."""
    lo_at, hi_at = Reg.BAR0 + 4 * index, Reg.BAR0 + 4 * index + 4
    command = read(space, Reg.COMMAND, 2)
    write(space, Reg.COMMAND, 2, command & ~Command.MEMORY_SPACE)
    lo, hi = read(space, lo_at, 4), read(space, hi_at, 4)
    write(space, lo_at, 4, 0xFFFFFFFF)
    write(space, hi_at, 4, 0xFFFFFFFF)
    sz_lo, sz_hi = read(space, lo_at, 4), read(space, hi_at, 4)
    write(space, lo_at, 4, lo)
    write(space, hi_at, 4, hi)
    write(space, Reg.COMMAND, 2, command)
    flags = sz_lo & 0xF
    mask = ((sz_hi << 32) | sz_lo) & ~0xF
    return (~mask + 1) & 0xFFFF_FFFF_FFFF_FFFF, flags


def test_bar_sizing_probe_reads_the_size_and_flags_and_restores() -> None:
    space = make_space()
    space.set_bar_address(0, 0xC000_0000)
    assert read(space, Reg.BAR0, 4) == 0xC000_0000 | 0b100  # 64-bit, memory, not prefetchable
    assert read(space, Reg.BAR0 + 4, 4) == 0

    write(space, Reg.BAR0, 4, 0xFFFFFFFF)
    write(space, Reg.BAR0 + 4, 4, 0xFFFFFFFF)
    assert read(space, Reg.BAR0, 4) == (~(BAR_SIZE - 1) & 0xFFFFFFF0) | 0b100
    assert read(space, Reg.BAR0 + 4, 4) == 0xFFFFFFFF
    write(space, Reg.BAR0, 4, 0xC000_0000)
    write(space, Reg.BAR0 + 4, 4, 0)
    assert space.bar_address(0) == 0xC000_0000

    assert probe_bar64(space, 0) == (BAR_SIZE, 0b100)
    assert space.bar_address(0) == 0xC000_0000
    assert read(space, Reg.BAR0, 4) == 0xC000_0000 | 0b100


@pytest.mark.parametrize("size", [16, 0x1000, 0x10_0000, 1 << 32, 1 << 34])
def test_bar_sizing_probe_finds_any_size(size: int) -> None:
    space = PciConfigSpace(IDENT)
    space.add_bar64(2, size, prefetchable=True)
    assert probe_bar64(space, 2) == (size, 0b1100)


def test_bar_address_is_forced_to_size_alignment() -> None:
    space = make_space()
    write(space, Reg.BAR0, 4, 0xC000_1234)
    write(space, Reg.BAR0 + 4, 4, 0x1)
    assert space.bar_address(0) == 0x1_C000_0000
    assert read(space, Reg.BAR0, 4) == 0xC000_0004  # low bits hard-wired; flag bits kept


def test_unimplemented_bars_read_zero_and_stay_zero() -> None:
    space = make_space()  # BAR0/1 only
    for offset in range(Reg.BAR0 + 8, Reg.BAR0 + 24, 4):
        write(space, offset, 4, 0xFFFFFFFF)
        assert read(space, offset, 4) == 0


@pytest.mark.parametrize(("index", "size"), [(5, 0x1000), (0, 8), (0, 0x1800)])
def test_impossible_bars_are_refused(index: int, size: int) -> None:
    with pytest.raises(PciConfigError):
        PciConfigSpace(IDENT).add_bar64(index, size)


def test_misaligned_bar_placement_is_refused() -> None:
    with pytest.raises(PciConfigError, match="not aligned"):
        make_space().set_bar_address(0, 0xC000_0800)


# --- capabilities -------------------------------------------------------------------------------


def walk_capabilities(space: PciConfigSpace) -> list[tuple[int, int]]:
    """(offset, id) of each capability, the way lspci walks them (with a loop guard)."""
    found: list[tuple[int, int]] = []
    if not read(space, Reg.STATUS, 2) & Status.CAPABILITIES_LIST:
        return found
    at = read(space, Reg.CAPABILITIES, 1) & ~3
    while at and len(found) < 48:
        assert FIRST_CAPABILITY <= at < CONFIG_SPACE_SIZE
        found.append((at, read(space, at, 1)))
        at = read(space, at + 1, 1) & ~3
    assert len(found) < 48, "capability list does not terminate"
    return found


def test_no_capabilities_means_no_list() -> None:
    space = make_space()
    assert not read(space, Reg.STATUS, 2) & Status.CAPABILITIES_LIST
    assert read(space, Reg.CAPABILITIES, 1) == 0


def test_capability_list_walk_finds_every_capability_and_ends() -> None:
    space = make_space()
    a = space.add_capability(CapabilityId.VENDOR, bytes([16]) + b"\x01" * 13)
    b = space.add_capability(CapabilityId.MSIX, b"\x00" * 10)
    c = space.add_capability(CapabilityId.VENDOR, bytes([3]))
    assert a == FIRST_CAPABILITY
    assert walk_capabilities(space) == [(a, 0x09), (b, 0x11), (c, 0x09)]
    assert all(offset % 4 == 0 for offset, _ in walk_capabilities(space))
    assert read(space, a + 2, 14) == int.from_bytes(bytes([16]) + b"\x01" * 13, "little")


def test_capability_bytes_are_read_only_unless_masked() -> None:
    space = make_space()
    at = space.add_capability(
        CapabilityId.VENDOR, b"\x10\x20\x30\x40", writable=b"\x00\xff\x0f\x00"
    )
    write(space, at, 4, 0xFFFFFFFF)  # id and next are read-only
    write(space, at + 2, 4, 0xFFFFFFFF)
    assert read(space, at, 2) == 0x0009
    assert read(space, at + 2, 4) == 0x403F_FF10


def test_capabilities_that_do_not_fit_are_refused() -> None:
    space = make_space()
    space.add_capability(CapabilityId.VENDOR, b"\x00" * 150)
    with pytest.raises(PciConfigError, match="no room"):
        space.add_capability(CapabilityId.VENDOR, b"\x00" * 80)
    with pytest.raises(PciConfigError, match="differ in length"):
        space.add_capability(CapabilityId.VENDOR, b"\x00" * 4, writable=b"\x00")


# --- access widths and bounds -------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [(0x100, 4), (0xFFF, 1), (0x200, 2), (0xFE, 4)])
def test_reads_past_256_bytes_are_all_ones(offset: int, size: int) -> None:
    space = make_space()
    buf = bytearray(size)
    space.read(offset, memoryview(buf))
    inside = max(CONFIG_SPACE_SIZE - offset, 0)
    assert buf[:inside] == space.data[offset:CONFIG_SPACE_SIZE]
    assert buf[inside:] == b"\xff" * (size - inside)


def test_writes_past_256_bytes_are_ignored() -> None:
    space = make_space()
    before = bytes(space.data)
    space.write(0xFE, b"\xff\xff\xff\xff")
    space.write(0x400, b"\xff\xff\xff\xff")
    assert bytes(space.data) == before  # 0xFE/0xFF are read-only


@given(offset=st.integers(0, CONFIG_SPACE_SIZE - 1), size=st.sampled_from([1, 2, 4]))
def test_any_width_at_any_offset_reads_the_same_bytes(offset: int, size: int) -> None:
    space = make_space()
    space.add_capability(CapabilityId.MSIX, b"\x01\x00" + struct.pack("<II", 0x2000, 0x3000))
    space.set_bar_address(0, 0xFEBF_C000)
    buf = bytearray(size)
    space.read(offset, memoryview(buf))
    whole = bytes(space.data) + b"\xff" * 4
    assert bytes(buf) == whole[offset : offset + size]


def test_byte_and_word_writes_land_where_aimed() -> None:
    space = make_space()
    write(space, Reg.INTERRUPT_LINE, 1, 0x0B)
    write(space, Reg.CACHE_LINE_SIZE, 2, 0x4010)  # cache line and latency timer
    write(space, Reg.COMMAND + 1, 1, 0x04)  # INTX_DISABLE lives in the high byte
    assert read(space, Reg.INTERRUPT_LINE, 2) == 0x010B  # pin unchanged
    assert read(space, Reg.CACHE_LINE_SIZE, 2) == 0x4010
    assert read(space, Reg.COMMAND, 2) == Command.INTX_DISABLE
    write(space, Reg.BAR0 + 2, 2, 0xFEBF)  # upper half of the low BAR dword
    assert space.bar_address(0) == 0xFEBF_0000
