"""What an architecture adds to a VM: one interface (`Arch`) that `pyvmm.vmm` drives.

The VMM itself is the same on every architecture: guest memory, buses, PCI with virtio devices,
vCPU threads, the control socket. An architecture says where RAM and MMIO go, which in-kernel
interrupt controller and routes the VM has, how the kernel is loaded and what boot tables
describe the machine to it (x86: zero page, MP table, page tables; arm64: a device tree), its
own platform devices (x86: the serial port, i8042, CMOS; arm64: the serial port on MMIO and a
PL031 RTC), how the guest reaches PCI configuration space (x86: ports 0xCF8-0xCFF; arm64: ECAM),
which interrupt each PCI device's INTx line is, and the initial state of each vCPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from pyvmm.allocator import SystemAllocator
from pyvmm.devices.bus import Bus
from pyvmm.devices.pci.root import PciRoot
from pyvmm.devices.serial import Serial
from pyvmm.kvm.abi import Cap
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm
from pyvmm.loader import KernelImage
from pyvmm.memory import GuestMemory


class MachineError(Exception):
    """The architecture cannot build the machine asked for (its tables, its vCPUs)."""


@dataclass(frozen=True)
class GuestImage:
    """What loading the guest put in its memory."""

    kernel: KernelImage
    cmdline_addr: int
    cmdline_size: int
    """Bytes, the terminating NUL included."""
    initrd: tuple[int, int] | None = None
    """(guest address, size)."""
    cmdline: str = ""
    """The command line itself, for an architecture that hands it over in a table (arm64: the
    device tree's /chosen) rather than at `cmdline_addr`."""


@dataclass
class Platform:
    """The architecture's own devices: the console, and what to release when the VM ends."""

    serial: Serial
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers = []


@dataclass(frozen=True)
class CoalescedZone:
    """A range whose guest writes KVM records in a ring instead of exiting for each."""

    addr: int
    size: int
    pio: bool


class Arch(Protocol):
    """One architecture's part in building a VM (see the module docstring)."""

    name: str
    required_caps: Sequence[Cap]
    default_cmdline: str
    max_cpus: int
    """The most vCPUs the machine's boot tables and interrupt controller describe."""
    max_pci_devices: int
    """The most PCI devices beside the host bridge, each with an INTx line of the machine's."""
    has_device_tree: bool
    """Whether write_boot_tables describes the machine with a flattened device tree."""

    def configure_vm(self, vm: Vm) -> None:
        """Create the VM-wide state the architecture needs (in-kernel irqchip, timers)."""

    def irqchip_routes(self) -> list[tuple[int, int, int]]:
        """The (GSI, irqchip, pin) routes the VM keeps beside its MSI routes."""

    def ram_ranges(self, mem_bytes: int) -> list[tuple[int, int]]:
        """Where `mem_bytes` of RAM go in guest-physical memory, as (address, size) ranges."""

    def allocator(self, kvm: Kvm) -> SystemAllocator:
        """The pools of MMIO space, MSI GSIs and memory slots of this machine."""

    def load_guest(
        self, mem: GuestMemory, kernel: str, cmdline: str, initrd: str | None
    ) -> GuestImage:
        """Load the kernel at path `kernel`, the command line and the initrd into `mem`."""

    def add_platform_devices(
        self,
        vm: Vm,
        mem: GuestMemory,
        buses: tuple[Bus, Bus],
        console_out: BinaryIO,
        on_reset: Callable[[], None],
    ) -> Platform:
        """Put the architecture's own devices on the (port I/O, MMIO) buses; `on_reset` is what
        the guest's reset does."""

    def attach_pci(
        self, pci: PciRoot, buses: tuple[Bus, Bus], on_reset: Callable[[], None]
    ) -> None:
        """Give the guest its way to PCI configuration space."""

    def pci_intx_gsi(self, index: int) -> int:
        """The GSI of the INTx line of the index-th PCI device (from 0; lines may be shared)."""

    def write_boot_tables(
        self, mem: GuestMemory, guest: GuestImage, cpus: int, pci_irqs: list[tuple[int, int]]
    ) -> bytes | None:
        """Describe the machine to the guest: `pci_irqs` lists (PCI slot, GSI) per device.
        Returns the flattened device tree where that is how the machine is described."""

    def setup_vcpus(self, kvm: Kvm, vcpus: list[Vcpu], guest: GuestImage) -> None:
        """Give each vCPU its initial state; the first enters the kernel."""

    def coalesced_zones(self) -> list[CoalescedZone]:
        """Ranges whose writes need no exit of their own."""

    def describe_vcpu(self, vcpu: Vcpu) -> str:
        """A line of the vCPU's state (where it runs, its page tables) for the log of an exit
        that ends the VM unasked, such as a triple fault."""
