"""The arm64 device tree: dtc reads it without a warning, and each node says what the machine
is (read back with libfdt)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import libfdt
import pytest

from pyvmm.arch.aarch64 import fdt, layout
from pyvmm.arch.aarch64.fdt import Machine

MiB = 1 << 20
RAM = (layout.RAM_START, 512 * MiB)
TWO_CPUS = Machine(
    ram=RAM,
    cpus=2,
    cmdline="console=ttyS0 panic=1 root=/dev/vda ro",
    initrd=(0x9C00_0000, 0x12345),
    pci_irqs=[(1, 4), (2, 5), (3, 6)],
)


def _read(m: Machine) -> libfdt.Fdt:
    return libfdt.Fdt(fdt.build(m))


def _u32s(tree: libfdt.Fdt, path: str, name: str) -> list[int]:
    raw = bytes(tree.getprop(tree.path_offset(path), name))
    return list(struct.unpack(f">{len(raw) // 4}I", raw))


def _u64s(tree: libfdt.Fdt, path: str, name: str) -> list[int]:
    raw = bytes(tree.getprop(tree.path_offset(path), name))
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


def _str(tree: libfdt.Fdt, path: str, name: str) -> str:
    return str(tree.getprop(tree.path_offset(path), name).as_str())


def _strs(tree: libfdt.Fdt, path: str, name: str) -> list[str]:
    return bytes(tree.getprop(tree.path_offset(path), name)).decode().split("\0")[:-1]


def _has(tree: libfdt.Fdt, path: str, name: str) -> bool:
    return bool(tree.getprop(tree.path_offset(path), name, [libfdt.NOTFOUND]) != -libfdt.NOTFOUND)


def _dtc(blob: bytes, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("dtc") is None:
        pytest.skip("dtc missing: apt-get install device-tree-compiler")
    dtb = tmp_path / "pyvmm.dtb"
    dtb.write_bytes(blob)
    return subprocess.run(
        ["dtc", "-I", "dtb", "-O", "dts", str(dtb)], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("gic_version", [3, 2])
def test_dtc_decompiles_the_tree_without_a_warning(tmp_path: Path, gic_version: int) -> None:
    m = Machine(ram=RAM, cpus=4, cmdline="x", gic_version=gic_version, pci_irqs=[(1, 4)])
    result = _dtc(fdt.build(m), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "pci-host-ecam-generic" in result.stdout


def test_the_root_describes_a_virt_machine_of_64_bit_addresses() -> None:
    tree = _read(TWO_CPUS)
    assert _u32s(tree, "/", "#address-cells") == [2]
    assert _u32s(tree, "/", "#size-cells") == [2]
    assert _u32s(tree, "/", "interrupt-parent") == [fdt.PHANDLE_GIC]
    assert _str(tree, "/", "compatible") == "linux,dummy-virt"


def test_memory_is_the_guest_ram() -> None:
    tree = _read(TWO_CPUS)
    assert _str(tree, "/memory@80000000", "device_type") == "memory"
    assert _u64s(tree, "/memory@80000000", "reg") == [0x8000_0000, 512 * MiB]


def test_each_vcpu_is_a_cpu_node_started_by_psci() -> None:
    tree = _read(Machine(ram=RAM, cpus=18, cmdline=""))
    regs = []
    node = tree.first_subnode(tree.path_offset("/cpus"))
    while True:
        assert tree.getprop(node, "enable-method").as_str() == "psci"
        assert tree.getprop(node, "device_type").as_str() == "cpu"
        regs.append(tree.getprop(node, "reg").as_uint32())
        assert tree.get_name(node) == f"cpu@{regs[-1]:x}"
        node = tree.next_subnode(node, [libfdt.NOTFOUND])
        if node < 0:
            break
    # KVM's reset MPIDR: 16 vCPUs per cluster (Aff0), then Aff1.
    assert regs == [*range(16), 0x100, 0x101]
    assert _u32s(tree, "/cpus", "#address-cells") == [1]
    assert _u32s(tree, "/cpus", "#size-cells") == [0]


def test_psci_0_2_through_hvc() -> None:
    tree = _read(TWO_CPUS)
    assert _str(tree, "/psci", "compatible") == "arm,psci-0.2"
    assert _str(tree, "/psci", "method") == "hvc"


def test_gicv3_distributor_and_one_redistributor_per_vcpu() -> None:
    tree = _read(TWO_CPUS)
    gic = "/intc@3fff0000"
    assert tree.node_offset_by_phandle(fdt.PHANDLE_GIC) == tree.path_offset(gic)
    assert _str(tree, gic, "compatible") == "arm,gic-v3"
    assert _u64s(tree, gic, "reg") == [
        layout.GIC_DIST_START,
        0x1_0000,
        0x3C00_0000,
        2 * 0x2_0000,
    ]
    assert _u32s(tree, gic, "#interrupt-cells") == [3]
    assert _has(tree, gic, "interrupt-controller")


def test_gicv2_distributor_and_cpu_interface() -> None:
    tree = _read(Machine(ram=RAM, cpus=2, cmdline="", gic_version=2))
    gic = "/intc@3fff0000"
    assert _str(tree, gic, "compatible") == "arm,cortex-a15-gic"
    assert _u64s(tree, gic, "reg") == [
        layout.GIC_DIST_START,
        0x1_0000,
        layout.GIC_CPU_START,
        0x2_0000,
    ]
    # GICv2 PPIs name the CPUs they go to: both, level-low.
    assert _u32s(tree, "/timer", "interrupts")[2] == 0x308


def test_the_timer_has_its_four_ppis_level_low() -> None:
    tree = _read(TWO_CPUS)
    assert _str(tree, "/timer", "compatible") == "arm,armv8-timer"
    assert _u32s(tree, "/timer", "interrupts") == [1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8]


def test_the_serial_port_is_a_16550_on_mmio_with_an_edge_spi() -> None:
    tree = _read(TWO_CPUS)
    assert _str(tree, "/serial@3f8", "compatible") == "ns16550a"
    assert _u64s(tree, "/serial@3f8", "reg") == [0x3F8, 8]
    assert _u32s(tree, "/serial@3f8", "interrupts") == [0, 0, 1]
    assert _u32s(tree, "/serial@3f8", "clock-frequency") == [1_843_200]


def test_the_rtc_is_a_pl031_primecell_with_its_clock() -> None:
    tree = _read(TWO_CPUS)
    rtc = "/rtc@2000"
    assert _strs(tree, rtc, "compatible") == ["arm,pl031", "arm,primecell"]
    assert _u64s(tree, rtc, "reg") == [0x2000, 0x1000]
    assert _u32s(tree, rtc, "interrupts") == [0, 1, 4]
    (clock,) = _u32s(tree, rtc, "clocks")
    clock_node = tree.node_offset_by_phandle(clock)
    assert tree.getprop(clock_node, "compatible").as_str() == "fixed-clock"
    assert tree.getprop(clock_node, "#clock-cells").as_uint32() == 0
    assert _str(tree, rtc, "clock-names") == "apb_pclk"


def test_the_pci_host_is_ecam_with_its_bar_window() -> None:
    tree = _read(TWO_CPUS)
    pci = "/pci@10000"
    assert _str(tree, pci, "compatible") == "pci-host-ecam-generic"
    assert _str(tree, pci, "device_type") == "pci"
    assert _u64s(tree, pci, "reg") == [0x1_0000, 1 * MiB]
    assert _u32s(tree, pci, "bus-range") == [0, 0]
    size = layout.PCI_MMIO_END - layout.PCI_MMIO_START
    start = layout.PCI_MMIO_START
    assert _u32s(tree, pci, "ranges") == [0x0200_0000, 0, start, 0, start, 0, size]


def test_the_interrupt_map_sends_each_slots_inta_to_its_spi() -> None:
    tree = _read(TWO_CPUS)
    pci = "/pci@10000"
    assert _u32s(tree, pci, "interrupt-map-mask") == [0xF800, 0, 0, 7]
    cells = _u32s(tree, pci, "interrupt-map")
    entries = [cells[i : i + 10] for i in range(0, len(cells), 10)]
    assert entries == [
        [slot << 11, 0, 0, 1, fdt.PHANDLE_GIC, 0, 0, 0, spi, 4]
        for slot, spi in [(1, 4), (2, 5), (3, 6)]
    ]


def test_chosen_holds_the_command_line_the_initrd_and_the_console() -> None:
    tree = _read(TWO_CPUS)
    assert _str(tree, "/chosen", "bootargs") == "console=ttyS0 panic=1 root=/dev/vda ro"
    assert _u64s(tree, "/chosen", "linux,initrd-start") == [0x9C00_0000]
    assert _u64s(tree, "/chosen", "linux,initrd-end") == [0x9C01_2345]
    assert _u32s(tree, "/chosen", "linux,pci-probe-only") == [1]
    path = _str(tree, "/chosen", "stdout-path")
    assert tree.path_offset(path) == tree.path_offset("/serial@3f8")


def test_no_initrd_no_initrd_properties() -> None:
    tree = _read(Machine(ram=RAM, cpus=1, cmdline=""))
    assert not _has(tree, "/chosen", "linux,initrd-start")


def test_properties_lists_every_property_by_path_as_linux_shows_them(tmp_path: Path) -> None:
    blob = fdt.build(TWO_CPUS)
    props = fdt.properties(blob)
    assert props["/chosen/bootargs"] == b"console=ttyS0 panic=1 root=/dev/vda ro\0"
    assert props["/cpus/cpu@1/reg"] == struct.pack(">I", 1)
    assert props["/intc@3fff0000/interrupt-controller"] == b""
    assert props["/memory@80000000/reg"] == struct.pack(">QQ", *RAM)
    # As many as dtc decompiles: each property is a line of its own that ends in ";".
    lines = [line.strip() for line in _dtc(blob, tmp_path).stdout.splitlines()]
    assert len(props) == sum(1 for x in lines if x.endswith(";") and x not in ("};", "/dts-v1/;"))
    assert all(path.startswith("/") and "//" not in path for path in props)
