"""The x86_64 PC that pyvmm builds: the `Arch` implementation for x86_64 hosts.

RAM below the PCI hole and from 4 GiB up; the in-kernel PIC/IOAPIC pair and PIT; the kernel
(ELF vmlinux or bzImage), command line and initrd placed per the boot contract (DESIGN.md), with
the zero page, GDT, identity-mapped page tables and MP table describing the machine; COM1, the
i8042 (whose reset ends the VM) and the CMOS RTC on ports; PCI configuration mechanism #1 at
0xCF8; the eight IOAPIC pins 16-23 shared by the PCI devices' INTx lines; vCPU 0 entering the
kernel in 64-bit mode, the others waiting in the in-kernel LAPIC for INIT/SIPI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO

from pyvmm.allocator import SystemAllocator
from pyvmm.arch.interface import CoalescedZone, GuestImage, Platform
from pyvmm.arch.x86_64 import cpuid, msrs, regs
from pyvmm.arch.x86_64.gdt import write_gdt
from pyvmm.arch.x86_64.layout import (
    CMDLINE_MAX_SIZE,
    CMDLINE_START,
    FIRST_ADDR_PAST_32BITS,
    HIGH_MEMORY_START,
    IOAPIC_START,
    PCI_HOLE_START,
    PCI_MMIO_START,
    ZERO_PAGE_START,
    ram_ranges,
)
from pyvmm.arch.x86_64.mptable import MAX_PCI_IRQS, max_cpus, write_mptable
from pyvmm.arch.x86_64.paging import write_page_tables
from pyvmm.arch.x86_64.pci_cf8 import (
    CONFIG_ADDRESS_LEN,
    CONFIG_ADDRESS_PORT,
    CONFIG_PORTS_LEN,
    ConfigMechanism1,
)
from pyvmm.arch.x86_64.zeropage import BootInfo, write_zero_page
from pyvmm.devices.bus import Bus
from pyvmm.devices.cmos import Cmos
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.irq import EventFdIrq
from pyvmm.devices.pci.root import NUM_SLOTS, PciRoot
from pyvmm.devices.serial import Serial
from pyvmm.kvm import x86_64 as kvm_x86
from pyvmm.kvm.abi import Cap
from pyvmm.kvm.routing import MAX_ROUTES
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm
from pyvmm.loader import LoadArea, load_initrd, load_kernel, write_cmdline
from pyvmm.memory import GuestMemory

SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
SERIAL_PORT_LEN = 8
I8042_PORT = 0x60
I8042_PORT_LEN = 5
CMOS_PORT = 0x70
CMOS_PORT_LEN = 2

# PCI INTA# lines go to IOAPIC pins 16-23, clear of the ISA interrupts.
PCI_INTX_FIRST_GSI = 16
PCI_INTX_GSIS = 8
# Kernel and initrd go above 1 MiB, RAM around the PCI hole (layout.py).
LOAD_AREA = LoadArea(
    floor=HIGH_MEMORY_START,
    below_floor="the zero page, page tables and command line",
    hole_start=PCI_HOLE_START,
    hole_end=FIRST_ADDR_PAST_32BITS,
    hole_name="the PCI hole",
)
# KVM has had at least this many memory slots since it could say how many (KVM_CAP_NR_MEMSLOTS).
MIN_MEMSLOTS = 32

# Serial console; reboot through the i8042 (our reset path); reboot on panic rather than hang;
# no ACPI: pyvmm describes the machine with the MP table and e820, and has no ACPI tables for
# Linux to look for (it would report "A valid RSDP was not found").
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 acpi=off"


class X86_64:
    """An `Arch` (pyvmm.arch) for x86_64."""

    name = "x86_64"
    required_caps: Sequence[Cap] = kvm_x86.REQUIRED_CAPS
    default_cmdline = DEFAULT_CMDLINE
    max_cpus = max_cpus()  # what the MP table in the EBDA can describe
    max_pci_devices = min(NUM_SLOTS - 1, MAX_PCI_IRQS)  # each on an IO-APIC pin the table names
    has_device_tree = False

    def configure_vm(self, vm: Vm) -> None:
        kvm_x86.configure_vm(vm)

    def irqchip_routes(self) -> list[tuple[int, int, int]]:
        return kvm_x86.irqchip_routes()

    def ram_ranges(self, mem_bytes: int) -> list[tuple[int, int]]:
        return ram_ranges(mem_bytes)

    def allocator(self, kvm: Kvm) -> SystemAllocator:
        return SystemAllocator(
            mmio_start=PCI_MMIO_START,
            mmio_end=IOAPIC_START,
            first_gsi=kvm_x86.KVM_IOAPIC_NUM_PINS,
            gsi_end=MAX_ROUTES,
            slots=kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS) or MIN_MEMSLOTS,
        )

    def load_guest(
        self, mem: GuestMemory, kernel: str, cmdline: str, initrd: str | None
    ) -> GuestImage:
        image = load_kernel(mem, kernel, LOAD_AREA)
        write_cmdline(mem, CMDLINE_START, cmdline, min(image.cmdline_max, CMDLINE_MAX_SIZE - 1))
        placed = None
        if initrd is not None:
            low_ram_end = min(mem.ram_regions[0].end, PCI_HOLE_START)
            placed = load_initrd(mem, initrd, image, low_ram_end, LOAD_AREA)
        return GuestImage(image, CMDLINE_START, len(cmdline) + 1, placed)

    def add_platform_devices(
        self,
        vm: Vm,
        mem: GuestMemory,
        buses: tuple[Bus, Bus],
        console_out: BinaryIO,
        on_reset: Callable[[], None],
    ) -> Platform:
        io_bus, _ = buses
        serial_irq = EventFdIrq(SERIAL_IRQ)
        vm.register_irqfd(serial_irq.fd, SERIAL_IRQ)
        serial = Serial(serial_irq, console_out)
        io_bus.insert(serial, SERIAL_PORT, SERIAL_PORT_LEN, "serial (ttyS0)")
        io_bus.insert(I8042(on_reset), I8042_PORT, I8042_PORT_LEN, "i8042 controller")
        below_4g = min(mem.size, PCI_HOLE_START)
        io_bus.insert(Cmos(below_4g, mem.size - below_4g), CMOS_PORT, CMOS_PORT_LEN, "CMOS/RTC")
        return Platform(serial, [serial_irq.close])

    def attach_pci(
        self, pci: PciRoot, buses: tuple[Bus, Bus], on_reset: Callable[[], None]
    ) -> None:
        io_bus, _ = buses
        cf8 = ConfigMechanism1(pci, on_reset)
        io_bus.insert(cf8, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN, "PCI config (CF8)")

    def pci_intx_gsi(self, index: int) -> int:
        return PCI_INTX_FIRST_GSI + index % PCI_INTX_GSIS

    def write_boot_tables(
        self, mem: GuestMemory, guest: GuestImage, cpus: int, pci_irqs: list[tuple[int, int]]
    ) -> bytes | None:
        write_zero_page(
            mem,
            BootInfo(
                cmdline_addr=guest.cmdline_addr,
                cmdline_size=guest.cmdline_size,
                initrd=guest.initrd,
                setup_header=guest.kernel.setup_header,
            ),
        )
        write_gdt(mem)
        write_page_tables(mem)
        write_mptable(mem, cpus, pci_irqs)
        return None  # the zero page and the MP table, no device tree

    def setup_vcpus(self, kvm: Kvm, vcpus: list[Vcpu], guest: GuestImage) -> None:
        supported = kvm_x86.supported_cpuid(kvm)
        tsc_deadline = bool(kvm.check_extension(Cap.KVM_CAP_TSC_DEADLINE_TIMER))
        has_xcrs = bool(kvm.check_extension(Cap.KVM_CAP_XCRS))
        for vcpu in vcpus:
            entries = cpuid.vcpu_cpuid(supported, vcpu.id, len(vcpus), tsc_deadline)
            kvm_x86.set_cpuid(vcpu, entries)
            xcr0 = cpuid.xsave_features(entries)
            if xcr0 is not None and has_xcrs:
                kvm_x86.set_xcr0(vcpu, xcr0)
            kvm_x86.set_msrs(vcpu, msrs.boot_msrs())
            regs.setup_fpu(vcpu)
            regs.setup_lint(vcpu)
        # The other vCPUs wait in the in-kernel LAPIC for the guest's INIT/SIPI.
        regs.setup_boot_vcpu(vcpus[0], guest.kernel.entry, ZERO_PAGE_START)

    def describe_vcpu(self, vcpu: Vcpu) -> str:
        r, s = kvm_x86.get_regs(vcpu), kvm_x86.get_sregs(vcpu)
        return (
            f"rip={r.rip:#x} rsp={r.rsp:#x} rflags={r.rflags:#x} cs={s.cs.selector:#x} "
            f"cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x} "
            f"idt={s.idt.base:#x}/{s.idt.limit:#x}"
        )

    def coalesced_zones(self) -> list[CoalescedZone]:
        """Writes to the PCI configuration address (0xcf8) need no exit: each is followed by an
        access to 0xcfc that exits anyway, and the ring is replayed before any exit is handled.
        A byte write to 0xcf9 (reset control) is in the same zone and so takes effect at the
        next exit, not at once."""
        return [CoalescedZone(CONFIG_ADDRESS_PORT, CONFIG_ADDRESS_LEN, pio=True)]
