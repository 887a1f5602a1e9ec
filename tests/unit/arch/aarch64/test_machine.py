"""The arm64 `Arch` as pyvmm.vmm drives it, on any host: KVM stands in as recording fakes, the
guest memory, buses, PCI root and device tree are real."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libfdt
import pytest

from pyvmm.arch.aarch64 import layout
from pyvmm.arch.aarch64 import machine as machine_module
from pyvmm.arch.aarch64.machine import Aarch64, MpidrError
from pyvmm.arch.interface import Arch
from pyvmm.devices.bus import Bus
from pyvmm.devices.pci.root import PciRoot
from pyvmm.kvm import aarch64 as kvm_arm
from pyvmm.kvm.abi import Cap
from pyvmm.memory import GuestMemory
from tests.unit.arch.aarch64.test_image import make_image

MiB = 1 << 20


class FakeKvm:
    def check_extension(self, cap: Cap) -> int:
        return 509 if cap == Cap.KVM_CAP_NR_MEMSLOTS else 0


class FakeVm:
    def __init__(self) -> None:
        self.irqfds: list[tuple[int, int]] = []

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        self.irqfds.append((fd, gsi))


class FakeVcpu:
    def __init__(self, vcpu_id: int, mpidr: int | None = None) -> None:
        self.id = vcpu_id
        self.mpidr = vcpu_id if mpidr is None else mpidr
        self.regs: dict[int, int] = {}

    def get_one_reg(self, reg_id: int, size: int) -> int:
        assert (reg_id, size) == (kvm_arm.MPIDR_EL1, 8)
        return 1 << 31 | self.mpidr  # bit 31 reads as one

    def set_one_reg(self, reg_id: int, size: int, value: int) -> None:
        self.regs[reg_id] = value


class FakeGic:
    type = kvm_arm.DeviceType.ARM_VGIC_V3
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """What the machine asked of KVM, in order."""
    log: list[tuple[Any, ...]] = []

    def create_vgic(vm: Any, dist: int, redist: int, cpu_if: int, nr_irqs: int) -> FakeGic:
        log.append(("create_vgic", dist, redist, cpu_if, nr_irqs))
        return FakeGic()

    monkeypatch.setattr(kvm_arm, "create_vgic", create_vgic)
    monkeypatch.setattr(kvm_arm, "preferred_target", lambda vm: "target")
    monkeypatch.setattr(
        kvm_arm,
        "init_vcpu",
        lambda vcpu, target, primary: log.append(("init_vcpu", vcpu.id, target, primary)),
    )
    monkeypatch.setattr(kvm_arm, "init_vgic", lambda gic: log.append(("init_vgic",)))
    return log


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(layout.ram_ranges(256 * MiB))
    yield m
    m.close()


def test_it_is_an_arch() -> None:
    arch: Arch = Aarch64()
    assert arch.name == "aarch64"
    assert Cap.KVM_CAP_ARM_PSCI_0_2 in arch.required_caps


def test_the_vgic_is_made_with_its_addresses_and_interrupt_count(
    calls: list[tuple[Any, ...]],
) -> None:
    arch = Aarch64()
    arch.configure_vm(FakeVm())  # type: ignore[arg-type]
    assert calls == [("create_vgic", 0x3FFF_0000, 0x3C00_0000, 0x3FFD_0000, 128)]
    assert arch.gic_version == 3


def test_every_spi_is_routed_to_itself_and_msis_come_after() -> None:
    arch = Aarch64()
    routes = arch.irqchip_routes()
    assert routes[:3] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    assert len(routes) == machine_module.GIC_SPIS
    allocator = arch.allocator(FakeKvm())  # type: ignore[arg-type]
    assert allocator.allocate_gsi("msi") == machine_module.GIC_SPIS
    bar = allocator.allocate_mmio(0x4000, "bar")
    assert layout.PCI_MMIO_START <= bar < layout.PCI_MMIO_END


def test_each_pci_device_has_an_spi_of_its_own() -> None:
    arch = Aarch64()
    gsis = [arch.pci_intx_gsi(i) for i in range(31)]
    assert gsis == list(range(4, 35))
    assert max(gsis) < machine_module.GIC_SPIS


def test_load_guest_puts_the_kernel_at_ram_start_and_the_initrd_below_the_tree(
    tmp_path: Path, mem: GuestMemory
) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(make_image(text_offset=0, image_size=20 * MiB))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 5000)
    arch = Aarch64()
    guest = arch.load_guest(mem, str(kernel), "console=ttyS0", str(initrd))
    assert guest.kernel.entry == layout.RAM_START
    assert arch.fdt_addr == layout.RAM_START + 254 * MiB
    assert guest.initrd is not None
    addr, size = guest.initrd
    assert size == 5000 and addr + size <= arch.fdt_addr
    assert guest.cmdline == "console=ttyS0"


def test_a_kernel_reaching_the_device_tree_is_refused(tmp_path: Path) -> None:
    small = GuestMemory(layout.ram_ranges(24 * MiB))
    try:
        kernel = tmp_path / "Image"
        kernel.write_bytes(make_image(image_size=23 * MiB))
        with pytest.raises(Exception, match="past where the device tree goes"):
            Aarch64().load_guest(small, str(kernel), "", None)
    finally:
        small.close()


def test_platform_devices_are_on_mmio_and_the_serial_has_its_spi(mem: GuestMemory) -> None:
    arch = Aarch64()
    vm = FakeVm()
    io_bus, mmio_bus = Bus("io"), Bus("mmio")
    out = io.BytesIO()
    platform = arch.add_platform_devices(
        vm,  # type: ignore[arg-type]
        mem,
        (io_bus, mmio_bus),
        out,
        lambda: None,
    )
    try:
        assert [gsi for _, gsi in vm.irqfds] == [machine_module.SERIAL_SPI]
        assert mmio_bus.write(layout.SERIAL_ADDR, b"A")
        assert out.getvalue() == b"A"
        pid0 = bytearray(4)
        assert mmio_bus.read(layout.RTC_ADDR + 0xFE0, memoryview(pid0))
        assert pid0[0] == 0x31
        assert io_bus.device_at(0x3F8) is None  # nothing on ports on arm64
    finally:
        platform.close()


def test_ecam_reaches_the_pci_root_on_mmio() -> None:
    arch = Aarch64()
    mmio_bus = Bus("mmio")
    root = PciRoot(mmio_bus, arch.allocator(FakeKvm()).allocate_mmio)  # type: ignore[arg-type]
    arch.attach_pci(root, (Bus("io"), mmio_bus), lambda: None)
    vendor = bytearray(4)
    assert mmio_bus.read(layout.PCI_ECAM_START, memoryview(vendor))
    assert int.from_bytes(vendor, "little") == 0x1237_8086


def test_the_device_tree_lands_where_x0_points(
    tmp_path: Path, mem: GuestMemory, calls: list[tuple[Any, ...]]
) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(make_image())
    arch = Aarch64()
    arch.configure_vm(FakeVm())  # type: ignore[arg-type]
    guest = arch.load_guest(mem, str(kernel), "console=ttyS0 quiet", None)
    blob = arch.write_boot_tables(mem, guest, 2, [(1, 4), (2, 5)])
    vcpus = [FakeVcpu(0), FakeVcpu(1)]
    arch.setup_vcpus(FakeKvm(), vcpus, guest)  # type: ignore[arg-type]
    x0 = vcpus[0].regs[kvm_arm.x_reg(0)]
    assert x0 == arch.fdt_addr
    magic, size = struct.unpack(">II", mem.read(x0, 8))
    tree = libfdt.Fdt(mem.read(x0, size))
    assert magic == 0xD00DFEED
    assert blob == mem.read(x0, size)  # what --dump-device-tree-blob writes
    chosen = tree.path_offset("/chosen")
    assert tree.getprop(chosen, "bootargs").as_str() == "console=ttyS0 quiet"
    pci = tree.path_offset("/pci@10000")
    assert len(bytes(tree.getprop(pci, "interrupt-map"))) == 2 * 10 * 4
    assert vcpus[0].regs[kvm_arm.PC] == layout.RAM_START
    assert vcpus[1].regs == {}  # powered off until PSCI CPU_ON


def test_vcpus_are_initialised_before_the_vgic(
    tmp_path: Path, mem: GuestMemory, calls: list[tuple[Any, ...]]
) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(make_image())
    arch = Aarch64()
    arch.configure_vm(FakeVm())  # type: ignore[arg-type]
    guest = arch.load_guest(mem, str(kernel), "", None)
    arch.setup_vcpus(FakeKvm(), [FakeVcpu(i) for i in range(3)], guest)  # type: ignore[arg-type]
    assert calls[1:] == [
        ("init_vcpu", 0, "target", True),
        ("init_vcpu", 1, "target", False),
        ("init_vcpu", 2, "target", False),
        ("init_vgic",),
    ]


def test_a_vcpu_numbered_otherwise_than_the_tree_stops_the_vm(
    tmp_path: Path, mem: GuestMemory, calls: list[tuple[Any, ...]]
) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(make_image())
    arch = Aarch64()
    arch.configure_vm(FakeVm())  # type: ignore[arg-type]
    guest = arch.load_guest(mem, str(kernel), "", None)
    with pytest.raises(MpidrError, match="vCPU 1: KVM gave it MPIDR affinity 0x100"):
        arch.setup_vcpus(FakeKvm(), [FakeVcpu(0), FakeVcpu(1, 0x100)], guest)  # type: ignore[arg-type]
