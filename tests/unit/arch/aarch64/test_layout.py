"""The arm64 guest-physical map: every MMIO region below RAM, none overlapping another."""

from __future__ import annotations

import itertools

from pyvmm.arch.aarch64 import layout

MiB = 1 << 20


def test_ram_is_one_range_from_2_gib() -> None:
    assert layout.ram_ranges(512 * MiB) == [(0x8000_0000, 512 * MiB)]


def test_mmio_regions_are_below_ram_and_apart() -> None:
    cpus = layout.MAX_GICV3_CPUS
    regions = sorted(
        [
            (layout.SERIAL_ADDR, layout.SERIAL_SIZE),
            (layout.RTC_ADDR, layout.RTC_SIZE),
            (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE),
            (layout.PCI_MMIO_START, layout.PCI_MMIO_END - layout.PCI_MMIO_START),
            (layout.GIC_REDIST_START, cpus * layout.GIC_REDIST_SIZE),
            (layout.GIC_DIST_START, layout.GIC_DIST_SIZE),
        ]
    )
    for (a, size), (b, _) in itertools.pairwise(regions):
        assert a + size <= b, f"{a:#x}+{size:#x} overlaps {b:#x}"
    assert regions[-1][0] + regions[-1][1] <= layout.RAM_START
    assert layout.GIC_REDIST_START >= layout.PCI_MMIO_END
    assert layout.GIC_CPU_START >= layout.PCI_MMIO_END
    assert layout.GIC_CPU_START + layout.GIC_CPU_SIZE == layout.GIC_DIST_START


def test_gic_regions_are_64_kib_aligned() -> None:
    for addr in (layout.GIC_DIST_START, layout.GIC_CPU_START, layout.GIC_REDIST_START):
        assert addr % 0x1_0000 == 0


def test_the_device_tree_takes_the_last_2_mib_aligned_2_mib_of_ram() -> None:
    assert layout.fdt_addr(0x8000_0000 + 512 * MiB) == 0x8000_0000 + 510 * MiB
    assert layout.fdt_addr(0x8000_0000 + 5 * MiB) == 0x8000_0000 + 2 * MiB
