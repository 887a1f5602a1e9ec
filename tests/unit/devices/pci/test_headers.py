"""PCI configuration registers, bits and the MSI-X layouts pyvmm declares match the system's
<linux/pci_regs.h>, which gives them as offsets and masks rather than structs."""

from __future__ import annotations

from pathlib import Path

from pyvmm.devices.pci import config, msix
from pyvmm.devices.pci.config import CapabilityId, CapHeader, Command, Reg, Status
from pyvmm.devices.pci.msix import CapReg, EntryField, MessageControl
from tests.cheaders import mismatches

HEADERS = ["linux/pci_regs.h"]
# pyvmm's names where they are not the header's.
REG = {
    Reg.CLASS_PROG: "PCI_CLASS_PROG",
    Reg.SUBCLASS: "PCI_CLASS_DEVICE",
    Reg.CLASS: "PCI_CLASS_DEVICE + 1",  # the header names the 16-bit class/subclass pair
    Reg.BAR0: "PCI_BASE_ADDRESS_0",
    Reg.CAPABILITIES: "PCI_CAPABILITY_LIST",
}
COMMAND = {
    Command.IO_SPACE: "PCI_COMMAND_IO",
    Command.MEMORY_SPACE: "PCI_COMMAND_MEMORY",
    Command.BUS_MASTER: "PCI_COMMAND_MASTER",
    Command.PARITY_ERROR_RESPONSE: "PCI_COMMAND_PARITY",
    Command.SERR: "PCI_COMMAND_SERR",
    Command.INTX_DISABLE: "PCI_COMMAND_INTX_DISABLE",
}
STATUS = {
    Status.INTERRUPT: "PCI_STATUS_INTERRUPT",
    Status.CAPABILITIES_LIST: "PCI_STATUS_CAP_LIST",
    Status.MASTER_DATA_PARITY_ERROR: "PCI_STATUS_PARITY",
    Status.SIGNALED_TARGET_ABORT: "PCI_STATUS_SIG_TARGET_ABORT",
    Status.RECEIVED_TARGET_ABORT: "PCI_STATUS_REC_TARGET_ABORT",
    Status.RECEIVED_MASTER_ABORT: "PCI_STATUS_REC_MASTER_ABORT",
    Status.SIGNALED_SYSTEM_ERROR: "PCI_STATUS_SIG_SYSTEM_ERROR",
    Status.DETECTED_PARITY_ERROR: "PCI_STATUS_DETECTED_PARITY",
}
CAPABILITY_ID = {CapabilityId.MSIX: "PCI_CAP_ID_MSIX", CapabilityId.VENDOR: "PCI_CAP_ID_VNDR"}
MESSAGE_CONTROL = {
    MessageControl.TABLE_SIZE_MASK: "PCI_MSIX_FLAGS_QSIZE",
    MessageControl.FUNCTION_MASK: "PCI_MSIX_FLAGS_MASKALL",
    MessageControl.ENABLE: "PCI_MSIX_FLAGS_ENABLE",
}
# The declared MSI-X capability's fields, by the header's offset macros.
MSIX_CAP_FIELD = {
    "cap_id": "PCI_CAP_LIST_ID",
    "cap_next": "PCI_CAP_LIST_NEXT",
    "flags": "PCI_MSIX_FLAGS",
    "table": "PCI_MSIX_TABLE",
    "pba": "PCI_MSIX_PBA",
}
CAP_REG = {CapReg.MESSAGE_CONTROL: "flags", CapReg.TABLE: "table", CapReg.PBA: "pba"}
ENTRY_FIELD = {
    EntryField.ADDRESS_LO: "lower_addr",
    EntryField.ADDRESS_HI: "upper_addr",
    EntryField.DATA: "data",
    EntryField.VECTOR_CONTROL: "vector_ctrl",
}


def config_constants() -> list[tuple[str, int]]:
    """(the header's expression, pyvmm's value) for config space registers and bits."""
    facts: list[tuple[str, int]] = []
    facts += [(REG.get(r, f"PCI_{r.name}"), r) for r in Reg]
    facts += [(COMMAND[c], c) for c in Command]
    facts += [(STATUS[s], s) for s in Status]
    facts += [(CAPABILITY_ID[c], c) for c in CapabilityId]
    facts += [(f"PCI_CAP_LIST_{h.name}", h) for h in CapHeader]
    facts += [
        ("PCI_CAP_FLAGS", config.CAP_HEADER_SIZE),
        ("PCI_CFG_SPACE_SIZE", config.CONFIG_SPACE_SIZE),
        ("PCI_STD_HEADER_SIZEOF", config.HEADER_SIZE),
        ("PCI_STD_NUM_BARS", config.NUM_BARS),
        ("PCI_BASE_ADDRESS_MEM_TYPE_64", config.BAR_MEMORY_64),
        ("PCI_BASE_ADDRESS_MEM_PREFETCH", config.BAR_PREFETCHABLE),
        ("~PCI_BASE_ADDRESS_MEM_MASK", config.BAR_FLAG_BITS),
    ]
    return facts


def msix_constants() -> list[tuple[str, int]]:
    """(the header's expression, pyvmm's value) for the MSI-X capability and table."""
    ffi = msix.ffi
    facts: list[tuple[str, int]] = []
    facts += [(macro, ffi.offsetof("struct msix_cap", f)) for f, macro in MSIX_CAP_FIELD.items()]
    facts += [("PCI_CAP_MSIX_SIZEOF", ffi.sizeof("struct msix_cap"))]
    facts += [
        (f"PCI_MSIX_ENTRY_{field.upper()}", ffi.offsetof("struct msix_table_entry", field))
        for field, _ in ffi.typeof("struct msix_table_entry").fields
    ]
    facts += [("PCI_MSIX_ENTRY_SIZE", ffi.sizeof("struct msix_table_entry"))]
    facts += [(MSIX_CAP_FIELD[CAP_REG[r]], r) for r in CapReg]
    facts += [(f"PCI_MSIX_ENTRY_{ENTRY_FIELD[f].upper()}", f) for f in EntryField]
    facts += [(MESSAGE_CONTROL[m], m) for m in MessageControl]
    facts += [
        ("PCI_MSIX_ENTRY_SIZE", msix.TABLE_ENTRY_SIZE),
        ("PCI_MSIX_FLAGS_QSIZE + 1", msix.MAX_VECTORS),
        ("PCI_MSIX_ENTRY_CTRL_MASKBIT", msix.VECTOR_MASKED),
        ("PCI_MSIX_TABLE_BIR", msix.BIR_MASK),
        ("PCI_MSIX_PBA_BIR", msix.BIR_MASK),
        ("sizeof(unsigned short)", msix.CONTROL_SIZE),  # PCI_MSIX_FLAGS is a 16-bit register
    ]
    return facts


def test_config_registers_and_bits_match_linux_headers(tmp_path: Path) -> None:
    facts = [(expr, int(value)) for expr, value in config_constants()]
    assert not mismatches(tmp_path, HEADERS, facts)


def test_msix_layouts_match_linux_headers(tmp_path: Path) -> None:
    facts = [(expr, int(value)) for expr, value in msix_constants()]
    assert not mismatches(tmp_path, HEADERS, facts)


def test_msix_fields_are_where_their_registers_are() -> None:
    """Each declared field is as wide as the gap to the next (no padding, nothing missed)."""
    ffi = msix.ffi
    for ctype in ("struct msix_cap", "struct msix_table_entry"):
        end = 0
        for _, info in ffi.typeof(ctype).fields:
            assert info.offset == end
            end += ffi.sizeof(info.type)
        assert end == ffi.sizeof(ctype)
