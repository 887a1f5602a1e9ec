"""Benchmarks with Debian's kernel, both VMMs under the same KVM: natively where this host's KVM
boots a stock kernel, else inside one test VM. Inside the test VM everything is emulated and
absolute times mean little; the pyvmm/QEMU ratio is what carries over.

- boot: Debian's kernel with the kit's initramfs to its init (the kernel's uptime when init
  starts, and the wall time from starting the VMM to init's first line).
- dd: `dd` of 256 MiB from a virtio-blk disk backed by a raw file in the page cache (of the
  machine the VMM runs on), timed by the guest.
- net: TCP throughput of Linux's virtio_net each way over a TAP (the guest's `net` check and
  pyvmm.harness.netpeer, in the boot's own network namespace), with the VMM's own device and with
  vhost-net: pyvmm `--net-vhost off|on`, QEMU `-netdev tap,...,vhost=off|on`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from bench.measure import PYVMM, QEMU, Row
from bench.vmms import qemu_disk_args
from pyvmm.harness.boots import NEW_NETNS, BootResult, BootSpec
from pyvmm.harness.linux import LinuxHarness
from pyvmm.harness.netcheck import (
    HOST_IP,
    MAC,
    NET_READY,
    PREFIX,
    kernel_params,
    peer_argv,
    peer_report,
    pyvmm_net_args,
)

MEM_MIB = 1024
DD_MIB = 256
NET_MIB = 32  # each way
NET_WAIT_S = 60  # the guest's bound on each transfer
QEMU_TAP = "qtap0"
# Each way of running the NIC: name -> (pyvmm's --net-vhost and QEMU's vhost=, what it is).
NET_MODES = {"net": ("off", "userspace virtio-net"), "net-vhost": ("on", "vhost-net")}
NET_WAYS = {"sent": "host to guest", "received": "guest to host"}  # netpeer's names


@dataclass(frozen=True)
class Commands:
    """What the report shows so anyone can rerun the QEMU side."""

    pyvmm: str
    qemu: str


def _qemu(bzimage: str, initramfs: str, append: str, disk: str | None = None) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", "pc", "-smp", "1",
        "-m", str(MEM_MIB), "-nodefaults", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-kernel", bzimage, "-initrd", initramfs,
        "-append", f"console=ttyS0 reboot=k panic=1 quiet {append}",
    ]  # fmt: skip
    return argv + qemu_disk_args(disk) if disk is not None else argv


def _qemu_net(bz: str, initrd: str, append: str, vhost: str) -> list[str]:
    """QEMU with a virtio-net NIC on a TAP that a shell makes and gives the host's address first
    (the guest pings it as soon as its link is up)."""
    tap = (
        f"ip tuntap add dev {QEMU_TAP} mode tap vnet_hdr"
        f" && ip addr add {HOST_IP}/{PREFIX} dev {QEMU_TAP} && ip link set {QEMU_TAP} up"
    )
    qemu = [
        *_qemu(bz, initrd, append),
        "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost={vhost}",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC},disable-legacy=on,romfile=",
    ]  # fmt: skip
    return ["sh", "-c", tap + ' && exec "$@"', "sh", *qemu]


def _with_image(image: str, argv: list[str]) -> list[str]:
    """argv, run after making the `DD_MIB` MiB disk image (once) where the VMM runs."""
    make = f"test -e {shlex.quote(image)} || head -c {DD_MIB}M /dev/urandom > {shlex.quote(image)}"
    return ["sh", "-c", make + ' && exec "$@"', "sh", *argv]


def _uptime(r: BootResult) -> float | None:
    check = r.checks.get("uptime")
    return float(check[1]) if check and check[0] == "ok" else None


def _dd_seconds(r: BootResult) -> float | None:
    check = r.checks.get("ddread")
    if not check or check[0] != "ok":
        return None
    return max(float(check[1].split()[3]), 0.01)  # "<MiB> MiB in <seconds> s" (10 ms ticks)


def _failed(r: BootResult | None, why: str) -> RuntimeError:
    """The error for a run that did not give its figure: the run, how it ended, its last words."""
    if r is None:
        return RuntimeError(f"{why}: no runs")
    ended = "timed out" if r.timed_out else f"status {r.returncode}"
    hung = " (it hung once and was rerun)" if r.hung_attempt else ""
    tail = (r.stderr.strip() or r.output.strip() or "no output")[-800:]
    return RuntimeError(f"{r.name}: {why} ({ended} after {r.wall_s:.0f} s{hung}):\n{tail}")


def _net_rates(r: BootResult) -> dict[str, float]:
    """MB/s each way (netpeer's "sent" and "received") of one net boot; RuntimeError when the
    exchange did not complete."""
    check = r.checks.get("net")
    report = peer_report(r)
    why = ""
    if not r.commands:
        why = f"the guest never said {NET_READY!r}"
    elif "error" in report or not report:
        why = f"netpeer: {report.get('error') or r.commands[0].output.strip()[-400:]}"
    elif not check or check[0] != "ok":
        why = f"guest: {' '.join(check) if check else 'no GUEST net line'}"
    else:
        wrong = [w for w in NET_WAYS if report[w]["bytes"] != NET_MIB * (1 << 20)]
        why = f"netpeer moved {[report[w]['bytes'] for w in wrong]} bytes" if wrong else ""
    if why:
        raise _failed(r, f"net failed: {why}")
    return {w: report[w]["bytes"] / max(report[w]["seconds"], 1e-3) / 1e6 for w in NET_WAYS}


def run(runs: int) -> tuple[list[Row], dict[str, str]]:
    harness = LinuxHarness(progress=print)
    files = harness.guest_files()
    bz, initrd = str(files.bzimage), str(files.initramfs)
    boot_checks = "pyvmm.check=uptime"
    dd_checks = f"pyvmm.check=ddread pyvmm.src=vda pyvmm.mib={DD_MIB}"
    net_checks = kernel_params(["net"], NET_MIB, NET_WAIT_S)
    peer = peer_argv(NET_MIB, 2 * NET_WAIT_S)
    with harness.session() as dirs:
        image = str(dirs.local / "dd.img")
        argv = {
            (PYVMM, "boot"): harness.pyvmm_argv(
                "-m", str(MEM_MIB), "-i", initrd, "-p", "quiet", "-p", boot_checks, bz
            ),
            (QEMU, "boot"): _qemu(bz, initrd, boot_checks),
            (PYVMM, "dd"): harness.pyvmm_argv(
                "-m",
                str(MEM_MIB),
                "-i",
                initrd,
                "-d",
                image,
                "-p",
                "quiet",
                "-p",
                dd_checks,
                bz,
            ),
            (QEMU, "dd"): _qemu(bz, initrd, dd_checks, disk=image),
        }
        for mode, (vhost, _) in NET_MODES.items():
            argv[PYVMM, mode] = harness.pyvmm_argv(
                *["-m", str(MEM_MIB), "-i", initrd, "-p", "quiet", *pyvmm_net_args()],
                *["--net-vhost", vhost, "-p", net_checks, bz],
            )
            argv[QEMU, mode] = _qemu_net(bz, initrd, net_checks, vhost)
        specs = [
            BootSpec(f"{vmm}-{what}-{i}", _with_image(image, argv[vmm, what]))
            if what in ("boot", "dd")
            else BootSpec(
                f"{vmm}-{what}-{i}",
                argv[vmm, what],
                timeout=120 + 2 * NET_WAIT_S,  # boot, ping, both transfers (each bounded)
                on_line={NET_READY: peer},
                netns=True,
            )
            for i in range(runs)
            for what in ("boot", "dd", *NET_MODES)
            for vmm in (PYVMM, QEMU)
        ]
        results = harness.run(specs)
    where = harness.placement.describe()
    rows = [
        Row("linux boot", "kernel uptime at init", "s", False),
        Row("linux boot", "wall time to init", "s", False),
        Row("linux dd", f"{DD_MIB} MiB from virtio-blk", "MB/s", True),
    ]
    net_rows = {
        (mode, way): Row("linux net", f"TCP {direction}, {what}", "MB/s", True)
        for mode, (_, what) in NET_MODES.items()
        for way, direction in NET_WAYS.items()
    }
    rows += net_rows.values()
    for vmm in (PYVMM, QEMU):
        boots = [r for r in results if r.name.startswith(f"{vmm}-boot-")]
        dds = [r for r in results if r.name.startswith(f"{vmm}-dd-")]
        uptimes = [u for r in boots if (u := _uptime(r)) is not None]
        if not uptimes:
            raise _failed(boots[0] if boots else None, f"{vmm} did not boot to init")
        rows[0].record(vmm, uptimes)
        rows[1].record(vmm, [r.to_init_s for r in boots if r.to_init_s is not None])
        dd_s = [s for r in dds if (s := _dd_seconds(r)) is not None]
        if not dd_s:
            raise _failed(dds[0] if dds else None, f"{vmm} dd failed")
        rows[2].record(vmm, [DD_MIB * (1 << 20) / s / 1e6 for s in dd_s])
        for mode in NET_MODES:
            runs_of = [r for r in results if r.name.rsplit("-", 1)[0] == f"{vmm}-{mode}"]
            rates = [_net_rates(r) for r in runs_of]
            for r, rate in zip(runs_of, rates, strict=True):
                speeds = ", ".join(f"{NET_WAYS[w]} {rate[w]:.1f} MB/s" for w in NET_WAYS)
                print(f"{r.name}: {speeds}; GUEST net ok {r.checks['net'][1]}")
            for way in NET_WAYS:
                net_rows[mode, way].record(vmm, [rate[way] for rate in rates])
    commands = {
        "where": where,
        "qemu boot": shlex.join(argv[QEMU, "boot"]),
        "qemu dd": shlex.join(argv[QEMU, "dd"]),
        **{f"qemu {mode}": shlex.join([*NEW_NETNS, *argv[QEMU, mode]]) for mode in NET_MODES},
    }
    return rows, commands
