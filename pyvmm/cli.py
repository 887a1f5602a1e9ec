"""The `pyvmm` command: argument parsing into a VmConfig, subcommands, one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from pyvmm import __version__
from pyvmm.arch.host import UnsupportedArchError
from pyvmm.arch.interface import MachineError
from pyvmm.balloon_policy import (
    CHROMEOS_LOW_MEM_DIR,
    DEFAULT_LOW_MEM_MARGIN_MIB,
    MemorySourceError,
)
from pyvmm.config import (
    DEFAULT_CPUS,
    DEFAULT_MEM_MIB,
    BalloonConfig,
    ConfigError,
    DiskConfig,
    NetConfig,
    VmConfig,
    VsockConfig,
)
from pyvmm.control import (
    BALLOON_COMMANDS,
    COMMANDS,
    ControlError,
    reply_error_message,
    send_command,
)
from pyvmm.devices.proxy import DeviceProcessError
from pyvmm.disk import DiskError
from pyvmm.kvm import KvmError, KvmUnavailableError, MissingCapabilityError
from pyvmm.loader import CmdlineError, InitrdError, KernelLoadError
from pyvmm.memory import GuestMemoryError
from pyvmm.native.helpers import HelperError
from pyvmm.net.tap import TapError
from pyvmm.sandbox.seccomp import SeccompError
from pyvmm.unix_listener import ListenerError
from pyvmm.vhost import VhostError

if TYPE_CHECKING:
    from pyvmm.vmm import Vmm

EXIT_USAGE = 2
EXIT_FAILURE = 1
USER_ERRORS = (
    ConfigError,
    MemorySourceError,
    KvmUnavailableError,
    MissingCapabilityError,
    KernelLoadError,
    InitrdError,
    CmdlineError,
    GuestMemoryError,
    KvmError,
    ControlError,
    DiskError,
    HelperError,
    UnsupportedArchError,
    MachineError,
    DeviceProcessError,
    SeccompError,
    TapError,
    VhostError,
    ListenerError,
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _disk(path: str, writable: bool, root: bool) -> DiskConfig:
    return DiskConfig(path, writable=writable, root=root)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description="A KVM virtual machine monitor.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("version", help="show the version", description="Show pyvmm's version.")
    run = sub.add_parser("run", help="boot a guest kernel", description="Boot KERNEL in a VM.")
    run.add_argument("kernel", metavar="KERNEL", help="an ELF vmlinux or a bzImage")
    run.add_argument(
        "-m",
        "--mem",
        type=int,
        default=DEFAULT_MEM_MIB,
        metavar="MiB",
        help=f"guest memory in MiB (default {DEFAULT_MEM_MIB})",
    )
    run.add_argument(
        "-c",
        "--cpus",
        type=int,
        default=DEFAULT_CPUS,
        metavar="N",
        help=f"number of vCPUs (default {DEFAULT_CPUS})",
    )
    run.add_argument(
        "-p",
        "--params",
        action="append",
        default=[],
        metavar="STR",
        help="extra kernel command line (repeatable)",
    )
    run.add_argument("-i", "--initrd", metavar="PATH", help="initial ramdisk")
    disk_flags = (
        (("-r", "--root"), False, True, "read-only root disk (vda; adds root=/dev/vda ro)"),
        (("--rwroot",), True, True, "writable root disk (vda; adds root=/dev/vda rw)"),
        (("-d", "--disk"), False, False, "read-only disk (repeatable)"),
        (("--rwdisk",), True, False, "writable disk (repeatable)"),
    )
    for flags, writable, root, summary in disk_flags:
        run.add_argument(
            *flags,
            dest="disks",
            action="append",
            default=[],
            metavar="PATH",
            type=functools.partial(_disk, writable=writable, root=root),
            help=summary,
        )
    run.add_argument(
        "--host_ip",
        metavar="A.B.C.D",
        help="make a TAP for a virtio-net NIC and give the host side this IPv4 address "
        "(with --netmask and --mac; needs CAP_NET_ADMIN)",
    )
    run.add_argument("--netmask", metavar="A.B.C.D", help="the host side's netmask")
    run.add_argument("--mac", metavar="XX:XX:XX:XX:XX:XX", help="the guest NIC's MAC address")
    run.add_argument(
        "--tap-fd",
        dest="tap_fds",
        action="append",
        default=[],
        type=int,
        metavar="FD",
        help="a virtio-net NIC on this open TAP fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, "
        "configured by the caller; repeatable)",
    )
    run.add_argument(
        "--net-vhost",
        choices=["auto", "on", "off"],
        default="auto",
        help="run the NICs' queues in the host kernel (vhost-net): where /dev/vhost-net can be "
        "opened (auto, the default), always (on), or never: pyvmm's own device (off)",
    )
    run.add_argument(
        "--cid",
        type=int,
        metavar="N",
        help="give the guest a virtio-vsock device with context ID N (3 or more): run by the "
        "host kernel's vhost-vsock (host programs use AF_VSOCK), or by pyvmm with --vsock-uds",
    )
    run.add_argument(
        "--vsock-uds",
        metavar="PATH",
        help="pyvmm's own vsock device: host programs reach the guest's ports through a Unix "
        "socket at PATH "
        "(connect, send 'CONNECT <port>\\n', read 'OK <host port>\\n'); the guest's "
        "connections to host port P go to PATH_P",
    )
    run.add_argument(
        "--no-balloon",
        action="store_true",
        help="no virtio-balloon device (there is one by default, as in crosvm)",
    )
    run.add_argument(
        "--balloon-page-reporting",
        action="store_true",
        help="offer free page reporting: the guest gives the host its free memory as it frees it",
    )
    run.add_argument(
        "--low-mem-margin",
        type=int,
        metavar="MIB",
        help="the host is low on memory when its MemAvailable falls below MIB (where Chrome OS's "
        "low-memory files are absent); then the balloon grows (default: "
        f"{DEFAULT_LOW_MEM_MARGIN_MIB} MiB)",
    )
    run.add_argument(
        "--low-mem-dir",
        metavar="DIR",
        help="where the host says it is low on memory, as Chrome OS's "
        f"{CHROMEOS_LOW_MEM_DIR} does (files 'available' and 'margin', in MiB; default: that "
        "directory where it exists)",
    )
    run.add_argument(
        "--balloon-policy-timers",
        metavar="RECHECK,LEAVE,EVERY",
        type=_timers,
        help="for tests only: the low-memory policy's timer lengths in seconds (default 1,60,30)",
    )
    run.add_argument(
        "-s",
        "--socket",
        metavar="PATH",
        help="listen for control commands on a Unix socket at PATH "
        "(PATH/pyvmm-<pid>.sock if PATH is a directory)",
    )
    run.add_argument(
        "--disable-sandbox",
        action="store_true",
        help="run each device as a thread in the VMM process instead of a process of its own",
    )
    run.add_argument(
        "--seccomp-policy-dir",
        metavar="DIR",
        help="read the device processes' seccomp policies from DIR (default: seccomp/<arch>/)",
    )
    run.add_argument(
        "--dump-device-tree-blob",
        metavar="FILE",
        help="write the flattened device tree the guest is given to FILE (arm64)",
    )
    run.add_argument(
        "--seccomp-log-failures",
        action="store_true",
        help="log a system call a device's policy does not allow instead of killing the device",
    )
    for name, summary in COMMANDS.items():
        control = sub.add_parser(name, help=summary, description=f"{summary.capitalize()}.")
        control.add_argument("socket", metavar="SOCKET", help="the VM's control socket")
    for name, summary in BALLOON_COMMANDS.items():
        control = sub.add_parser(name, help=summary, description=f"{summary.capitalize()}.")
        if name == "balloon":
            control.add_argument(
                "bytes",
                metavar="BYTES",
                type=_size,
                help="how much of the guest's memory the balloon should hold: bytes, or with a "
                "K, M or G suffix (KiB, MiB, GiB)",
            )
        control.add_argument("socket", metavar="SOCKET", help="the VM's control socket")
    return parser


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    """A size in bytes: digits with an optional K, M or G (binary units)."""
    digits = text.rstrip("KMGkmg")
    suffix = text[len(digits) :].upper()
    if not digits.isdigit() or suffix not in SIZE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 134217728, 128M, 1G)")
    return int(digits) * SIZE_SUFFIXES[suffix]


def version_line() -> str:
    return f"pyvmm {__version__}"


def _nets(args: argparse.Namespace) -> tuple[NetConfig, ...]:
    made = (args.host_ip, args.netmask, args.mac)
    nets = [NetConfig(*made)] if any(v is not None for v in made) else []
    return (*nets, *(NetConfig(tap_fd=fd) for fd in args.tap_fds))


def _timers(text: str) -> tuple[float, float, float]:
    try:
        recheck, leave, every = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three numbers of seconds") from None
    return recheck, leave, every


def _balloon(args: argparse.Namespace) -> BalloonConfig | None:
    if args.no_balloon:
        return None
    return BalloonConfig(
        page_reporting=args.balloon_page_reporting,
        low_mem_margin_mib=args.low_mem_margin,
        low_mem_dir=args.low_mem_dir,
        policy_timers=args.balloon_policy_timers,
    )


def _vsock(args: argparse.Namespace) -> VsockConfig | None:
    if args.cid is None:
        if args.vsock_uds is not None:
            raise ConfigError(f"--vsock-uds {args.vsock_uds}: needs --cid N, the guest's CID")
        return None
    return VsockConfig(args.cid, args.vsock_uds)


def config_from_args(args: argparse.Namespace) -> VmConfig:
    return VmConfig(
        kernel=args.kernel,
        mem_mib=args.mem,
        cpus=args.cpus,
        params=tuple(args.params),
        initrd=args.initrd,
        kvm_path=os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"),
        socket=args.socket,
        disks=tuple(sorted(args.disks, key=lambda d: not d.root)),
        nets=_nets(args),
        vsock=_vsock(args),
        balloon=_balloon(args),
        net_vhost=args.net_vhost,
        sandbox=not args.disable_sandbox,
        seccomp_policy_dir=args.seccomp_policy_dir,
        seccomp_log_failures=args.seccomp_log_failures,
        dump_device_tree=args.dump_device_tree_blob,
    ).validate()


def cmd_control(args: argparse.Namespace) -> int:
    """Send a control command; silent on success, but for balloon_stats's JSON."""
    request: dict[str, Any] = {"cmd": args.command}
    if args.command == "balloon":
        request["bytes"] = args.bytes
    reply = send_command(args.socket, request)
    if reply["ok"]:
        if args.command == "balloon_stats":
            print(json.dumps(reply.get("balloon"), indent=2, sort_keys=True))
        return 0
    print(f"pyvmm: {reply_error_message(args.socket, reply)}", file=sys.stderr)
    return EXIT_FAILURE


# Signals that end `pyvmm run` in an orderly way: vCPUs stopped, terminal restored, socket
# removed, status 128 + signal. SIGHUP (the terminal went away) and SIGQUIT (Ctrl-\\ in a
# terminal not in raw mode) would otherwise kill the process with none of that done.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class StoppedBySignal(BaseException):
    """A stop signal arrived before the VM was built: it ends `pyvmm run` there."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.code = 128 + signum


class _StopOnSignal:
    """The handler for STOP_SIGNALS: once the VM exists it asks it to exit (the main loop then
    stops it). While the VM is being built it is only noted (`pending`), and the VM is closed
    as soon as it exists: an exception raised at an arbitrary point of the building could leave
    a file behind (a socket made, not yet recorded for removal). Before that nothing is built
    yet, and it ends `pyvmm run` at once (StoppedBySignal)."""

    def __init__(self) -> None:
        self.vmm: Vmm | None = None
        self.building = False
        self.pending: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.vmm is None and self.building:
            self.pending = self.pending or signum
            return
        if self.vmm is None:
            raise StoppedBySignal(signum)
        from pyvmm.vmm import VmExit  # imported by now: self.vmm is a Vmm

        self.vmm.request_exit(VmExit(128 + signum, f"stopped by {signal.Signals(signum).name}"))


def cmd_run(args: argparse.Namespace) -> int:
    on_signal = _StopOnSignal()
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    from pyvmm.terminal import raw_terminal
    from pyvmm.vmm import Vmm

    config = config_from_args(args)
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None and not sys.stdin.closed else None
    console_out = open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)  # noqa: SIM115
    vmm: Vmm | None = None
    try:
        on_signal.building = True
        vmm = Vmm(config, console_out=console_out, console_in_fd=stdin_fd)
        on_signal.vmm = vmm
        if on_signal.pending is not None:
            raise StoppedBySignal(on_signal.pending)
        with raw_terminal(stdin_fd) if stdin_fd is not None else contextlib.nullcontext():
            result = vmm.run()
    finally:
        if vmm is not None:
            vmm.close()
    sys.stdout.flush()
    if result.code != 0:
        print(f"pyvmm: {result.reason}", file=sys.stderr)
    return result.code


def main(argv: Sequence[str] | None = None) -> int:
    # `kill -USR2` prints every thread's stack on stderr: how to see where a hung VM is stuck.
    # (The process's real stderr: tests may have swapped sys.stderr for something fd-less.)
    if sys.__stderr__ is not None:
        with contextlib.suppress(ValueError, OSError):
            faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="pyvmm: %(message)s",
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # -v: pyvmm's lines, not netlink's
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "version":
            print(version_line())
            return 0
        if args.command in COMMANDS or args.command in BALLOON_COMMANDS:
            return cmd_control(args)
    except USER_ERRORS as e:
        print(f"pyvmm: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except StoppedBySignal as e:
        print(f"pyvmm: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
