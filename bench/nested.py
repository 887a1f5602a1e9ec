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
- vsock: Linux's virtio-vsock driver with the host (the guest's `vsock` and `vsockconn` checks and
  pyvmm.harness.vsockpeer): a stream each way and connections opened one after another, through
  pyvmm's own device (its Unix socket; QEMU has no userspace vsock) and through vhost-vsock
  (pyvmm `--cid N` alone, QEMU `-device vhost-vsock-pci`; host programs use AF_VSOCK).
- balloon: Linux's virtio_balloon in a 2 GiB guest (the guest's `balloon` check and
  pyvmm.harness.balloonpeer): the balloon set to 1 GiB and back to 0, timed by the host from the
  request to the driver's `actual` saying it holds that much; pyvmm through its control socket,
  QEMU (`-device virtio-balloon-pci,deflate-on-oom=on`) through QMP. QEMU runs twice: with its
  default RAM (private anonymous memory, given back with MADV_DONTNEED) and with its RAM a
  shared memfd as pyvmm's is (`memory-backend-memfd,share=on`: given back by punching holes in
  the file, as pyvmm does), the like-for-like row.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Collection
from dataclasses import dataclass

from bench.measure import PYVMM, QEMU, Row
from bench.vmms import qemu_disk_args
from pyvmm.harness import balloonpeer, vsockpeer
from pyvmm.harness.boots import NEW_NETNS, BootResult, BootSpec, command_report
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
from pyvmm.harness.vsockpeer import Guest

MEM_MIB = 1024
DD_MIB = 256
NET_MIB = 32  # each way
NET_WAIT_S = 60  # the guest's bound on each transfer
QEMU_TAP = "qtap0"
# Each way of running the NIC: name -> (pyvmm's --net-vhost and QEMU's vhost=, what it is).
NET_MODES = {"net": ("off", "userspace virtio-net"), "net-vhost": ("on", "vhost-net")}
NET_WAYS = {"sent": "host to guest", "received": "guest to host"}  # netpeer's names
PARTS = ("boot", "dd", "net", "vsock", "balloon")
VSOCK_MIB = 32  # each way
VSOCK_CONNS = 100
VSOCK_PORT = 5000
VSOCK_WAIT_S = 120
VSOCK_UDS_CID = 3
# vhost-vsock's CIDs are the host's to share among its VMs: a run of them out of others' way.
VSOCK_VHOST_CID = 20000 + os.getpid() % 40000
# Each way of running vsock: name -> what it is (pyvmm's userspace device has no QEMU peer).
VSOCK_MODES = {"vsock": "pyvmm's userspace device", "vsock-vhost": "vhost-vsock"}
BALLOON_MEM_MIB = 2048
BALLOON_MIB = 1024
BALLOON_FILL_MIB = 1536  # what the guest writes first, so that the balloon takes held memory
BALLOON_WAIT_S = 300
BALLOON_READY, BALLOON_FILLED = "GUEST balloon ready", "GUEST balloon filled"


@dataclass(frozen=True)
class Commands:
    """What the report shows so anyone can rerun the QEMU side."""

    pyvmm: str
    qemu: str


def _qemu(
    bzimage: str, initramfs: str, append: str, disk: str | None = None, mem_mib: int = MEM_MIB
) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", "pc", "-smp", "1",
        "-m", str(mem_mib), "-nodefaults", "-display", "none", "-serial", "stdio",
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


def _vsock_rates(r: BootResult) -> dict[str, float]:
    """MB/s each way and connections per second of one vsock boot; RuntimeError when an exchange
    did not complete. Host to guest by the host's clock, guest to host by the guest's (each the
    sender's, from its connection to the receiver's answer)."""
    data = vsockpeer.peer_report(r.commands, vsockpeer.DATA_READY)
    conns = vsockpeer.peer_report(r.commands, vsockpeer.CONNS_READY)
    check = r.checks.get("vsock")
    conn_check = r.checks.get("vsockconn")
    why = ""
    if not data or "error" in data:
        why = f"vsockpeer data: {data.get('error', 'never ran or did not finish')}"
    elif not conns or "error" in conns:
        why = f"vsockpeer conns: {conns.get('error', 'never ran or did not finish')}"
    elif not check or check[0] != "ok":
        why = f"guest: {' '.join(check) if check else 'no GUEST vsock line'}"
    elif not conn_check or conn_check[0] != "ok":
        why = f"guest: {' '.join(conn_check) if conn_check else 'no GUEST vsockconn line'}"
    if why:
        raise _failed(r, f"vsock failed: {why}")
    assert check is not None
    m = vsockpeer.GUEST_VSOCK.fullmatch(check[1])
    if m is None:
        raise _failed(r, f"vsock: GUEST vsock ok line not understood: {check[1]}")
    sent = data["sent"]
    return {
        "host to guest": sent["bytes"] / max(sent["seconds"], 1e-3) / 1e6,
        "guest to host": int(m["tx_bytes"]) / max(float(m["tx_s"]), 1e-3) / 1e6,
        "connections": conns["connections"] / max(conns["seconds"], 1e-3),
    }


def _qemu_vsock(bz: str, initrd: str, append: str, cid: int) -> list[str]:
    device = f"vhost-vsock-pci,guest-cid={cid},disable-legacy=on,romfile="
    return [*_qemu(bz, initrd, append), "-device", device]


def run(runs: int, parts: Collection[str] = PARTS) -> tuple[list[Row], dict[str, str]]:
    """The Linux rows of `parts` (of PARTS), each VMM `runs` times."""
    harness = LinuxHarness(progress=print)
    files = harness.guest_files()
    bz, initrd = str(files.bzimage), str(files.initramfs)
    base = ["-m", str(MEM_MIB), "-i", initrd, "-p", "quiet"]
    boot_checks = "pyvmm.check=uptime"
    dd_checks = f"pyvmm.check=ddread pyvmm.src=vda pyvmm.mib={DD_MIB}"
    net_checks = kernel_params(["net"], NET_MIB, NET_WAIT_S)
    with harness.session() as dirs:
        image = str(dirs.local / "dd.img")
        uds = str(dirs.local / "vsock.sock")  # a Unix socket: not on 9p
        specs: list[BootSpec] = []
        qemu_argv: dict[str, list[str]] = {}
        for i in range(runs):
            if "boot" in parts:
                pyvmm = harness.pyvmm_argv(*base, "-p", boot_checks, bz)
                qemu_argv["boot"] = _qemu(bz, initrd, boot_checks)
                specs += [
                    BootSpec(f"{PYVMM}-boot-{i}", pyvmm),
                    BootSpec(f"{QEMU}-boot-{i}", qemu_argv["boot"]),
                ]
            if "dd" in parts:
                pyvmm = harness.pyvmm_argv(*base, "-d", image, "-p", dd_checks, bz)
                qemu_argv["dd"] = _qemu(bz, initrd, dd_checks, disk=image)
                specs += [
                    BootSpec(f"{PYVMM}-dd-{i}", _with_image(image, pyvmm)),
                    BootSpec(f"{QEMU}-dd-{i}", _with_image(image, qemu_argv["dd"])),
                ]
            if "net" in parts:
                for mode, (vhost, _) in NET_MODES.items():
                    pyvmm = harness.pyvmm_argv(
                        *base, *pyvmm_net_args(), "--net-vhost", vhost, "-p", net_checks, bz
                    )
                    qemu_argv[mode] = _qemu_net(bz, initrd, net_checks, vhost)
                    specs += [_net_spec(f"{PYVMM}-{mode}-{i}", pyvmm)]
                    specs += [_net_spec(f"{QEMU}-{mode}-{i}", qemu_argv[mode])]
            if "vsock" in parts:
                cid = VSOCK_VHOST_CID + 2 * i  # pyvmm's; QEMU's is the next
                uds_flags = ["--cid", str(VSOCK_UDS_CID), "--vsock-uds", uds]
                uds_argv = [*base, *uds_flags, "-p", _vsock_checks(VSOCK_UDS_CID), bz]
                vhost_argv = [*base, "--cid", str(cid), "-p", _vsock_checks(cid), bz]
                qemu_argv["vsock-vhost"] = _qemu_vsock(bz, initrd, _vsock_checks(cid + 1), cid + 1)
                specs += [
                    _vsock_spec(
                        f"{PYVMM}-vsock-{i}", harness.pyvmm_argv(*uds_argv), Guest(uds=uds)
                    ),
                    _vsock_spec(
                        f"{PYVMM}-vsock-vhost-{i}", harness.pyvmm_argv(*vhost_argv), Guest(cid=cid)
                    ),
                    _vsock_spec(
                        f"{QEMU}-vsock-vhost-{i}", qemu_argv["vsock-vhost"], Guest(cid=cid + 1)
                    ),
                ]
            if "balloon" in parts:
                control = str(dirs.local / "balloon.ctl")
                qmp = str(dirs.local / "balloon.qmp")
                checks = _balloon_checks()
                pyvmm = harness.pyvmm_argv(
                    *["-m", str(BALLOON_MEM_MIB), "-i", initrd, "-p", "quiet", "-s", control],
                    *["-p", checks, bz],
                )
                qemu_argv["balloon"] = [
                    *_qemu(bz, initrd, checks, mem_mib=BALLOON_MEM_MIB),
                    *["-device", "virtio-balloon-pci,deflate-on-oom=on,disable-legacy=on,romfile="],
                    *["-qmp", f"unix:{qmp},server=on,wait=off"],
                ]
                qemu_argv["balloon-memfd"] = _shared_memfd_ram(qemu_argv["balloon"])
                ram = ["--qmp-ram-mib", str(BALLOON_MEM_MIB)]
                specs += [
                    _balloon_spec(f"{PYVMM}-balloon-{i}", pyvmm, control, []),
                    _balloon_spec(f"{QEMU}-balloon-{i}", qemu_argv["balloon"], qmp, ram),
                    _balloon_spec(
                        f"{QEMU}-balloon-memfd-{i}", qemu_argv["balloon-memfd"], qmp, ram
                    ),
                ]
        results = harness.run(specs)
    rows: list[Row] = []
    if "boot" in parts:
        rows += _boot_rows(results)
    if "dd" in parts:
        rows += _dd_rows(results)
    if "net" in parts:
        rows += _net_rows(results)
    if "vsock" in parts:
        rows += _vsock_rows(results)
    if "balloon" in parts:
        rows += _balloon_rows(results)
    commands = {"where": harness.placement.describe()}
    for what, argv in qemu_argv.items():
        in_netns = what in NET_MODES
        commands[f"qemu {what}"] = shlex.join([*NEW_NETNS, *argv] if in_netns else argv)
    return rows, commands


def _runs_of(results: list[BootResult], vmm: str, what: str) -> list[BootResult]:
    return [r for r in results if r.name.rsplit("-", 1)[0] == f"{vmm}-{what}"]


def _net_spec(name: str, argv: list[str]) -> BootSpec:
    return BootSpec(
        name,
        argv,
        timeout=120 + 2 * NET_WAIT_S,  # boot, ping, both transfers (each bounded)
        on_line={NET_READY: peer_argv(NET_MIB, 2 * NET_WAIT_S)},
        netns=True,
    )


def _vsock_checks(cid: int) -> str:
    return vsockpeer.kernel_params(
        ["vsock", "vsockconn"], cid, VSOCK_PORT, VSOCK_MIB, VSOCK_WAIT_S, VSOCK_CONNS
    )


def _vsock_spec(name: str, argv: list[str], guest: Guest) -> BootSpec:
    data = vsockpeer.peer_argv("data", guest, VSOCK_PORT, 2 * VSOCK_WAIT_S, str(VSOCK_MIB))
    conns = ["--count", str(VSOCK_CONNS)]
    return BootSpec(
        name,
        argv,
        timeout=120 + 3 * VSOCK_WAIT_S,  # boot, both transfers and the connections (each bounded)
        on_line={
            vsockpeer.DATA_READY: data,
            vsockpeer.CONNS_READY: vsockpeer.peer_argv(
                "conns", guest, VSOCK_PORT, VSOCK_WAIT_S, *conns
            ),
        },
    )


def _boot_rows(results: list[BootResult]) -> list[Row]:
    uptime = Row("linux boot", "kernel uptime at init", "s", False)
    to_init = Row("linux boot", "wall time to init", "s", False)
    for vmm in (PYVMM, QEMU):
        boots = _runs_of(results, vmm, "boot")
        uptimes = [u for r in boots if (u := _uptime(r)) is not None]
        if not uptimes:
            raise _failed(boots[0] if boots else None, f"{vmm} did not boot to init")
        uptime.record(vmm, uptimes)
        to_init.record(vmm, [r.to_init_s for r in boots if r.to_init_s is not None])
    return [uptime, to_init]


def _dd_rows(results: list[BootResult]) -> list[Row]:
    row = Row("linux dd", f"{DD_MIB} MiB from virtio-blk", "MB/s", True)
    for vmm in (PYVMM, QEMU):
        dds = _runs_of(results, vmm, "dd")
        dd_s = [s for r in dds if (s := _dd_seconds(r)) is not None]
        if not dd_s:
            raise _failed(dds[0] if dds else None, f"{vmm} dd failed")
        row.record(vmm, [DD_MIB * (1 << 20) / s / 1e6 for s in dd_s])
    return [row]


def _net_rows(results: list[BootResult]) -> list[Row]:
    rows = {
        (mode, way): Row("linux net", f"TCP {direction}, {what}", "MB/s", True)
        for mode, (_, what) in NET_MODES.items()
        for way, direction in NET_WAYS.items()
    }
    for vmm in (PYVMM, QEMU):
        for mode in NET_MODES:
            runs_of = _runs_of(results, vmm, mode)
            rates = [_net_rates(r) for r in runs_of]
            for r, rate in zip(runs_of, rates, strict=True):
                speeds = ", ".join(f"{NET_WAYS[w]} {rate[w]:.1f} MB/s" for w in NET_WAYS)
                print(f"{r.name}: {speeds}; GUEST net ok {r.checks['net'][1]}")
            for way in NET_WAYS:
                rows[mode, way].record(vmm, [rate[way] for rate in rates])
    return list(rows.values())


def _vsock_rows(results: list[BootResult]) -> list[Row]:
    measures = {
        "host to guest": ("stream host to guest", "MB/s"),
        "guest to host": ("stream guest to host", "MB/s"),
        "connections": ("connections opened in turn from the host", "conn/s"),
    }
    rows = {
        (mode, key): Row("linux vsock", f"{what}, {how}", unit, True)
        for mode, how in VSOCK_MODES.items()
        for key, (what, unit) in measures.items()
    }
    for vmm, mode in [(PYVMM, "vsock"), (PYVMM, "vsock-vhost"), (QEMU, "vsock-vhost")]:
        runs_of = _runs_of(results, vmm, mode)
        rates = [_vsock_rates(r) for r in runs_of]
        for r, rate in zip(runs_of, rates, strict=True):
            print(f"{r.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))
        for key in measures:
            rows[mode, key].record(vmm, [rate[key] for rate in rates])
    return list(rows.values())


def _balloon_checks() -> str:
    return (
        f"pyvmm.check=balloon pyvmm.balloon_mib={BALLOON_MIB} "
        f"pyvmm.balloon_fill={BALLOON_FILL_MIB} pyvmm.balloon_wait={BALLOON_WAIT_S}"
    )


def _balloon_spec(name: str, argv: list[str], socket: str, extra: list[str]) -> BootSpec:
    return BootSpec(
        name,
        argv,
        timeout=120 + 3 * BALLOON_WAIT_S,
        on_line={
            BALLOON_READY: balloonpeer.peer_argv(
                "cycle", socket, 2 * BALLOON_WAIT_S, str(BALLOON_MIB), *extra
            ),
            BALLOON_FILLED: balloonpeer.peer_argv("done", socket, BALLOON_WAIT_S, *extra),
        },
    )


def _shared_memfd_ram(argv: list[str]) -> list[str]:
    """`argv` (QEMU's) with its RAM a shared memfd, as pyvmm's guest memory is."""
    machine = argv.index("-M") + 1
    out = [*argv[:machine], f"{argv[machine]},memory-backend=ram0", *argv[machine + 1 :]]
    size = f"{BALLOON_MEM_MIB}M"
    return [*out, "-object", f"memory-backend-memfd,id=ram0,size={size},share=on"]


def _balloon_rows(results: list[BootResult]) -> list[Row]:
    ours = _balloon_rates(results, PYVMM, "balloon")
    rows = []
    for what, how in (("balloon", ""), ("balloon-memfd", ", QEMU's RAM a shared memfd")):
        theirs = _balloon_rates(results, QEMU, what)
        for i, direction in enumerate(("inflate", "deflate")):
            row = Row("linux balloon", f"{direction} {BALLOON_MIB} MiB{how}", "MiB/s", True)
            row.record(PYVMM, ours[i])
            row.record(QEMU, theirs[i])
            rows.append(row)
    return rows


def _balloon_rates(
    results: list[BootResult], vmm: str, what: str
) -> tuple[list[float], list[float]]:
    """The inflate and deflate rates (MiB/s) of `vmm`'s `what` runs."""
    runs_of = _runs_of(results, vmm, what)
    reports = [command_report(r.commands, BALLOON_READY, "balloonpeer") for r in runs_of]
    for r, report in zip(runs_of, reports, strict=True):
        check = r.checks.get("balloon")
        if "inflate_s" not in report or not check or check[0] != "ok":
            why = report.get("error") or (" ".join(check) if check else "no GUEST balloon")
            raise _failed(r, f"balloon failed: {why}")
        print(f"{r.name}: inflate {report['inflate_s']:.2f} s, "
              f"deflate {report['deflate_s']:.2f} s; GUEST balloon ok {check[1]}")  # fmt: skip
    inflate = [BALLOON_MIB / max(rep["inflate_s"], 1e-3) for rep in reports]
    deflate = [BALLOON_MIB / max(rep["deflate_s"], 1e-3) for rep in reports]
    return inflate, deflate
