"""The flattened device tree that describes pyvmm's arm64 machine to the guest, built with
libfdt (pylibfdt), as crosvm builds its own with libfdt.

Bindings followed (Linux's Documentation/devicetree/bindings): memory and cpus (enable-method
"psci"), arm/psci (0.2, hvc), interrupt-controller/arm,gic-v3 and arm,gic (GICv2), timer/
arm,arch_timer, serial/8250 ("ns16550a"), rtc/arm,pl031 (an AMBA primecell with its clock),
pci/host-generic-pci ("pci-host-ecam-generic", with an interrupt-map routing each slot's INTA#
to its SPI), and chosen (bootargs, initrd, stdout-path, and PCI probe-only: the BARs stay where
pyvmm put them). Interrupts are GIC specifiers of three cells: SPI or PPI, the number within
that kind, and the trigger flags.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import libfdt

from pyvmm.arch.aarch64 import layout

PHANDLE_GIC = 1
PHANDLE_CLOCK = 2
# The GIC node's #address-cells: the parent unit address cells of an interrupt-map entry.
GIC_ADDRESS_CELLS = 2
# A 1.8432 MHz crystal, as PC UARTs have (and crosvm gives its arm64 16550).
SERIAL_CLOCK_HZ = 1_843_200
# The PL031's bus clock (apb_pclk): any fixed rate does; the RTC counts seconds regardless.
RTC_PCLK_HZ = 24_000_000
# The architected timer's PPIs: secure and non-secure physical, virtual, hypervisor.
TIMER_PPIS = (13, 14, 11, 10)
PCI_DEVICE_SHIFT = 11  # the device number's place in the first cell of a PCI unit address
PCI_SPACE_MEM32 = 0x0200_0000  # phys.hi: 32-bit memory space
INTX_PIN_A = 1


class IrqKind(enum.IntEnum):
    SPI = 0
    PPI = 1


class IrqFlags(enum.IntFlag):
    """Trigger type of a GIC interrupt specifier (include/dt-bindings/interrupt-controller)."""

    EDGE_RISING = 1
    LEVEL_HIGH = 4
    LEVEL_LOW = 8


PPI_CPU_MASK_SHIFT = 8  # GICv2 only: which CPUs a PPI goes to


@dataclass(frozen=True)
class Machine:
    """What the device tree says: the RAM, the vCPUs, the GIC, the guest's boot arguments and
    which SPI each PCI slot's INTA# is."""

    ram: tuple[int, int]
    cpus: int
    cmdline: str
    gic_version: int = 3
    initrd: tuple[int, int] | None = None
    pci_irqs: Sequence[tuple[int, int]] = field(default_factory=list)
    """(PCI slot, SPI) of each device with an INTx line."""
    serial_spi: int = 0
    rtc_spi: int = 1


def cells(*values: int) -> bytes:
    """Big-endian 32-bit cells."""
    return struct.pack(f">{len(values)}I", *values)


def cells64(*values: int) -> bytes:
    """Each value as two cells (#address-cells or #size-cells of 2)."""
    return b"".join(cells(v >> 32, v & 0xFFFF_FFFF) for v in values)


def strings(*values: str) -> bytes:
    """A string list property."""
    return b"".join(v.encode() + b"\0" for v in values)


def irq(kind: IrqKind, number: int, flags: int) -> tuple[int, int, int]:
    return (kind, number, flags)


def mpidr(vcpu_id: int) -> int:
    """The affinity KVM gives a vCPU at reset (MPIDR_EL1 Aff0-Aff2): 16 per cluster."""
    return (vcpu_id & 0xF) | ((vcpu_id >> 4) & 0xFF) << 8 | ((vcpu_id >> 12) & 0xFF) << 16


def serial_node_path() -> str:
    return f"/serial@{layout.SERIAL_ADDR:x}"


def build(m: Machine) -> bytes:
    """The device tree blob for machine `m`."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    with sw.add_node(""):
        sw.property_string("compatible", "linux,dummy-virt")
        sw.property_string("model", "pyvmm")
        sw.property_u32("#address-cells", 2)
        sw.property_u32("#size-cells", 2)
        sw.property_u32("interrupt-parent", PHANDLE_GIC)
        _chosen(sw, m)
        _memory(sw, m)
        _cpus(sw, m)
        _psci(sw)
        _gic(sw, m)
        _timer(sw, m)
        _clock(sw)
        _serial(sw, m)
        _rtc(sw, m)
        _pci(sw, m)
    tree = sw.as_fdt()
    tree.pack()  # to its own size: the sequential writer's buffer has room to spare
    blob = tree.as_bytearray()
    if len(blob) > layout.FDT_MAX_SIZE:
        raise ValueError(f"the device tree is {len(blob)} bytes, over {layout.FDT_MAX_SIZE}")
    return bytes(blob)


def properties(blob: bytes) -> dict[str, bytes]:
    """Every property of the tree `blob`, by its path (`/chosen/bootargs`), with its value: the
    form in which Linux shows the tree it was given (/sys/firmware/devicetree/base)."""
    tree = libfdt.Fdt(blob)
    found: dict[str, bytes] = {}

    def visit(node: int, path: str) -> None:
        prop = tree.first_property_offset(node, libfdt.QUIET_NOTFOUND)
        while prop >= 0:
            value = tree.get_property_by_offset(prop)
            found[f"{path}/{value.name}"] = bytes(value)
            prop = tree.next_property_offset(prop, libfdt.QUIET_NOTFOUND)
        child = tree.first_subnode(node, libfdt.QUIET_NOTFOUND)
        while child >= 0:
            visit(child, f"{path}/{tree.get_name(child)}")
            child = tree.next_subnode(child, libfdt.QUIET_NOTFOUND)

    visit(0, "")
    return found


def _chosen(sw: libfdt.FdtSw, m: Machine) -> None:
    with sw.add_node("chosen"):
        sw.property_string("bootargs", m.cmdline)
        # pyvmm places every BAR, as firmware would: Linux keeps them where they are.
        sw.property_u32("linux,pci-probe-only", 1)
        sw.property_string("stdout-path", serial_node_path())
        if m.initrd is not None:
            start, size = m.initrd
            sw.property_u64("linux,initrd-start", start)
            sw.property_u64("linux,initrd-end", start + size)


def _memory(sw: libfdt.FdtSw, m: Machine) -> None:
    addr, size = m.ram
    with sw.add_node(f"memory@{addr:x}"):
        sw.property_string("device_type", "memory")
        sw.property("reg", cells64(addr, size))


def _cpus(sw: libfdt.FdtSw, m: Machine) -> None:
    with sw.add_node("cpus"):
        sw.property_u32("#address-cells", 1)
        sw.property_u32("#size-cells", 0)
        for vcpu in range(m.cpus):
            reg = mpidr(vcpu)
            with sw.add_node(f"cpu@{reg:x}"):
                sw.property_string("device_type", "cpu")
                sw.property_string("compatible", "arm,armv8")
                sw.property_string("enable-method", "psci")
                sw.property_u32("reg", reg)


def _psci(sw: libfdt.FdtSw) -> None:
    with sw.add_node("psci"):
        sw.property_string("compatible", "arm,psci-0.2")
        sw.property_string("method", "hvc")


def _gic(sw: libfdt.FdtSw, m: Machine) -> None:
    with sw.add_node(f"intc@{layout.GIC_DIST_START:x}"):
        if m.gic_version == 3:
            sw.property_string("compatible", "arm,gic-v3")
            second = (layout.GIC_REDIST_START, m.cpus * layout.GIC_REDIST_SIZE)
        else:
            sw.property_string("compatible", "arm,cortex-a15-gic")
            second = (layout.GIC_CPU_START, layout.GIC_CPU_SIZE)
        sw.property("reg", cells64(layout.GIC_DIST_START, layout.GIC_DIST_SIZE, *second))
        sw.property_u32("#interrupt-cells", 3)
        sw.property("interrupt-controller", b"")
        sw.property_u32("#address-cells", GIC_ADDRESS_CELLS)
        sw.property_u32("#size-cells", 2)
        sw.property("ranges", b"")
        sw.property_u32("phandle", PHANDLE_GIC)


def _timer(sw: libfdt.FdtSw, m: Machine) -> None:
    flags = int(IrqFlags.LEVEL_LOW)
    if m.gic_version == 2:
        flags |= ((1 << m.cpus) - 1) << PPI_CPU_MASK_SHIFT & 0xFF00
    specs = [irq(IrqKind.PPI, ppi, flags) for ppi in TIMER_PPIS]
    with sw.add_node("timer"):
        sw.property_string("compatible", "arm,armv8-timer")
        sw.property("interrupts", cells(*(c for spec in specs for c in spec)))
        sw.property("always-on", b"")


def _clock(sw: libfdt.FdtSw) -> None:
    with sw.add_node("apb-pclk"):
        sw.property_string("compatible", "fixed-clock")
        sw.property_u32("#clock-cells", 0)
        sw.property_u32("clock-frequency", RTC_PCLK_HZ)
        sw.property_string("clock-output-names", "apb_pclk")
        sw.property_u32("phandle", PHANDLE_CLOCK)


def _serial(sw: libfdt.FdtSw, m: Machine) -> None:
    # Edge-triggered: the 16550's irqfd is an edge (a pulse), which a level SPI would lose.
    with sw.add_node(serial_node_path()[1:]):
        sw.property_string("compatible", "ns16550a")
        sw.property("reg", cells64(layout.SERIAL_ADDR, layout.SERIAL_SIZE))
        sw.property_u32("clock-frequency", SERIAL_CLOCK_HZ)
        sw.property("interrupts", cells(*irq(IrqKind.SPI, m.serial_spi, IrqFlags.EDGE_RISING)))


def _rtc(sw: libfdt.FdtSw, m: Machine) -> None:
    with sw.add_node(f"rtc@{layout.RTC_ADDR:x}"):
        sw.property("compatible", strings("arm,pl031", "arm,primecell"))
        sw.property("reg", cells64(layout.RTC_ADDR, layout.RTC_SIZE))
        sw.property("interrupts", cells(*irq(IrqKind.SPI, m.rtc_spi, IrqFlags.LEVEL_HIGH)))
        sw.property_u32("clocks", PHANDLE_CLOCK)
        sw.property_string("clock-names", "apb_pclk")


def _pci(sw: libfdt.FdtSw, m: Machine) -> None:
    mmio_size = layout.PCI_MMIO_END - layout.PCI_MMIO_START
    interrupt_map = b""
    for slot, spi in m.pci_irqs:
        interrupt_map += cells(
            slot << PCI_DEVICE_SHIFT, 0, 0, INTX_PIN_A,  # child: unit address, INTx pin
            PHANDLE_GIC, *([0] * GIC_ADDRESS_CELLS),  # parent and its unit address
            *irq(IrqKind.SPI, spi, IrqFlags.LEVEL_HIGH),
        )  # fmt: skip
    with sw.add_node(f"pci@{layout.PCI_ECAM_START:x}"):
        sw.property_string("compatible", "pci-host-ecam-generic")
        sw.property_string("device_type", "pci")
        sw.property("reg", cells64(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE))
        sw.property("bus-range", cells(0, layout.PCI_ECAM_BUSES - 1))
        sw.property_u32("#address-cells", 3)
        sw.property_u32("#size-cells", 2)
        # BARs: 32-bit memory space, PCI addresses equal to CPU addresses.
        sw.property(
            "ranges",
            cells(PCI_SPACE_MEM32)
            + cells64(layout.PCI_MMIO_START, layout.PCI_MMIO_START, mmio_size),
        )
        sw.property_u32("#interrupt-cells", 1)
        sw.property("interrupt-map", interrupt_map)
        sw.property("interrupt-map-mask", cells(0x1F << PCI_DEVICE_SHIFT, 0, 0, 7))
        sw.property("dma-coherent", b"")
