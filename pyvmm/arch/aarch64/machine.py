"""The arm64 virtual machine pyvmm builds: the `Arch` implementation for aarch64 hosts.

RAM from 2 GiB, MMIO below it (layout.py); the in-kernel GIC made with KVM_CREATE_DEVICE (v3,
else v2) with every SPI routed to itself; the kernel Image at the start of RAM, the device tree
at its top and the initrd just below it; a 16550 on MMIO and the PL031 RTC; PCI configuration
space by ECAM; each PCI device's INTx line an SPI of its own; vCPU 0 entering the Image with x0
pointing at the device tree, the others powered off until the guest's PSCI CPU_ON. The guest's
PSCI SYSTEM_OFF and SYSTEM_RESET come back as KVM_EXIT_SYSTEM_EVENT, which ends the VM (the
generic vCPU loop, pyvmm.vcpu_threads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO

from pyvmm.allocator import SystemAllocator
from pyvmm.arch.aarch64 import fdt, layout
from pyvmm.arch.aarch64.image import load_image, load_initrd
from pyvmm.arch.aarch64.pci_ecam import Ecam
from pyvmm.arch.interface import CoalescedZone, GuestImage, MachineError, Platform
from pyvmm.devices.bus import Bus
from pyvmm.devices.irq import EventFdIrq
from pyvmm.devices.pci.root import NUM_SLOTS, PciRoot
from pyvmm.devices.pl031 import Pl031
from pyvmm.devices.serial import Serial
from pyvmm.kvm import aarch64 as kvm_arm
from pyvmm.kvm.abi import Cap
from pyvmm.kvm.device import KvmDevice
from pyvmm.kvm.routing import MAX_ROUTES
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm
from pyvmm.loader.cmdline import check_cmdline
from pyvmm.loader.errors import KernelTooLargeError
from pyvmm.memory import GuestMemory

# Interrupts: 32 private (SGIs and PPIs), then SPIs. GSI n is SPI n (INTID 32 + n).
GIC_PRIVATE_IRQS = 32
GIC_SPIS = 96
GIC_NR_IRQS = GIC_PRIVATE_IRQS + GIC_SPIS  # a multiple of 32, as KVM wants
KVM_IRQCHIP_GIC = 0  # the only irqchip of an arm64 VM; its pins are SPI numbers
SERIAL_SPI = 0
RTC_SPI = 1
PCI_INTX_FIRST_SPI = 4
GICV2_MAX_CPUS = 8
# KVM has had at least this many memory slots since it could say how many (KVM_CAP_NR_MEMSLOTS).
MIN_MEMSLOTS = 32

# The 16550 is the console; reboot on panic rather than hang (PSCI SYSTEM_RESET ends the VM).
DEFAULT_CMDLINE = "console=ttyS0 panic=1"


class MpidrError(MachineError):
    """KVM numbered a vCPU otherwise than the device tree (written before the vCPUs) says."""


class Aarch64:
    """An `Arch` (pyvmm.arch) for aarch64: one object per VM (it keeps the vGIC it made and
    where the device tree goes)."""

    name = "aarch64"
    required_caps: Sequence[Cap] = kvm_arm.REQUIRED_CAPS
    default_cmdline = DEFAULT_CMDLINE
    max_cpus = layout.MAX_GICV3_CPUS  # a redistributor each below the distributor (GICv2: 8)
    max_pci_devices = min(NUM_SLOTS - 1, GIC_SPIS - PCI_INTX_FIRST_SPI)  # an SPI each
    has_device_tree = True

    def __init__(self) -> None:
        self.vm: Vm | None = None
        self.gic: KvmDevice | None = None
        self.gic_version = 3
        self.fdt_addr = 0

    def configure_vm(self, vm: Vm) -> None:
        self.vm = vm
        self.gic = kvm_arm.create_vgic(
            vm, layout.GIC_DIST_START, layout.GIC_REDIST_START, layout.GIC_CPU_START, GIC_NR_IRQS
        )
        self.gic_version = 3 if self.gic.type == kvm_arm.DeviceType.ARM_VGIC_V3 else 2

    def irqchip_routes(self) -> list[tuple[int, int, int]]:
        return [(spi, KVM_IRQCHIP_GIC, spi) for spi in range(GIC_SPIS)]

    def ram_ranges(self, mem_bytes: int) -> list[tuple[int, int]]:
        return layout.ram_ranges(mem_bytes)

    def allocator(self, kvm: Kvm) -> SystemAllocator:
        return SystemAllocator(
            mmio_start=layout.PCI_MMIO_START,
            mmio_end=layout.PCI_MMIO_END,
            first_gsi=GIC_SPIS,  # MSI routes take GSIs past the SPIs
            gsi_end=MAX_ROUTES,
            slots=kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS) or MIN_MEMSLOTS,
        )

    def load_guest(
        self, mem: GuestMemory, kernel: str, cmdline: str, initrd: str | None
    ) -> GuestImage:
        image = load_image(mem, kernel)
        check_cmdline(cmdline, image.cmdline_max)
        self.fdt_addr = layout.fdt_addr(mem.end)
        if image.load_end > self.fdt_addr:
            raise KernelTooLargeError(
                f"kernel {kernel}: the Image reaches {image.load_end:#x}, past where the device "
                f"tree goes ({self.fdt_addr:#x}, the top 2 MiB of RAM); raise -m"
            )
        placed = None
        if initrd is not None:
            placed = load_initrd(mem, initrd, image, self.fdt_addr)
        return GuestImage(image, 0, len(cmdline) + 1, placed, cmdline)

    def add_platform_devices(
        self,
        vm: Vm,
        mem: GuestMemory,
        buses: tuple[Bus, Bus],
        console_out: BinaryIO,
        on_reset: Callable[[], None],
    ) -> Platform:
        _, mmio_bus = buses
        serial_irq = EventFdIrq(SERIAL_SPI)
        vm.register_irqfd(serial_irq.fd, SERIAL_SPI)
        serial = Serial(serial_irq, console_out)
        mmio_bus.insert(serial, layout.SERIAL_ADDR, layout.SERIAL_SIZE, "serial (ttyS0)")
        mmio_bus.insert(Pl031(), layout.RTC_ADDR, layout.RTC_SIZE, "RTC (PL031)")
        closers = [serial_irq.close]
        if self.gic is not None:
            closers.append(self.gic.close)
        return Platform(serial, closers)

    def attach_pci(
        self, pci: PciRoot, buses: tuple[Bus, Bus], on_reset: Callable[[], None]
    ) -> None:
        _, mmio_bus = buses
        mmio_bus.insert(Ecam(pci), layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, "PCI config (ECAM)")

    def pci_intx_gsi(self, index: int) -> int:
        return PCI_INTX_FIRST_SPI + index

    def write_boot_tables(
        self, mem: GuestMemory, guest: GuestImage, cpus: int, pci_irqs: list[tuple[int, int]]
    ) -> bytes | None:
        ram = mem.ram_regions[0]
        machine = fdt.Machine(
            ram=(ram.guest_addr, ram.size),
            cpus=cpus,
            cmdline=guest.cmdline,
            gic_version=self.gic_version,
            initrd=guest.initrd,
            pci_irqs=pci_irqs,
            serial_spi=SERIAL_SPI,
            rtc_spi=RTC_SPI,
        )
        blob = fdt.build(machine)
        mem.write(self.fdt_addr, blob)
        return blob

    def setup_vcpus(self, kvm: Kvm, vcpus: list[Vcpu], guest: GuestImage) -> None:
        assert self.vm is not None and self.gic is not None, "configure_vm first"
        if self.gic_version == 2 and len(vcpus) > GICV2_MAX_CPUS:
            raise MachineError(
                f"-c/--cpus {len(vcpus)}: this host's KVM has only a GICv2, which serves "
                f"{GICV2_MAX_CPUS} vCPUs at most"
            )
        target = kvm_arm.preferred_target(self.vm)
        for vcpu in vcpus:
            kvm_arm.init_vcpu(vcpu, target, primary=vcpu.id == 0)
            mpidr = vcpu.get_one_reg(kvm_arm.MPIDR_EL1, 8) & kvm_arm.MPIDR_AFFINITY_MASK
            if mpidr != fdt.mpidr(vcpu.id):
                raise MpidrError(
                    f"vCPU {vcpu.id}: KVM gave it MPIDR affinity {mpidr:#x}, but the device tree "
                    f"says {fdt.mpidr(vcpu.id):#x}; the guest could not start it"
                )
        kvm_arm.set_boot_registers(vcpus[0], guest.kernel.entry, self.fdt_addr)
        # Only now: the vGIC's init needs every vCPU created and initialised.
        kvm_arm.init_vgic(self.gic)

    def coalesced_zones(self) -> list[CoalescedZone]:
        return []

    def describe_vcpu(self, vcpu: Vcpu) -> str:
        pc = vcpu.get_one_reg(kvm_arm.PC, 8)
        pstate = vcpu.get_one_reg(kvm_arm.PSTATE, 8)
        return f"pc={pc:#x} pstate={pstate:#x}"
