"""The Intel MultiProcessor Specification 1.4 table: how a guest learns its CPUs and IOAPIC.

The floating pointer and configuration table go in the EBDA, which e820 reports reserved.
Structures are declared with cffi (packed, as the specification lays them out).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from pyvmm.arch.interface import MachineError
from pyvmm.arch.x86_64.layout import APIC_START, EBDA_START, IOAPIC_START, LOW_RAM_END
from pyvmm.cdecl import declare
from pyvmm.memory import GuestMemory

ffi: Any = declare(
    "mptable",
    """
    struct mpf_intel {
        char     signature[4];
        uint32_t physptr;
        uint8_t  length;
        uint8_t  specification;
        uint8_t  checksum;
        uint8_t  feature1, feature2, feature3, feature4, feature5;
    };
    struct mpc_table {
        char     signature[4];
        uint16_t length;
        uint8_t  spec;
        uint8_t  checksum;
        char     oem[8];
        char     productid[12];
        uint32_t oemptr;
        uint16_t oemsize;
        uint16_t oemcount;
        uint32_t lapic;
        uint32_t reserved;
    };
    struct mpc_cpu {
        uint8_t  type;
        uint8_t  apicid;
        uint8_t  apicver;
        uint8_t  cpuflag;
        uint32_t cpufeature;
        uint32_t featureflag;
        uint32_t reserved[2];
    };
    struct mpc_bus {
        uint8_t type;
        uint8_t busid;
        char    bustype[6];
    };
    struct mpc_ioapic {
        uint8_t  type;
        uint8_t  apicid;
        uint8_t  apicver;
        uint8_t  flags;
        uint32_t apicaddr;
    };
    struct mpc_intsrc {
        uint8_t  type;
        uint8_t  irqtype;
        uint16_t irqflag;
        uint8_t  srcbus;
        uint8_t  srcbusirq;
        uint8_t  dstapic;
        uint8_t  dstirq;
    };
    struct mpc_lintsrc {
        uint8_t  type;
        uint8_t  irqtype;
        uint16_t irqflag;
        uint8_t  srcbusid;
        uint8_t  srcbusirq;
        uint8_t  destapic;
        uint8_t  destapiclint;
    };
    """,
    packed=True,
)

MP_SPEC_REV = 4  # version 1.4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
ISA_IRQS = 16
PCI_BUS_ID = 0  # MP bus IDs of PCI buses are their bus numbers
ISA_BUS_ID = 1
PCI_INTA = 0
# PCI interrupts are active-low (polarity 0b11) and level-triggered (trigger 0b11 << 2).
PCI_IRQ_FLAGS = 0x0F
# Room kept in the EBDA for PCI interrupt entries when counting how many CPUs fit.
MAX_PCI_IRQS = 16
BROADCAST_APIC_ID = 0xFF
CPU_FEATURE_STEPPING = 0x600  # family 6, as firmware on KVM reports it
CPU_FEATURE_FLAGS = (1 << 0) | (1 << 9)  # FPU, on-chip APIC


class EntryType(enum.IntEnum):
    PROCESSOR = 0
    BUS = 1
    IOAPIC = 2
    INTSRC = 3
    LINTSRC = 4


class CpuFlag(enum.IntFlag):
    ENABLED = 1
    BOOT_PROCESSOR = 2


class IrqType(enum.IntEnum):
    INT = 0
    NMI = 1
    EXTINT = 3


class MpTableError(MachineError):
    """The MP table cannot describe this machine."""


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _entry(ctype: str, **fields: object) -> bytes:
    e: Any = ffi.new(f"{ctype} *")
    for name, value in fields.items():
        setattr(e, name, value)
    return bytes(ffi.buffer(e))


def ioapic_id(num_cpus: int) -> int:
    return num_cpus + 1


def build_mptable(
    num_cpus: int, pci_irqs: Sequence[tuple[int, int]] = (), base: int = EBDA_START
) -> bytes:
    """The floating pointer and configuration table, to be placed at `base`. `pci_irqs` lists
    (slot, IOAPIC pin) for each PCI device's INTA#."""
    if not 1 <= num_cpus <= max_cpus():
        raise MpTableError(f"the MP table in the EBDA describes 1 to {max_cpus()} CPUs")
    if len(pci_irqs) > MAX_PCI_IRQS:
        raise MpTableError(f"the MP table has room for {MAX_PCI_IRQS} PCI interrupts")
    entries: list[bytes] = []
    for cpu in range(num_cpus):
        flags = CpuFlag.ENABLED | (CpuFlag.BOOT_PROCESSOR if cpu == 0 else 0)
        entries.append(
            _entry(
                "struct mpc_cpu",
                type=EntryType.PROCESSOR,
                apicid=cpu,
                apicver=APIC_VERSION,
                cpuflag=int(flags),
                cpufeature=CPU_FEATURE_STEPPING,
                featureflag=CPU_FEATURE_FLAGS,
            )
        )
    entries.append(
        _entry("struct mpc_bus", type=EntryType.BUS, busid=PCI_BUS_ID, bustype=b"PCI   ")
    )
    entries.append(
        _entry("struct mpc_bus", type=EntryType.BUS, busid=ISA_BUS_ID, bustype=b"ISA   ")
    )
    entries.append(
        _entry(
            "struct mpc_ioapic",
            type=EntryType.IOAPIC,
            apicid=ioapic_id(num_cpus),
            apicver=IOAPIC_VERSION,
            flags=1,
            apicaddr=IOAPIC_START,
        )
    )
    for irq in range(ISA_IRQS):
        entries.append(
            _entry(
                "struct mpc_intsrc",
                type=EntryType.INTSRC,
                irqtype=IrqType.INT,
                irqflag=0,
                srcbus=ISA_BUS_ID,
                srcbusirq=irq,
                dstapic=ioapic_id(num_cpus),
                dstirq=irq,
            )
        )
    for slot, gsi in pci_irqs:
        entries.append(
            _entry(
                "struct mpc_intsrc",
                type=EntryType.INTSRC,
                irqtype=IrqType.INT,
                irqflag=PCI_IRQ_FLAGS,
                srcbus=PCI_BUS_ID,
                srcbusirq=(slot << 2) | PCI_INTA,
                dstapic=ioapic_id(num_cpus),
                dstirq=gsi,
            )
        )
    for lint, irqtype in ((0, IrqType.EXTINT), (1, IrqType.NMI)):
        entries.append(
            _entry(
                "struct mpc_lintsrc",
                type=EntryType.LINTSRC,
                irqtype=irqtype,
                irqflag=0,
                srcbusid=0,
                srcbusirq=0,
                destapic=BROADCAST_APIC_ID,
                destapiclint=lint,
            )
        )
    body = b"".join(entries)
    mpf_size = ffi.sizeof("struct mpf_intel")
    table_addr = base + mpf_size
    header: Any = ffi.new("struct mpc_table *")
    header.signature = b"PCMP"
    header.length = ffi.sizeof("struct mpc_table") + len(body)
    header.spec = MP_SPEC_REV
    header.oem = b"PYVMM   "
    header.productid = b"PYVMM 0.1   "
    header.lapic = APIC_START
    header.oemcount = len(entries)
    header.checksum = _checksum(bytes(ffi.buffer(header)) + body)
    table = bytes(ffi.buffer(header)) + body

    mpf: Any = ffi.new("struct mpf_intel *")
    mpf.signature = b"_MP_"
    mpf.physptr = table_addr
    mpf.length = 1  # in 16-byte units
    mpf.specification = MP_SPEC_REV
    mpf.checksum = _checksum(bytes(ffi.buffer(mpf)))
    result = bytes(ffi.buffer(mpf)) + table
    if base + len(result) > LOW_RAM_END:
        raise MpTableError(f"the MP table for {num_cpus} CPUs does not fit in the EBDA")
    return result


def write_mptable(
    mem: GuestMemory, num_cpus: int, pci_irqs: Sequence[tuple[int, int]] = ()
) -> None:
    mem.write(EBDA_START, build_mptable(num_cpus, pci_irqs))


def max_cpus() -> int:
    """The most CPUs whose MP table still fits in the EBDA."""
    fixed: int = sum(
        ffi.sizeof(t) for t in ("struct mpf_intel", "struct mpc_table", "struct mpc_ioapic")
    )
    fixed += 2 * ffi.sizeof("struct mpc_bus")
    fixed += (ISA_IRQS + MAX_PCI_IRQS) * ffi.sizeof("struct mpc_intsrc")
    fixed += 2 * ffi.sizeof("struct mpc_lintsrc")
    cpu_entry: int = ffi.sizeof("struct mpc_cpu")
    return (LOW_RAM_END - EBDA_START - fixed) // cpu_entry
