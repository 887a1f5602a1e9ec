"""Builds a VM from a VmConfig and runs it: the one place that wires KVM, memory, devices, vCPUs.

What differs between architectures (where memory and MMIO go, the boot tables, the platform
devices, how PCI configuration space is reached, the initial vCPU state) comes from an `Arch`
(pyvmm.arch); the vCPU threads are `pyvmm.vcpu_threads`. Everything here is the same on every
architecture.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, BinaryIO

from pyvmm.arch.host import host_arch
from pyvmm.arch.interface import Arch, GuestImage, Platform
from pyvmm.balloon_control import BalloonControl
from pyvmm.balloon_policy import LowMemoryPolicy, PolicyTimes, pick_source
from pyvmm.config import BalloonConfig, ConfigError, VmConfig
from pyvmm.control import ControlServer
from pyvmm.devices.bus import Bus
from pyvmm.devices.child import BalloonSpec, DeviceSpec, DiskSpec, TapSpec, VsockSpec
from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.pci.device import VmCalls
from pyvmm.devices.pci.root import PciRoot
from pyvmm.devices.proxy import DeviceProcessError, ProxyDevice, start_device
from pyvmm.devices.spawner import DeviceSpawner, SpawnError
from pyvmm.devices.virtio.balloon import Balloon
from pyvmm.devices.virtio.block import Block
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.net import Net
from pyvmm.devices.virtio.pci import VirtioPciDevice, plain_bar_sizes
from pyvmm.devices.virtio.rng import Rng
from pyvmm.devices.virtio.vhost_net import VhostNet
from pyvmm.devices.virtio.vhost_vsock import VhostVsock
from pyvmm.devices.virtio.vsock import Vsock
from pyvmm.disk import Disk, open_disk
from pyvmm.kvm import Kvm, Vcpu, Vm
from pyvmm.kvm.abi import Cap
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.routing import GsiRouter
from pyvmm.loader import build_cmdline
from pyvmm.memory import GuestMemory, shmem_huge_pages
from pyvmm.net import parse_mac
from pyvmm.net.host import configure as configure_host_side
from pyvmm.net.tap import Tap
from pyvmm.ratelimit import flush_all as flush_guest_logs
from pyvmm.sandbox.seccomp import load_filter, policy_dir
from pyvmm.terminal import StdinPump
from pyvmm.unix_listener import UnixListener
from pyvmm.vcpu_threads import VcpuThreads, VmExit
from pyvmm.vhost import (
    VHOST_NET_PATH,
    VHOST_VSOCK_PATH,
    Vhost,
    VhostError,
    open_vhost,
    open_vhost_net,
)
from pyvmm.vsock.dialer import Dialer, DialRequests

__all__ = ["SuspendError", "VmExit", "Vmm", "disk_name"]

log = logging.getLogger(__name__)

# How long suspend waits for vCPUs and device workers to park, and exit for vCPUs to stop.
PAUSE_TIMEOUT_S = 10.0
VSOCK_BACKLOG = 64
STOP_TIMEOUT_S = 10.0
EXIT_START_FAILED = 1  # pyvmm's status when a device process could not start


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


@dataclass
class Nic:
    """A NIC's host side: its TAP, and /dev/vhost-net when the kernel runs its queues."""

    tap: Tap
    vhost_fd: int | None

    def close(self) -> None:
        self.tap.close()
        if self.vhost_fd is not None:
            os.close(self.vhost_fd)
            self.vhost_fd = None


@dataclass
class VsockHost:
    """The vsock device's host side: the socket host programs connect to, and the dialer that
    joins the guest to host listeners (PATH_<port>), which runs in this process."""

    cid: int
    listener: UnixListener
    dialer: Dialer

    @classmethod
    def open(cls, cid: int, path: str) -> VsockHost:
        dialer = Dialer(path)
        try:
            listener = UnixListener(path, VSOCK_BACKLOG, "--vsock-uds")
        except BaseException:
            dialer.close()
            raise
        dialer.start()
        return cls(cid, listener, dialer)

    def dial_requests(self) -> DialRequests:
        """The device's end of the dialer (a socket of its own: the device closes it)."""
        return DialRequests(self.dialer.device_end.dup())

    def handed_over(self) -> None:
        """The device process holds the listening socket and its end of the dialer now."""
        self.listener.sock.close()
        self.dialer.device_end.close()

    def close(self) -> None:
        """At the VM's end: the socket file goes, the dialer stops."""
        self.listener.close()
        self.dialer.close()


@dataclass
class VsockKernel:
    """/dev/vhost-vsock with the guest's CID claimed: the host kernel runs the vsock device."""

    cid: int
    vhost_fd: int

    @classmethod
    def open(cls, cid: int) -> VsockKernel:
        flag = f"--cid {cid}"
        fd = open_vhost(VHOST_VSOCK_PATH, flag)
        if fd is None:
            raise VhostError(
                f"{flag}: {VHOST_VSOCK_PATH} does not exist (load it: modprobe vhost_vsock), "
                "and without it host programs need pyvmm's own device: --vsock-uds PATH"
            )
        try:
            Vhost(fd, "vhost-vsock").set_guest_cid(cid, flag)
        except BaseException:
            os.close(fd)
            raise
        return cls(cid, fd)

    def close(self) -> None:
        if self.vhost_fd >= 0:
            os.close(self.vhost_fd)
            self.vhost_fd = -1


# What each virtio device is backed by: a disk image, a NIC's TAP, the vsock host side (pyvmm's
# or the kernel's), the balloon's settings, or nothing (the rng).
Backing = Disk | Nic | VsockHost | VsockKernel | BalloonConfig | None


def _device_kind(backing: Backing) -> str:
    """What a virtio device's process builds, and the name of its seccomp policy."""
    if isinstance(backing, Nic):
        return "net_device" if backing.vhost_fd is None else "vhost_net_device"
    if isinstance(backing, VsockHost):
        return "vsock_device"
    if isinstance(backing, VsockKernel):
        return "vhost_vsock_device"
    if isinstance(backing, BalloonConfig):
        return "balloon_device"
    return "rng_device" if backing is None else "block_device"


def _backend(name: str, backing: Backing, mac: bytes | None) -> VirtioDevice:
    """The device itself, for a device in this process."""
    if isinstance(backing, Nic):
        if backing.vhost_fd is not None:
            return VhostNet(backing.tap, Vhost(backing.vhost_fd), name, mac)
        return Net(backing.tap, name, mac)
    if isinstance(backing, VsockHost):
        return Vsock(backing.cid, backing.listener.sock, backing.dial_requests(), name)
    if isinstance(backing, VsockKernel):
        vhost = Vhost(backing.vhost_fd, "vhost-vsock")
        backing.vhost_fd = -1  # the device's now
        return VhostVsock(backing.cid, vhost, name)
    if isinstance(backing, BalloonConfig):
        return Balloon(backing.page_reporting)
    if backing is None:
        return Rng()
    return Block(backing, name=name, serial=f"pyvmm-{name}")


def _tap_spec(nic: Nic, mac: bytes | None) -> TapSpec:
    tap = nic.tap
    return TapSpec(tap.fd, tap.name, tap.created, mac.hex() if mac else None, nic.vhost_fd)


def _vsock_spec(host: VsockHost | VsockKernel) -> VsockSpec:
    if isinstance(host, VsockKernel):
        return VsockSpec(host.cid, vhost_fd=host.vhost_fd)
    return VsockSpec(host.cid, host.listener.sock.fileno(), host.dialer.device_end.fileno())


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

    def balloon(self, num_bytes: int) -> None:
        self._balloon().set_target(num_bytes)

    def balloon_stats(self, fresh: bool) -> dict[str, Any]:
        return self._balloon().stats(fresh)

    def _balloon(self) -> BalloonControl:
        if self._vmm.balloon is None:
            raise ValueError("this VM has no balloon (it was started with --no-balloon)")
        return self._vmm.balloon


class Vmm:
    """A built VM. `run()` starts the vCPUs and returns when the guest resets or is stopped."""

    def __init__(
        self,
        config: VmConfig,
        console_out: BinaryIO,
        console_in_fd: int | None = None,
        arch: Arch | None = None,
    ) -> None:
        self.config = config
        self.arch = arch or host_arch()
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._exit_event = threading.Event()
        self._pause_lock = threading.Lock()
        self._paused = False
        self.control: ControlServer | None = None
        self._vsock_host: VsockHost | None = None
        self.balloon: BalloonControl | None = None
        self.kvm = Kvm(config.kvm_path, self.arch.required_caps)
        try:
            self._build(console_out, console_in_fd)
            if config.socket is not None:
                self.control = ControlServer(config.socket, _VmControl(self))
        except BaseException:
            self.close()
            raise

    def _build(self, console_out: BinaryIO, console_in_fd: int | None) -> None:
        cfg, arch = self.config, self.arch
        if cfg.sandbox:
            # First: the zygote's interpreter imports while this process builds the VM.
            try:
                self._spawner: DeviceSpawner | None = DeviceSpawner()
            except SpawnError as exc:
                raise DeviceProcessError(f"device processes: {exc}") from None
        self.vm = Vm(self.kvm)
        arch.configure_vm(self.vm)
        self.allocator = arch.allocator(self.kvm)
        self.mem = GuestMemory(arch.ram_ranges(cfg.mem_bytes))
        log.debug("guest RAM: huge pages in shared memory are %r on this host", shmem_huge_pages())
        for region in self.mem.regions:
            self.vm.set_user_memory_region(
                self.allocator.allocate_slot("guest RAM"),
                region.guest_addr,
                region.size,
                region.host_addr,
                readonly=region.readonly,
            )

        root = [d for d in cfg.disks if d.root]
        root_params = [f"root=/dev/vda {'rw' if root[0].writable else 'ro'}"] if root else []
        cmdline = build_cmdline(arch.default_cmdline, [*root_params, *cfg.params])
        self.guest: GuestImage = arch.load_guest(self.mem, cfg.kernel, cmdline, cfg.initrd)
        # The vCPUs before any device: arm64's vGIC is initialised once every vCPU is, and only
        # then does KVM take irqfds (KVM_IRQFD fails with EAGAIN before).
        self.vcpus: list[Vcpu] = [self.vm.create_vcpu(i) for i in range(cfg.cpus)]
        arch.setup_vcpus(self.kvm, self.vcpus, self.guest)

        self.io_bus = Bus("port I/O bus")
        self.mmio_bus = Bus("MMIO bus")
        buses = (self.io_bus, self.mmio_bus)
        self.platform: Platform = arch.add_platform_devices(
            self.vm, self.mem, buses, console_out, self._on_guest_reset
        )
        self._build_pci()
        device_tree = arch.write_boot_tables(self.mem, self.guest, cfg.cpus, self.pci_irqs)
        if cfg.dump_device_tree is not None and device_tree is not None:
            _dump_device_tree(cfg.dump_device_tree, device_tree)

        self.stdin_pump = (
            StdinPump(console_in_fd, self.platform.serial.queue_input)
            if console_in_fd is not None
            else None
        )
        self.coalesced = self._coalesced_ring()
        self.vcpu_threads = VcpuThreads(
            self.vcpus,
            self.io_bus,
            self.mmio_bus,
            self.coalesced,
            self.request_exit,
            self.arch.describe_vcpu,
        )

    def _coalesced_ring(self) -> CoalescedRing | None:
        """The ring of the architecture's coalesced zones, if KVM can coalesce their writes."""
        zones = self.arch.coalesced_zones()
        page = self.kvm.check_extension(Cap.KVM_CAP_COALESCED_MMIO)
        if not zones or not page:
            return None
        if any(z.pio for z in zones) and not self.kvm.check_extension(Cap.KVM_CAP_COALESCED_PIO):
            return None
        ring = self.vcpus[0].coalesced_ring(page)
        for zone in zones:
            self.vm.register_coalesced_zone(zone.addr, zone.size, pio=zone.pio)
            ring.add_zone(zone.addr, zone.size, pio=zone.pio)
        return ring

    def _build_pci(self) -> None:
        """PCI bus 0 with a virtio device per disk, then per NIC, then virtio-rng: each in a
        device process of its own (multiprocess mode), or in this process."""
        self.gsi_router = GsiRouter(self.vm.fd, self.arch.irqchip_routes())
        self.pci = PciRoot(self.mmio_bus, self.allocator.allocate_mmio)
        self.arch.attach_pci(self.pci, (self.io_bus, self.mmio_bus), self._on_guest_reset)
        self.pci_irqs: list[tuple[int, int]] = []
        self.virtio_devices: list[VirtioPciDevice | ProxyDevice] = []
        self._intx_lines: list[LevelIrq] = []
        any_length = bool(self.kvm.check_extension(Cap.KVM_CAP_IOEVENTFD_ANY_LENGTH))
        notify_len = 0 if any_length else 2

        def add_ioeventfd(fd: int, addr: int, length: int) -> None:
            self.vm.register_ioeventfd(fd, addr, notify_len)

        def remove_ioeventfd(fd: int, addr: int, length: int) -> None:
            self.vm.unregister_ioeventfd(fd, addr, notify_len)

        disks = self._open_disks()
        nics = self._open_nics()
        vsock = self.config.vsock
        vsocks: list[Backing] = []
        if vsock is not None and vsock.uds is not None:
            self._vsock_host = VsockHost.open(vsock.cid, vsock.uds)
            vsocks.append(self._vsock_host)
        elif vsock is not None:
            vsocks.append(VsockKernel.open(vsock.cid))
        balloon = self.config.balloon
        backings: list[Backing] = [*disks, *nics, *vsocks, None, *([balloon] if balloon else [])]
        names = [
            *(disk_name(i) for i in range(len(disks))),
            *(f"net{i}" for i in range(len(nics))),
            *("vsock" for _ in vsocks),
            "rng",
            *(["balloon"] if balloon else []),
        ]
        macs = {f"net{i}": parse_mac(n.mac) for i, n in enumerate(self.config.nets) if n.mac}
        if self.config.sandbox:
            self._policy_dir = policy_dir(self.config.seccomp_policy_dir)
            # Read and compiled here first, so that a bad policy stops pyvmm before the guest
            # starts (the device processes, which compile their own, start in the background).
            for kind in sorted({_device_kind(b) for b in backings}):
                load_filter(self._policy_dir, kind).close()
        for index, (name, backing) in enumerate(zip(names, backings, strict=True)):
            gsi = self.arch.pci_intx_gsi(index)
            # Each function gets its own level line on the (shared) pin: KVM ORs them.
            intx = LevelIrq(gsi)
            self._intx_lines.append(intx)
            self.vm.register_irqfd(intx.fd, gsi, resample_fd=intx.resample_fd)
            services = VmCalls(
                allocate_gsi=functools.partial(self._allocate_msi, name),
                set_msi_route=self.gsi_router.set_msi,
                register_irqfd=self.vm.register_irqfd,
                register_ioeventfd=add_ioeventfd,
                unregister_ioeventfd=remove_ioeventfd,
            )
            mac = macs.get(name)
            if self.config.sandbox:
                # Every process starts at once; none is waited for here (see _start_devices).
                spec = self._device_spec(name, backing, mac, intx)
                assert self._spawner is not None
                self.virtio_devices.append(start_device(spec, services, self._spawner))
            else:
                backend = _backend(name, backing, mac)
                self.virtio_devices.append(VirtioPciDevice(backend, self.mem, intx, services))
        for device, line in zip(self.virtio_devices, self._intx_lines, strict=True):
            self.pci_irqs.append((self.pci.add_device(device), line.gsi))
        if balloon is not None:
            self._start_balloon(balloon, self.virtio_devices[-1])
        if self.config.sandbox:
            for backing in backings:
                if isinstance(backing, VsockHost):
                    backing.handed_over()
                elif backing is not None and not isinstance(backing, BalloonConfig):
                    backing.close()  # the device processes have the images and TAPs now
            self._starter = threading.Thread(target=self._start_devices, name="device start")
            self._starter.start()

    def _start_balloon(self, config: BalloonConfig, device: VirtioPciDevice | ProxyDevice) -> None:
        """The balloon's control, and its low-memory policy where the guest is large enough to
        give memory back (a source that cannot be read stops pyvmm here, with its reason)."""
        self.balloon = BalloonControl(device, self.config.mem_bytes, self.mem.memfd)
        if config.low_mem_dir is None:
            source = pick_source(config.low_mem_margin_mib)
        else:
            source = pick_source(config.low_mem_margin_mib, chromeos_dir=Path(config.low_mem_dir))
        times = PolicyTimes()
        if config.policy_timers is not None:
            recheck, leave_first, leave_every = config.policy_timers
            times = PolicyTimes(
                recheck_s=recheck,
                recheck_jitter_s=recheck / 16,
                leave_first_s=leave_first,
                leave_every_s=leave_every,
                leave_jitter_s=leave_every / 20,
                sample_s=min(recheck, times.sample_s),
            )
        policy = LowMemoryPolicy(self.config.mem_bytes, source, times=times)
        if policy.max_bytes:
            log.debug("balloon: low-memory policy on %s, at most %d MiB", source.describe(),
                      policy.max_bytes >> 20)  # fmt: skip
            self.balloon.start_policy(policy)

    def _start_devices(self) -> None:
        """Wait for the device processes to be built while the VM goes on starting (a guest
        reaches its PCI devices late); one that cannot start ends the VM with its reason."""
        self._close_spawner()  # every device process is forked by now
        for device in self.virtio_devices:
            if isinstance(device, ProxyDevice):
                try:
                    device.wait_ready()
                except DeviceProcessError as exc:
                    self.request_exit(VmExit(EXIT_START_FAILED, str(exc)))
                    return

    def _close_spawner(self) -> None:
        spawner = getattr(self, "_spawner", None)
        if spawner is not None:
            spawner.close()

    def _device_spec(
        self, name: str, backing: Backing, mac: bytes | None, intx: LevelIrq
    ) -> DeviceSpec:
        cfg = self.config
        bars = [
            (index, self.allocator.allocate_mmio(size, f"{name} BAR{index}"), size)
            for index, size in plain_bar_sizes().items()
        ]
        return DeviceSpec(
            name=name,
            kind=_device_kind(backing),
            parent_pid=0,  # spawn fills in the socket and this process's pid
            sock=-1,
            memfd=self.mem.memfd,
            ram=[(r.guest_addr, r.size) for r in self.mem.ram_regions],
            intx=(intx.gsi, intx.fd, intx.resample_fd),
            disk=None
            if backing is None or isinstance(backing, Nic | VsockHost | VsockKernel | BalloonConfig)
            else DiskSpec(backing.fd, backing.path, backing.writable, f"pyvmm-{name}"),
            tap=_tap_spec(backing, mac) if isinstance(backing, Nic) else None,
            vsock=_vsock_spec(backing) if isinstance(backing, VsockHost | VsockKernel) else None,
            balloon=BalloonSpec(backing.page_reporting)
            if isinstance(backing, BalloonConfig)
            else None,
            policy_dir=str(self._policy_dir),
            log_failures=cfg.seccomp_log_failures,
            jail=True,
            bars=bars,
        )

    def _allocate_msi(self, what: str) -> int:
        return self.gsi_router.add_msi(self.allocator.allocate_gsi(f"{what} MSI-X"))

    def _open_disks(self) -> list[Disk]:
        return [open_disk(d.path, d.writable, d.flag) for d in self.config.disks]

    def _open_nics(self) -> list[Nic]:
        """Each NIC's TAP (made and given its host address, or the caller's, checked), and
        /dev/vhost-net as --net-vhost asks."""
        nics: list[Nic] = []
        try:
            for net in self.config.nets:
                if net.tap_fd is not None:
                    tap = Tap.from_fd(net.tap_fd)
                else:
                    assert net.host_ip is not None and net.netmask is not None
                    tap = Tap.create(net.flag)
                nics.append(Nic(tap, None))
                if net.tap_fd is None:
                    host, mask = IPv4Address(net.host_ip), IPv4Address(net.netmask)
                    configure_host_side(tap.name, host, mask)
                nics[-1].vhost_fd = self._open_vhost()
        except BaseException:
            for nic in nics:
                nic.close()
            raise
        return nics

    def _open_vhost(self) -> int | None:
        mode = self.config.net_vhost
        if mode == "off":
            return None
        try:
            fd = open_vhost_net(f"--net-vhost {mode}")
        except VhostError as e:
            if mode == "on":
                raise
            log.info("%s; NICs use pyvmm's own device", e)
            return None
        if fd is None and mode == "on":
            raise VhostError(
                f"--net-vhost on: {VHOST_NET_PATH} does not exist (load it: modprobe vhost_net)"
            )
        return fd

    def request_exit(self, exit: VmExit) -> None:
        """Record why the VM ends (first reason wins), stop the vCPUs at their next exit and
        wake the main thread."""
        with self._exit_lock:
            if self._exit is None:
                self._exit = exit
        self._exit_event.set()
        threads = getattr(self, "vcpu_threads", None)
        if threads is not None:
            threads.request_stop()

    def pause(self) -> None:
        """Park every vCPU outside KVM_RUN and every device worker; return once all are parked.
        Raises SuspendError naming what did not park in time (the VM then goes on running)."""
        with self._pause_lock:
            if self._paused:
                return
            deadline = time.monotonic() + PAUSE_TIMEOUT_S
            late = self.vcpu_threads.pause(PAUSE_TIMEOUT_S)
            for device in self.virtio_devices:
                if not device.pause(max(0.0, deadline - time.monotonic())):
                    late.append(f"virtio {device.name}")
            self._paused = True
        if late and not self._exit_event.is_set():
            self.resume()
            raise SuspendError(
                f"suspend failed: {', '.join(late)} did not park within {PAUSE_TIMEOUT_S:g} s; "
                "the VM goes on running"
            )

    def resume(self) -> None:
        with self._pause_lock:
            for device in self.virtio_devices:
                device.resume()
            self.vcpu_threads.resume()
            self._paused = False

    def _on_guest_reset(self) -> None:
        self.request_exit(VmExit(0, "guest reset"))

    def run(self) -> VmExit:
        """Run until the guest resets, a signal arrives or a vCPU fails. Must be called from the
        main thread (the vCPU threads' kick signal handler is installed there)."""
        if self.stdin_pump is not None:
            self.stdin_pump.start()
        self.vcpu_threads.start()
        while not self._exit_event.wait(0.5):
            pass
        self.vcpu_threads.stop(STOP_TIMEOUT_S)
        assert self._exit is not None
        return self._exit

    def close(self) -> None:
        """Release everything the VM holds; each wait on the way is bounded."""
        control = getattr(self, "control", None)
        if control is not None:
            control.close()
            self.control = None
        pump = getattr(self, "stdin_pump", None)
        if pump is not None:
            pump.stop(timeout=STOP_TIMEOUT_S)
        if self.balloon is not None:
            self.balloon.close()
        for device in getattr(self, "virtio_devices", []):
            device.close()
        starter = getattr(self, "_starter", None)
        if starter is not None:
            starter.join(STOP_TIMEOUT_S)  # its waits end once the processes are gone
        self._close_spawner()
        if self._vsock_host is not None:
            self._vsock_host.close()
            self._vsock_host = None
        for line in getattr(self, "_intx_lines", []):
            line.close()
        ring = getattr(self, "coalesced", None)
        if ring is not None:
            ring.close()
            self.coalesced = None
        threads = getattr(self, "vcpu_threads", None)
        abandoned = threads.abandoned if threads is not None else set()
        for vcpu in getattr(self, "vcpus", []):
            if vcpu.id not in abandoned:  # an abandoned thread may still be in KVM_RUN
                vcpu.close()
        if hasattr(self, "vm"):
            self.vm.close()
        if hasattr(self, "mem"):
            self.mem.close()
        if hasattr(self, "platform"):
            self.platform.close()
        self.kvm.close()
        flush_guest_logs()


def _dump_device_tree(path: str, blob: bytes) -> None:
    """--dump-device-tree-blob: the tree as the guest gets it, for dtc or a comparison."""
    try:
        Path(path).write_bytes(blob)
    except OSError as e:
        raise ConfigError(f"--dump-device-tree-blob {path}: {e.strerror}") from e
