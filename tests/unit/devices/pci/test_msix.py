"""MSI-X as a guest drives it: the capability, the vector table and PBA in the BAR, masking
and pending bits, and the routes handed to KVM through the callback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvmm.devices.pci.config import CapabilityId, PciConfigSpace, PciId, Reg, Status
from pyvmm.devices.pci.msix import (
    CONTROL_SIZE,
    TABLE_ENTRY_SIZE,
    CapReg,
    EntryField,
    MessageControl,
    Msix,
    MsixError,
)

BAR = 2
TABLE_OFFSET = 0x2000
PBA_OFFSET = 0x3000
VECTORS = 3
FIRST_GSI = 24
ADDRESS = 0xFEE0_1000
DATA = 0x4041


def entry(vector: int, field: EntryField = EntryField.ADDRESS_LO) -> int:
    """Offset of `field` of table entry `vector` in the table."""
    return TABLE_ENTRY_SIZE * vector + field


class Host:
    """The VMM's side: GSIs handed out, routes set, irqfds registered."""

    def __init__(self) -> None:
        self.next_gsi = FIRST_GSI
        self.routes: list[tuple[int, int, int]] = []
        self.irqfds: dict[int, int] = {}

    def allocate(self) -> int:
        self.next_gsi += 1
        return self.next_gsi - 1

    def set_route(self, gsi: int, address: int, data: int) -> None:
        self.routes.append((gsi, address, data))

    def register(self, fd: int, gsi: int) -> None:
        self.irqfds[gsi] = fd


class Function:
    def __init__(self, vectors: int = VECTORS) -> None:
        self.config = PciConfigSpace(PciId(0x1AF4, 0x1041, 0x020000))
        self.config.add_capability(CapabilityId.VENDOR, b"\x04\x00")  # MSI-X is not first
        self.host = Host()
        self.msix = Msix(
            self.config,
            vectors,
            BAR,
            TABLE_OFFSET,
            PBA_OFFSET,
            self.host.allocate,
            self.host.set_route,
            self.host.register,
        )

    def cfg_read(self, offset: int, size: int) -> int:
        buf = bytearray(size)
        self.config.read(offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def control(self) -> int:
        return self.cfg_read(self.msix.cap_offset + CapReg.MESSAGE_CONTROL, CONTROL_SIZE)

    def set_control(self, enable: bool, function_mask: bool = False) -> None:
        value = (MessageControl.ENABLE if enable else 0) | (
            MessageControl.FUNCTION_MASK if function_mask else 0
        )
        self.config.write(
            self.msix.cap_offset + CapReg.MESSAGE_CONTROL, value.to_bytes(CONTROL_SIZE, "little")
        )
        self.msix.control_written()

    def table_read(self, offset: int, size: int = 4) -> int:
        buf = bytearray(size)
        self.msix.table_read(offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        self.msix.table_write(offset, value.to_bytes(size, "little"))

    def program(self, vector: int, address: int, data: int) -> None:
        """What Linux's __pci_write_msi_msg does: address lo, hi, data with dword writes."""
        self.table_write(entry(vector, EntryField.ADDRESS_LO), 4, address & 0xFFFFFFFF)
        self.table_write(entry(vector, EntryField.ADDRESS_HI), 4, address >> 32)
        self.table_write(entry(vector, EntryField.DATA), 4, data)

    def unmask(self, vector: int) -> None:
        self.table_write(entry(vector, EntryField.VECTOR_CONTROL), 4, 0)

    def mask(self, vector: int) -> None:
        self.table_write(entry(vector, EntryField.VECTOR_CONTROL), 4, 1)

    def pba(self) -> int:
        buf = bytearray(8)
        self.msix.pba_read(0, memoryview(buf))
        return int.from_bytes(buf, "little")

    def fired(self, vector: int) -> int:
        """Interrupts delivered on `vector` since the last look (the irqfd counter)."""
        try:
            return os.eventfd_read(self.msix.eventfds[vector])
        except BlockingIOError:
            return 0


@pytest.fixture
def f() -> Iterator[Function]:
    fn = Function()
    yield fn
    fn.msix.close()


# --- the capability -----------------------------------------------------------------------------


def test_capability_describes_table_and_pba(f: Function) -> None:
    at = f.msix.cap_offset
    assert f.cfg_read(Reg.STATUS, 2) & Status.CAPABILITIES_LIST
    # Walk the list from 0x34 to find it, as the guest does.
    pos, ids = f.cfg_read(Reg.CAPABILITIES, 1), []
    while pos:
        ids.append((pos, f.cfg_read(pos, 1)))
        pos = f.cfg_read(pos + 1, 1)
    assert ids[-1] == (at, 0x11)
    assert f.control() == VECTORS - 1  # table size N-1, disabled, not masked
    assert f.cfg_read(at + CapReg.TABLE, 4) == TABLE_OFFSET | BAR
    assert f.cfg_read(at + CapReg.PBA, 4) == PBA_OFFSET | BAR
    assert (f.msix.table_size, f.msix.pba_size) == (TABLE_ENTRY_SIZE * VECTORS, 8)


def test_only_enable_and_function_mask_are_writable(f: Function) -> None:
    at = f.msix.cap_offset
    f.config.write(at + CapReg.MESSAGE_CONTROL, b"\xff\xff")
    assert f.control() == 0xC000 | (VECTORS - 1)
    f.config.write(at + CapReg.TABLE, b"\xff" * 8)
    assert f.cfg_read(at + CapReg.TABLE, 4) == TABLE_OFFSET | BAR
    assert f.cfg_read(at + CapReg.PBA, 4) == PBA_OFFSET | BAR
    f.config.write(at + CapReg.MESSAGE_CONTROL, b"\x00\x00")
    assert f.control() == VECTORS - 1
    assert not f.msix.enabled


def test_every_vector_gets_a_gsi_and_an_irqfd(f: Function) -> None:
    assert f.msix.gsis == [24, 25, 26]
    assert f.host.irqfds == dict(zip(f.msix.gsis, f.msix.eventfds, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_vectors": 0},
        {"num_vectors": 2049},
        {"table_offset": 0x2004},
        {"pba_offset": 0x3001},
    ],
)
def test_impossible_layouts_are_refused(kwargs: dict[str, int]) -> None:
    args = {"num_vectors": 1, "table_offset": TABLE_OFFSET, "pba_offset": PBA_OFFSET} | kwargs
    with pytest.raises(MsixError):
        Msix(
            PciConfigSpace(PciId(1, 2, 3)),
            args["num_vectors"],
            0,
            args["table_offset"],
            args["pba_offset"],
            lambda: 24,
            lambda g, a, d: None,
            lambda fd, g: None,
        )


def test_2048_vectors_fill_the_table_size_field() -> None:
    fn = Function(2048)
    try:
        assert fn.control() == 0x7FF
        assert fn.msix.pba_size == 256
    finally:
        fn.msix.close()


# --- the table ----------------------------------------------------------------------------------


def test_vectors_start_masked_and_zeroed(f: Function) -> None:
    for v in range(VECTORS):
        assert [f.table_read(entry(v, field)) for field in EntryField] == [0, 0, 0, 1]


def test_dword_table_writes_update_the_route(f: Function) -> None:
    f.program(1, 0x1_FEE0_0000 | 0x1000, DATA)
    assert f.host.routes[-1] == (25, 0x1_FEE0_1000, DATA)
    assert all(gsi == 25 for gsi, _, _ in f.host.routes)
    assert f.table_read(entry(1), 8) == 0x1_FEE0_1000
    assert f.table_read(entry(1, EntryField.DATA)) == DATA


def test_qword_table_writes_update_the_route(f: Function) -> None:
    f.table_write(entry(2), 8, ADDRESS)
    assert f.host.routes == [(26, ADDRESS, 0)]
    f.table_write(entry(2, EntryField.DATA), 8, 0 << 32 | DATA)  # data and vector control (unmasks)
    assert f.host.routes[-1] == (26, ADDRESS, DATA)
    assert f.table_read(entry(2, EntryField.VECTOR_CONTROL)) == 0


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 2), (8, 2), (12, 1), (0, 16)])
def test_other_widths_are_ignored(f: Function, offset: int, size: int) -> None:
    f.table_write(offset, size, (1 << (8 * size)) - 1)
    assert f.host.routes == []
    assert f.table_read(0, 16) == 1 << 96


def test_writes_past_the_table_are_ignored(f: Function) -> None:
    f.table_write(entry(VECTORS), 4, 0)
    f.table_write(entry(VECTORS) - 4, 8, 0)
    assert f.host.routes == []
    assert f.table_read(entry(VECTORS - 1, EntryField.VECTOR_CONTROL)) == 1  # still masked


def test_reads_past_the_table_or_pba_are_all_ones(f: Function) -> None:
    assert f.table_read(entry(VECTORS)) == 0xFFFF_FFFF
    assert f.table_read(entry(VECTORS) - 4, 8) == 0xFFFF_FFFF_FFFF_FFFF  # straddles the end
    buf = bytearray(8)
    f.msix.pba_read(8, memoryview(buf))
    assert buf == b"\xff" * 8


# --- delivery, masking, pending bits ------------------------------------------------------------


def test_unmasked_vector_of_an_enabled_function_fires_at_once(f: Function) -> None:
    f.program(0, ADDRESS, DATA)
    f.unmask(0)
    f.set_control(enable=True)
    f.msix.notify(0)
    f.msix.notify(0)
    assert f.fired(0) == 2
    assert f.pba() == 0
    assert [f.fired(v) for v in (1, 2)] == [0, 0]


def test_notify_on_a_masked_vector_sets_pba_and_fires_on_unmask(f: Function) -> None:
    f.set_control(enable=True)
    f.program(1, ADDRESS, DATA)
    f.msix.notify(1)
    assert f.fired(1) == 0
    assert f.pba() == 0b010
    f.unmask(1)
    assert f.fired(1) == 1
    assert f.pba() == 0
    f.mask(1)
    f.msix.notify(1)
    f.msix.notify(1)  # pending is a bit, not a count
    f.unmask(1)
    assert f.fired(1) == 1


def test_function_mask_holds_every_vector_pending(f: Function) -> None:
    for v in range(VECTORS):
        f.unmask(v)
    f.set_control(enable=True, function_mask=True)
    f.msix.notify(0)
    f.msix.notify(2)
    assert [f.fired(v) for v in range(VECTORS)] == [0, 0, 0]
    assert f.pba() == 0b101
    f.set_control(enable=True)
    assert [f.fired(v) for v in range(VECTORS)] == [1, 0, 1]
    assert f.pba() == 0


def test_function_mask_release_keeps_masked_vectors_pending(f: Function) -> None:
    f.unmask(0)
    f.set_control(enable=True, function_mask=True)
    f.msix.notify(0)
    f.msix.notify(1)  # vector 1 is also masked individually
    f.set_control(enable=True)
    assert (f.fired(0), f.fired(1)) == (1, 0)
    assert f.pba() == 0b010


def test_disabled_msix_leaves_interrupts_pending_until_enabled(f: Function) -> None:
    f.unmask(2)
    f.msix.notify(2)
    assert f.fired(2) == 0
    assert f.pba() == 0b100
    f.set_control(enable=True)
    assert f.fired(2) == 1
    assert f.pba() == 0


def test_out_of_range_vectors_are_ignored(f: Function) -> None:
    f.set_control(enable=True)
    for v in (VECTORS, 0xFFFF, -1):
        f.msix.notify(v)
    assert f.pba() == 0
    assert [f.fired(v) for v in range(VECTORS)] == [0, 0, 0]


def test_a_pending_bit_clears_only_when_delivered(f: Function) -> None:
    f.msix.notify(0)
    assert f.pba() == 1
    f.set_control(enable=True, function_mask=True)
    f.set_control(enable=False)
    assert f.pba() == 1
    f.set_control(enable=True)
    f.unmask(0)
    assert f.pba() == 0
    assert f.fired(0) == 1


def test_close_releases_the_eventfds() -> None:
    fn = Function(2)
    fds = list(fn.msix.eventfds)
    fn.msix.close()
    assert fn.msix.eventfds == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_vectors_irqfd_is_handed_out_only_while_it_can_be_delivered(f: Function) -> None:
    """vhost writes a vector's irqfd itself while the vector is deliverable; masking it (or the
    function, or MSI-X off) takes the irqfd back, and whoever holds it is told each time."""
    changes: list[int | None] = []
    f.msix.watch(lambda: changes.append(f.msix.direct_fd(1)))
    irqfd = f.msix.eventfds[1]
    assert f.msix.direct_fd(1) is None  # masked and MSI-X off at reset
    f.program(1, ADDRESS, DATA)
    f.unmask(1)
    f.set_control(enable=True)
    assert f.msix.direct_fd(1) == irqfd
    f.set_control(enable=True, function_mask=True)
    f.set_control(enable=True)
    f.mask(1)
    assert changes[-4:] == [irqfd, None, irqfd, None]
    assert f.msix.direct_fd(VECTORS) is None  # out of range
