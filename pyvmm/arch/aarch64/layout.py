"""Where things live in arm64 guest-physical memory, laid out as crosvm lays out its arm64 VMs.

Below 2 GiB is MMIO: the serial port, the PL031 RTC, PCI configuration space (ECAM), the BAR
window, and the GIC at the top (distributor just below 1 GiB, the GICv2 CPU interface or the
GICv3 redistributors below it). RAM starts at 2 GiB and runs on in one piece: arm64 has no hole
to skip. The kernel goes at the start of RAM, the device tree at its top, the initrd below that.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# The 16550 on MMIO, at the address COM1 has on a PC (so earlycon=uart8250,mmio,0x3f8 as on
# crosvm), and the PL031 at page 2.
SERIAL_ADDR = 0x3F8
SERIAL_SIZE = 8
RTC_ADDR = 0x2000
RTC_SIZE = 0x1000

# PCI configuration space by ECAM: bus 0 only, 1 MiB (32 devices x 8 functions x 4 KiB).
PCI_ECAM_START = 0x1_0000
PCI_ECAM_BUSES = 1
PCI_ECAM_SIZE = PCI_ECAM_BUSES * MiB

# Where BARs go: from 32 MiB up to the GIC's 64 MiB (32-bit memory space; no I/O space).
PCI_MMIO_START = 0x0200_0000
GIC_REGION_START = 0x3C00_0000
PCI_MMIO_END = GIC_REGION_START

# The GIC: distributor (64 KiB) right below 1 GiB, and either a GICv2's CPU interface (128 KiB)
# right below that, or a GICv3's redistributors (128 KiB per vCPU) from the region's start up,
# at an address that does not depend on the vCPU count (the vGIC is made before the vCPUs).
GIC_DIST_SIZE = 0x1_0000
GIC_DIST_START = 0x4000_0000 - GIC_DIST_SIZE
GIC_CPU_SIZE = 0x2_0000
GIC_CPU_START = GIC_DIST_START - GIC_CPU_SIZE
GIC_REDIST_START = GIC_REGION_START
GIC_REDIST_SIZE = 0x2_0000  # per vCPU
MAX_GICV3_CPUS = (GIC_DIST_START - GIC_REDIST_START) // GIC_REDIST_SIZE

RAM_START = 0x8000_0000
# The device tree blob: at most 2 MiB, on a 2 MiB boundary (booting.rst), at the top of RAM.
FDT_MAX_SIZE = 2 * MiB
FDT_ALIGN = 2 * MiB


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (address, size) ranges: one, from RAM_START."""
    return [(RAM_START, mem_size)]


def fdt_addr(ram_end: int) -> int:
    """Where the device tree goes: the last 2 MiB-aligned 2 MiB of RAM."""
    return (ram_end - FDT_MAX_SIZE) & ~(FDT_ALIGN - 1)
