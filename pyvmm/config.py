"""A validated, typed VM configuration: user errors are found here, once, before any KVM work."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
from dataclasses import dataclass, field

from pyvmm.arch.host import host_arch
from pyvmm.arch.interface import Arch
from pyvmm.files import FileKindError, check_kind
from pyvmm.memory import MAX_MEM_MIB
from pyvmm.net import parse_mac
from pyvmm.net.tap import TapError, check_tap_fd
from pyvmm.unix_listener import socket_is_live
from pyvmm.vsock.dialer import DialerError
from pyvmm.vsock.dialer import check_path as check_dial_path
from pyvmm.vsock.packet import check_guest_cid

DEFAULT_MEM_MIB = 256
DEFAULT_CPUS = 1
MIN_MEM_MIB = 2
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
SOCKET_FLAG = "-s/--socket"
VSOCK_UDS_FLAG = "--vsock-uds"


@dataclass(frozen=True)
class DiskConfig:
    """One virtio-blk disk, in the order the guest sees them (vda, vdb, ...)."""

    path: str
    writable: bool
    root: bool = False

    @property
    def flag(self) -> str:
        if self.root:
            return "--rwroot" if self.writable else "-r/--root"
        return "--rwdisk" if self.writable else "-d/--disk"


@dataclass(frozen=True)
class NetConfig:
    """One virtio-net device: a TAP pyvmm creates and gives the host address (`--host_ip`,
    `--netmask`, `--mac`, as crosvm has them), or one the caller opened (`--tap-fd`)."""

    host_ip: str | None = None
    netmask: str | None = None
    mac: str | None = None
    tap_fd: int | None = None

    @property
    def flag(self) -> str:
        return "--host_ip" if self.tap_fd is None else f"--tap-fd {self.tap_fd}"


@dataclass(frozen=True)
class VsockConfig:
    """The guest's virtio-vsock device: its context ID (`--cid`), and the Unix socket host
    programs reach it through (`--vsock-uds`; guest connections to host port P go to PATH_P),
    which pyvmm's own device serves. Without it the host kernel's vhost-vsock runs the device
    and host programs use AF_VSOCK sockets."""

    cid: int
    uds: str | None = None


@dataclass(frozen=True)
class BalloonConfig:
    """The virtio-balloon device (on unless `--no-balloon`): free page reporting
    (`--balloon-page-reporting`), and the low-memory policy's margin and, for tests only, its
    timer lengths in seconds (re-check, first "no longer low" check, every one after)."""

    page_reporting: bool = False
    low_mem_margin_mib: int | None = None  # None: the policy's default
    # Chrome OS's low-memory directory (`available`, `margin`), or another laid out the same.
    low_mem_dir: str | None = None
    policy_timers: tuple[float, float, float] | None = None


class ConfigError(Exception):
    """A user-supplied setting is invalid; the message names the flag or file at fault."""


@dataclass(frozen=True)
class VmConfig:
    kernel: str
    mem_mib: int = DEFAULT_MEM_MIB
    cpus: int = DEFAULT_CPUS
    params: tuple[str, ...] = field(default_factory=tuple)
    initrd: str | None = None
    kvm_path: str = "/dev/kvm"
    # The control socket's path; validate() turns a directory into a file name in it.
    socket: str | None = None
    disks: tuple[DiskConfig, ...] = field(default_factory=tuple)
    nets: tuple[NetConfig, ...] = field(default_factory=tuple)
    # vhost-net for the NICs: "auto" (where /dev/vhost-net can be opened), "on" or "off".
    net_vhost: str = "auto"
    vsock: VsockConfig | None = None
    balloon: BalloonConfig | None = field(default_factory=BalloonConfig)
    # Each virtio device in a process of its own (multiprocess mode), or a thread in this one.
    sandbox: bool = True
    # Where the devices' seccomp policies are; None: seccomp/<arch>/ in pyvmm's tree.
    seccomp_policy_dir: str | None = None
    seccomp_log_failures: bool = False
    # Where to write the flattened device tree given to the guest (architectures that have one).
    dump_device_tree: str | None = None

    @property
    def mem_bytes(self) -> int:
        return self.mem_mib << 20

    def validate(self, arch: Arch | None = None) -> VmConfig:
        """Raise ConfigError for the first bad setting; return the config, with the control
        socket's path resolved, so calls can chain. Removes a stale socket file at that path.
        The machine's limits (vCPUs, PCI devices) are `arch`'s, by default the host's."""
        arch = arch or host_arch()
        _check_readable_file(self.kernel, "KERNEL")
        if self.initrd is not None:
            _check_readable_file(self.initrd, "-i/--initrd")
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(
                f"-m/--mem {self.mem_mib}: guest memory must be {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB"
            )
        limit = arch.max_cpus
        if not 1 <= self.cpus <= limit:
            raise ConfigError(f"-c/--cpus {self.cpus}: pyvmm runs 1 to {limit} vCPUs")
        for p in self.params:
            if not p.isprintable() or not p.isascii():
                raise ConfigError(f"-p/--params {p!r}: kernel parameters must be printable ASCII")
        fixed = (
            "virtio-rng is one" if self.balloon is None else "virtio-rng and the balloon are two"
        )
        # Every disk, NIC and vsock device is a PCI device on bus 0 beside the host bridge,
        # virtio-rng and the balloon, each with an INTx line of its own.
        devices = arch.max_pci_devices
        room = devices - 1 if self.balloon is None else devices - 2
        if len(self.disks) > room:
            extra = self.disks[room]
            raise ConfigError(
                f"{extra.flag} {extra.path}: at most {room} disks (the machine describes "
                f"{devices} PCI devices, and {fixed})"
            )
        if len(self.disks) + len(self.nets) > room:
            nic = self.nets[room - len(self.disks)]
            raise ConfigError(
                f"{nic.flag}: at most {room} disks and NICs together (the machine "
                f"describes {devices} PCI devices, and {fixed})"
            )
        if self.vsock is not None and len(self.disks) + len(self.nets) + 1 > room:
            raise ConfigError(
                f"--cid {self.vsock.cid}: no PCI slot left for virtio-vsock (the machine "
                f"describes {devices} PCI devices; {fixed}, disks and NICs take the "
                "others)"
            )
        if self.balloon is not None:
            _check_balloon(self.balloon)
        _check_nets(self.nets)
        roots = [d for d in self.disks if d.root]
        if len(roots) > 1:
            raise ConfigError(f"{roots[1].flag} {roots[1].path}: only one root disk is possible")
        if roots and not self.disks[0].root:
            raise ConfigError(f"{roots[0].flag} {roots[0].path}: the root disk must come first")
        seen: dict[tuple[int, int], DiskConfig] = {}
        for disk in self.disks:
            _check_readable_file(disk.path, disk.flag, block_device_ok=True)
            if disk.writable and not os.access(disk.path, os.W_OK):
                raise ConfigError(f"{disk.flag} {disk.path}: not writable")
            st = os.stat(disk.path)
            first = seen.setdefault((st.st_dev, st.st_ino), disk)
            if first is not disk and (disk.writable or first.writable):
                raise ConfigError(
                    f"{disk.flag} {disk.path}: the same image is given twice (also as "
                    f"{first.flag} {first.path}); a writable image can be only one disk"
                )
        if self.dump_device_tree is not None:
            _check_dump_path(self.dump_device_tree, arch)
        if self.vsock is not None:  # near the end, as the next: it may remove a stale socket
            _check_vsock(self.vsock)
        if self.socket is not None:  # last: it may remove a stale socket file
            return dataclasses.replace(self, socket=check_socket_path(self.socket, os.getpid()))
        return self


def _check_dump_path(path: str, arch: Arch) -> None:
    flag = "--dump-device-tree-blob"
    if not arch.has_device_tree:
        raise ConfigError(f"{flag} {path}: {arch.name} guests are not given a device tree")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not a directory this process can write")


def _check_balloon(balloon: BalloonConfig) -> None:
    if (
        balloon.low_mem_margin_mib is not None
        and not 0 <= balloon.low_mem_margin_mib <= MAX_MEM_MIB
    ):
        raise ConfigError(
            f"--low-mem-margin {balloon.low_mem_margin_mib}: must be 0 to {MAX_MEM_MIB} MiB"
        )
    if balloon.low_mem_dir is not None and not os.path.isdir(balloon.low_mem_dir):
        raise ConfigError(f"--low-mem-dir {balloon.low_mem_dir}: no such directory")
    timers = balloon.policy_timers
    if timers is not None and (len(timers) != 3 or not all(0 < t <= 3600 for t in timers)):
        raise ConfigError(
            "--balloon-policy-timers: three lengths in seconds (re-check, first leave check, "
            "every leave check after it), each above 0 and at most 3600"
        )


def _check_vsock(vsock: VsockConfig) -> None:
    why = check_guest_cid(vsock.cid)
    if why is not None:
        raise ConfigError(f"--cid {vsock.cid}: {why}")
    if vsock.uds is None:
        return  # vhost-vsock: host programs use AF_VSOCK (the VMM checks /dev/vhost-vsock)
    check_listener_path(vsock.uds, VSOCK_UDS_FLAG)
    try:
        check_dial_path(vsock.uds)
    except DialerError as e:
        raise ConfigError(str(e)) from None


def _check_nets(nets: tuple[NetConfig, ...]) -> None:
    fds: set[int] = set()
    for net in nets:
        if net.tap_fd is not None:
            if net.tap_fd in fds:
                raise ConfigError(f"--tap-fd {net.tap_fd}: given twice")
            fds.add(net.tap_fd)
            try:
                check_tap_fd(net.tap_fd)
            except TapError as e:
                raise ConfigError(str(e)) from None
            continue
        given = {"--host_ip": net.host_ip, "--netmask": net.netmask, "--mac": net.mac}
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            raise ConfigError(
                f"{missing[0]}: missing (--host_ip, --netmask and --mac go together: pyvmm "
                "makes a TAP with them)"
            )
        assert net.host_ip is not None and net.netmask is not None and net.mac is not None
        try:
            host = ipaddress.IPv4Address(net.host_ip)
        except ValueError:
            raise ConfigError(f"--host_ip {net.host_ip}: not an IPv4 address") from None
        try:
            network = ipaddress.IPv4Network(f"{host}/{net.netmask}", strict=False)
        except ValueError:
            raise ConfigError(
                f"--netmask {net.netmask}: not a netmask (dotted, with contiguous one bits)"
            ) from None
        if network.prefixlen < 31 and host in (network.network_address, network.broadcast_address):
            which = "network" if host == network.network_address else "broadcast"
            raise ConfigError(f"--host_ip {host}: the {which} address of {network}, not a host's")
        try:
            parse_mac(net.mac)
        except ValueError as e:
            raise ConfigError(f"--mac {net.mac}: {e}") from None


def _check_readable_file(path: str, what: str, block_device_ok: bool = False) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    try:
        check_kind(mode, block_device_ok)
    except FileKindError as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path}: permission denied")


def check_socket_path(path: str, pid: int) -> str:
    """The control socket path for `-s/--socket PATH`: PATH/pyvmm-<pid>.sock when PATH is a
    directory, else PATH. A stale socket there is removed; a live one is an error."""
    if not path:
        raise ConfigError(f"{SOCKET_FLAG}: empty path")
    if os.path.isdir(path):
        path = os.path.join(path, f"pyvmm-{pid}.sock")
    return check_listener_path(path, SOCKET_FLAG)


def check_listener_path(path: str, flag: str) -> str:
    """`path` for a listening socket that `flag` names: its directory writable, the path short
    enough; a stale socket there is removed, a live one or any other file is an error."""
    if not path:
        raise ConfigError(f"{flag}: empty path")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: directory {parent} is not writable")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{flag} {path}: longer than {MAX_SOCKET_PATH_BYTES} bytes, too long for a Unix socket"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{flag} {path}: exists and is not a socket")
    try:
        live = socket_is_live(path)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}") from None
    if live:
        raise ConfigError(f"{flag} {path}: another VM is listening there")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot remove the stale socket: {e.strerror}") from None
    return path
