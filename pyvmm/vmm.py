"""Builds a VM from a VmConfig and runs it: the one place that wires KVM, memory, devices, vCPUs."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

from pyvmm.allocator import SystemAllocator
from pyvmm.arch.x86_64 import cpuid, msrs, regs
from pyvmm.arch.x86_64.gdt import write_gdt
from pyvmm.arch.x86_64.layout import (
    CMDLINE_MAX_SIZE,
    CMDLINE_START,
    IOAPIC_START,
    PCI_HOLE_START,
    PCI_MMIO_START,
    ram_ranges,
)
from pyvmm.arch.x86_64.mptable import write_mptable
from pyvmm.arch.x86_64.paging import write_page_tables
from pyvmm.arch.x86_64.zeropage import BootInfo, write_zero_page
from pyvmm.config import VmConfig
from pyvmm.control import ControlServer
from pyvmm.devices.bus import Bus
from pyvmm.devices.cmos import Cmos
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.irq import EventFdIrq, LevelIrq
from pyvmm.devices.pci.root import (
    CONFIG_ADDRESS_LEN,
    CONFIG_ADDRESS_PORT,
    CONFIG_PORTS_LEN,
    PciRoot,
)
from pyvmm.devices.serial import Serial
from pyvmm.devices.virtio.block import Block
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.devices.virtio.rng import Rng
from pyvmm.disk import open_disk
from pyvmm.kvm import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    Kvm,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    Vcpu,
    Vm,
)
from pyvmm.kvm.abi import KVM_IOAPIC_NUM_PINS, Cap
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.routing import MAX_ROUTES, GsiRouter
from pyvmm.loader import KernelImage, build_cmdline, load_initrd, load_kernel, write_cmdline
from pyvmm.memory import GuestMemory, shmem_huge_pages
from pyvmm.ratelimit import flush_all as flush_guest_logs
from pyvmm.terminal import StdinPump

log = logging.getLogger(__name__)


def _no_ring() -> tuple[int, int]:
    return 0, 0


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

# KVM has had at least this many memory slots since it could say how many (KVM_CAP_NR_MEMSLOTS).
MIN_MEMSLOTS = 32
KICK_SIGNAL = signal.SIGUSR1
# How long suspend waits for vCPUs and device workers to park, and exit for vCPUs to stop.
PAUSE_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# KVM_SYSTEM_EVENT_* types
SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# Serial console; reboot through the i8042 (our reset path); reboot on panic rather than hang;
# no ACPI: pyvmm describes the machine with the MP table and e820, and has no ACPI tables for
# Linux to look for (it would report "A valid RSDP was not found").
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 acpi=off"


# What a read from an address no device claims returns (a floating bus).
_ALL_ONES = b"\xff" * 8


class SuspendError(Exception):
    """Not every vCPU and device worker parked in time; the message names the ones that did
    not."""


def disk_name(index: int) -> str:
    """The name Linux gives the index-th virtio disk: vda ... vdz, vdaa, vdab, ..."""
    letters = ""
    index += 1
    while index:
        index, digit = divmod(index - 1, 26)
        letters = chr(ord("a") + digit) + letters
    return f"vd{letters}"


@dataclass(frozen=True)
class VmExit:
    """Why the VM stopped and the exit status `pyvmm run` returns."""

    code: int
    reason: str


class _VmControl:
    """What the control socket's commands do to this VM."""

    def __init__(self, vmm: Vmm) -> None:
        self._vmm = vmm

    def stop(self) -> None:
        self._vmm.request_exit(VmExit(0, "stopped by control socket"))

    def suspend(self) -> None:
        self._vmm.pause()

    def resume(self) -> None:
        self._vmm.resume()


class Vmm:
    """A built VM. `run()` starts the vCPUs and returns when the guest resets or is stopped."""

    def __init__(
        self, config: VmConfig, console_out: BinaryIO, console_in_fd: int | None = None
    ) -> None:
        self.config = config
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._exit_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._run_state = threading.Condition()
        self._pause_requested = False
        self._parked: set[threading.Thread] = set()  # vCPU threads waiting in _park
        self._abandoned_vcpus: set[int] = set()
        self.control: ControlServer | None = None
        self.kvm = Kvm(config.kvm_path)
        try:
            self._build(console_out, console_in_fd)
            if config.socket is not None:
                self.control = ControlServer(config.socket, _VmControl(self))
        except BaseException:
            self.close()
            raise

    def _build(self, console_out: BinaryIO, console_in_fd: int | None) -> None:
        cfg = self.config
        self.vm = Vm(self.kvm)
        self.allocator = SystemAllocator(
            mmio_start=PCI_MMIO_START,
            mmio_end=IOAPIC_START,
            first_gsi=KVM_IOAPIC_NUM_PINS,
            gsi_end=MAX_ROUTES,
            slots=self.kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS) or MIN_MEMSLOTS,
        )
        self.mem = GuestMemory(ram_ranges(cfg.mem_bytes))
        log.debug("guest RAM: huge pages in shared memory are %r on this host", shmem_huge_pages())
        for region in self.mem.regions:
            self.vm.set_user_memory_region(
                self.allocator.allocate_slot("guest RAM"),
                region.guest_addr,
                region.size,
                region.host_addr,
                readonly=region.readonly,
            )

        self.kernel: KernelImage = load_kernel(self.mem, cfg.kernel)
        root = [d for d in cfg.disks if d.root]
        root_params = [f"root=/dev/vda {'rw' if root[0].writable else 'ro'}"] if root else []
        cmdline = build_cmdline(DEFAULT_CMDLINE, [*root_params, *cfg.params])
        write_cmdline(
            self.mem, CMDLINE_START, cmdline, min(self.kernel.cmdline_max, CMDLINE_MAX_SIZE - 1)
        )
        initrd = None
        if cfg.initrd is not None:
            low_ram_end = min(self.mem.regions[0].end, PCI_HOLE_START)
            initrd = load_initrd(self.mem, cfg.initrd, self.kernel, low_ram_end)
        self.zero_page = write_zero_page(
            self.mem,
            BootInfo(
                cmdline_addr=CMDLINE_START,
                cmdline_size=len(cmdline) + 1,
                initrd=initrd,
                setup_header=self.kernel.setup_header,
            ),
        )

        self.io_bus = Bus("port I/O bus")
        self.mmio_bus = Bus("MMIO bus")
        self.serial_irq = EventFdIrq(SERIAL_IRQ)
        self.vm.register_irqfd(self.serial_irq.fd, SERIAL_IRQ)
        self.serial = Serial(self.serial_irq, console_out)
        self.io_bus.insert(self.serial, SERIAL_PORT, SERIAL_PORT_LEN, "serial (ttyS0)")
        self.io_bus.insert(
            I8042(self._on_guest_reset), I8042_PORT, I8042_PORT_LEN, "i8042 controller"
        )
        below_4g = min(cfg.mem_bytes, PCI_HOLE_START)
        self.io_bus.insert(
            Cmos(below_4g, cfg.mem_bytes - below_4g), CMOS_PORT, CMOS_PORT_LEN, "CMOS/RTC"
        )
        self._build_pci()
        write_gdt(self.mem)
        write_page_tables(self.mem)
        write_mptable(self.mem, cfg.cpus, self.pci_irqs)

        self.stdin_pump = (
            StdinPump(console_in_fd, self.serial.queue_input) if console_in_fd is not None else None
        )

        supported = self.kvm.supported_cpuid()
        tsc_deadline = bool(self.kvm.check_extension(Cap.KVM_CAP_TSC_DEADLINE_TIMER))
        has_xcrs = bool(self.kvm.check_extension(Cap.KVM_CAP_XCRS))
        self.vcpus: list[Vcpu] = []
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            entries = cpuid.vcpu_cpuid(supported, i, cfg.cpus, tsc_deadline)
            vcpu.set_cpuid(entries)
            xcr0 = cpuid.xsave_features(entries)
            if xcr0 is not None and has_xcrs:
                vcpu.set_xcr0(xcr0)
            vcpu.set_msrs(msrs.boot_msrs())
            regs.setup_fpu(vcpu)
            regs.setup_lint(vcpu)
        # The other vCPUs wait in the in-kernel LAPIC for the guest's INIT/SIPI.
        regs.setup_boot_vcpu(self.vcpus[0], self.kernel.entry, self.zero_page)
        self.coalesced = self._coalesce_pci_config_address()

    def _coalesce_pci_config_address(self) -> CoalescedRing | None:
        """Let the kernel record writes to the PCI configuration address (0xcf8) instead of
        exiting: each is followed by an access to 0xcfc that exits anyway, and the ring is
        replayed before any exit is handled. A byte write to 0xcf9 (reset control) is in the
        same zone and so takes effect at the next exit, not at once."""
        page = self.kvm.check_extension(Cap.KVM_CAP_COALESCED_MMIO)
        if not page or not self.kvm.check_extension(Cap.KVM_CAP_COALESCED_PIO):
            return None
        self.vm.register_coalesced_zone(CONFIG_ADDRESS_PORT, CONFIG_ADDRESS_LEN, pio=True)
        ring = self.vcpus[0].coalesced_ring(page)
        ring.add_zone(CONFIG_ADDRESS_PORT, CONFIG_ADDRESS_LEN, pio=True)
        return ring

    def _build_pci(self) -> None:
        """PCI bus 0 with a virtio device per disk, then virtio-rng."""
        self.gsi_router = GsiRouter(self.vm.fd)
        self.pci = PciRoot(self.mmio_bus, self.allocator.allocate_mmio, self._on_guest_reset)
        self.io_bus.insert(self.pci, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN, "PCI config (CF8)")
        self.pci_irqs: list[tuple[int, int]] = []
        self.virtio_devices: list[VirtioPciDevice] = []
        self._intx_lines: list[LevelIrq] = []
        any_length = bool(self.kvm.check_extension(Cap.KVM_CAP_IOEVENTFD_ANY_LENGTH))
        notify_len = 0 if any_length else 2

        def add_ioeventfd(fd: int, addr: int, length: int) -> None:
            self.vm.register_ioeventfd(fd, addr, notify_len)

        def remove_ioeventfd(fd: int, addr: int, length: int) -> None:
            self.vm.unregister_ioeventfd(fd, addr, notify_len)

        backends: list[VirtioDevice] = [*self._disks(), Rng()]
        for backend in backends:
            gsi = PCI_INTX_FIRST_GSI + len(self.pci_irqs) % PCI_INTX_GSIS
            # Each function gets its own level line on the (shared) pin: KVM ORs them.
            intx = LevelIrq(gsi)
            self._intx_lines.append(intx)
            self.vm.register_irqfd(intx.fd, gsi, resample_fd=intx.resample_fd)
            device = VirtioPciDevice(
                backend,
                self.mem,
                intx,
                allocate_gsi=functools.partial(self._allocate_msi, backend.name),
                set_msi_route=self.gsi_router.set_msi,
                register_irqfd=self.vm.register_irqfd,
                register_ioeventfd=add_ioeventfd,
                unregister_ioeventfd=remove_ioeventfd,
            )
            slot = self.pci.add_device(device)
            self.virtio_devices.append(device)
            self.pci_irqs.append((slot, gsi))

    def _allocate_msi(self, what: str) -> int:
        return self.gsi_router.add_msi(self.allocator.allocate_gsi(f"{what} MSI-X"))

    def _disks(self) -> list[VirtioDevice]:
        disks: list[VirtioDevice] = []
        for i, spec in enumerate(self.config.disks):
            name = disk_name(i)
            disk = open_disk(spec.path, spec.writable, spec.flag)
            disks.append(Block(disk, name=name, serial=f"pyvmm-{name}"))
        return disks

    def request_exit(self, exit: VmExit) -> None:
        """Record why the VM ends (first reason wins) and wake the main thread."""
        with self._exit_lock:
            if self._exit is None:
                self._exit = exit
        self._exit_event.set()
        with self._run_state:
            self._run_state.notify_all()

    def pause(self) -> None:
        """Park every vCPU outside KVM_RUN and every device worker; return once all are parked.
        Raises SuspendError naming what did not park in time (the VM then goes on running)."""
        with self._run_state:
            if self._pause_requested:
                return
            self._pause_requested = True
        self._kick_vcpus()
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        with self._run_state:
            self._run_state.wait_for(
                lambda: not self._unparked() or self._exit_event.is_set(), timeout=PAUSE_TIMEOUT_S
            )
            late = [f"vCPU {vcpu.id}" for vcpu in self._unparked()]
        for device in self.virtio_devices:
            if not device.pause(max(0.0, deadline - time.monotonic())):
                late.append(f"virtio {device.name}")
        if late and not self._exit_event.is_set():
            self.resume()
            raise SuspendError(
                f"suspend failed: {', '.join(late)} did not park within {PAUSE_TIMEOUT_S:g} s; "
                "the VM goes on running"
            )

    def resume(self) -> None:
        for device in self.virtio_devices:
            device.resume()
        with self._run_state:
            self._pause_requested = False
            self._run_state.notify_all()

    def _unparked(self) -> list[Vcpu]:
        """The vCPUs whose threads run and are not parked (call with _run_state held)."""
        return [
            vcpu
            for vcpu, t in zip(self.vcpus, self._threads, strict=False)
            if t.is_alive() and t not in self._parked
        ]

    def _park(self) -> None:
        me = threading.current_thread()
        with self._run_state:
            self._parked.add(me)
            self._run_state.notify_all()
            self._run_state.wait_for(lambda: not self._pause_requested or self._exit_event.is_set())
            self._parked.discard(me)

    def _kick_vcpus(self) -> None:
        """Bring every vCPU out of KVM_RUN (now, or as soon as it next enters)."""
        for vcpu in self.vcpus:
            vcpu.request_exit()
        for t in self._threads:
            if t.is_alive() and t.ident is not None:
                signal.pthread_kill(t.ident, KICK_SIGNAL)

    def _on_guest_reset(self) -> None:
        self.request_exit(VmExit(0, "guest reset"))

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        io_bus, mmio_bus, ring = self.io_bus, self.mmio_bus, self.coalesced
        ring_indexes = ring.indexes if ring is not None else _no_ring
        try:
            while not self._exit_event.is_set():
                if self._pause_requested:
                    self._park()
                    continue
                ex = vcpu.run()
                first, last = ring_indexes()
                if first != last:
                    assert ring is not None
                    ring.drain(io_bus.write, mmio_bus.write)
                if type(ex) is IoExit:
                    if ex.count == 1:
                        if ex.is_write:
                            io_bus.write(ex.port, ex.data)
                        elif not io_bus.read(ex.port, ex.data):
                            ex.data[:] = _ALL_ONES[: ex.size]
                        continue
                    size = ex.size
                    for i in range(ex.count):  # rep ins/outs: one access per element
                        chunk = ex.data[i * size : (i + 1) * size]
                        if ex.is_write:
                            io_bus.write(ex.port, chunk)
                        elif not io_bus.read(ex.port, chunk):
                            chunk[:] = _ALL_ONES[:size]
                elif isinstance(ex, MmioExit):
                    if ex.is_write:
                        mmio_bus.write(ex.addr, ex.data)
                    elif not mmio_bus.read(ex.addr, ex.data):
                        ex.data[:] = b"\xff" * len(ex.data)
                elif isinstance(ex, InterruptedExit):
                    continue
                elif isinstance(ex, ShutdownExit):
                    self.request_exit(VmExit(0, "guest reset (triple fault)"))
                elif isinstance(ex, SystemEventExit):
                    if ex.type == SYSTEM_EVENT_CRASH:
                        self.request_exit(VmExit(1, f"vCPU {vcpu.id}: guest crashed"))
                    else:
                        self.request_exit(VmExit(0, "guest shut down"))
                elif isinstance(ex, HltExit):
                    self.request_exit(VmExit(1, f"vCPU {vcpu.id}: halted outside the irqchip"))
                elif isinstance(ex, FailEntryExit):
                    self.request_exit(
                        VmExit(1, f"vCPU {vcpu.id}: KVM entry failed (reason {ex.reason:#x})")
                    )
                elif isinstance(ex, InternalErrorExit):
                    self.request_exit(
                        VmExit(1, f"vCPU {vcpu.id}: KVM internal error (suberror {ex.suberror})")
                    )
                elif isinstance(ex, UnknownExit):
                    self.request_exit(
                        VmExit(
                            1,
                            f"vCPU {vcpu.id}: unhandled exit {ex.exit_reason} "
                            f"(hardware reason {ex.hardware_exit_reason:#x})",
                        )
                    )
        except Exception as e:
            log.debug("vCPU %d failed", vcpu.id, exc_info=True)
            self.request_exit(VmExit(1, f"vCPU {vcpu.id}: {e}"))

    def run(self) -> VmExit:
        """Run until the guest resets, a signal arrives or a vCPU fails. Must be called from the
        main thread (it installs the vCPU kick signal handler)."""
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        if self.stdin_pump is not None:
            self.stdin_pump.start()
        for vcpu in self.vcpus:
            t = threading.Thread(
                target=self._vcpu_loop, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True
            )
            self._threads.append(t)
            t.start()
        while not self._exit_event.wait(0.5):
            pass
        self._stop_vcpus()
        assert self._exit is not None
        return self._exit

    def _stop_vcpus(self) -> None:
        """Bring every vCPU thread to an end, within STOP_TIMEOUT_S; one that does not end is
        reported and abandoned (a daemon thread, whose vCPU is never closed under it)."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            self._kick_vcpus()
            for t in self._threads:
                t.join(0.05)
        for vcpu, t in zip(self.vcpus, self._threads, strict=True):
            if t.is_alive():
                log.warning("vCPU %d did not stop within %g s; abandoned", vcpu.id, STOP_TIMEOUT_S)
                self._abandoned_vcpus.add(vcpu.id)
        self._threads.clear()

    def close(self) -> None:
        """Release everything the VM holds; each wait on the way is bounded."""
        control = getattr(self, "control", None)
        if control is not None:
            control.close()
            self.control = None
        pump = getattr(self, "stdin_pump", None)
        if pump is not None:
            pump.stop(timeout=STOP_TIMEOUT_S)
        for device in getattr(self, "virtio_devices", []):
            device.close()
        for line in getattr(self, "_intx_lines", []):
            line.close()
        ring = getattr(self, "coalesced", None)
        if ring is not None:
            ring.close()
            self.coalesced = None
        for vcpu in getattr(self, "vcpus", []):
            if vcpu.id not in self._abandoned_vcpus:  # its thread may still be in KVM_RUN
                vcpu.close()
        if hasattr(self, "vm"):
            self.vm.close()
        if hasattr(self, "mem"):
            self.mem.close()
        if hasattr(self, "serial_irq"):
            self.serial_irq.close()
        self.kvm.close()
        flush_guest_logs()
