"""A stock Debian arm64 kernel boots under pyvmm: natively on an arm64 KVM host, else inside the
arm64 test VM (QEMU's emulated arm64 at EL2, with the arm64 root's Python running pyvmm).

Five boots in one test VM boot (each L2 boot costs a minute or more under emulation). The main
one, with the sandbox on (the device processes and seccomp/aarch64 policies) and two vCPUs,
whose initramfs checks uptime, memory, CPUs, the command line, the PL031 RTC, virtio-rng, the
disks (names and sizes, data written to a writable disk, fstrim), virtio-net (pyvmm's own device
on a TAP, in the boot's network namespace: ping and TCP each way with netpeer), vsock (pyvmm's
own device, the host's end a Unix socket: a stream each way with vsockpeer, a suspend and resume
through the control socket that resets the transport, streams opened in turn), the balloon, the
device tree and a clean kernel log, and ends by PSCI SYSTEM_RESET. The second runs its devices
as threads (--disable-sandbox) from the ext4 root disk (-r: the initramfs switches to it), takes
a line typed on its console and is ended from outside by `pyvmm stop`. The third runs the net
and vsock checks again through the host kernel's vhost-net and vhost-vsock (host programs use
AF_VSOCK), each in its device process under its aarch64 policy. The fourth boots the kernel
alone, which goes as far as mounting a root and resets. The fifth is the balloon suite's
pressure run (two VMs whose guests leave the host low on memory, their low-memory policies
growing the balloons until it is back), with the x86_64 suite's checks.
Skipped, with the reason, where arm64 emulation cannot be installed.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import random
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvmm.arch.aarch64 import fdt
from pyvmm.harness import balloonpeer, netcheck, vsockpeer
from pyvmm.harness.armroot import missing_emulation
from pyvmm.harness.boots import DEFAULT_TIMEOUT, BootResult, BootSpec, command_report
from pyvmm.harness.kit import make_ext4
from pyvmm.harness.linux import LinuxHarness
from pyvmm.harness.testvm_arm64 import QEMU_ARM64
from tests.integration.linux.conftest import completed, guest_check, guest_match, peer_ok
from tests.integration.linux.test_linux_balloon import (
    FILLED,
    GUEST_BALLOON,
    READY,
    SLACK,
    PressureRun,
    check_balloons_grew_step_by_step,
    check_memory_came_back,
    check_pressure_ended_well,
    pressure_run,
    pressure_spec,
)
from tests.integration.linux.test_linux_boot import VFS_PANIC
from tests.integration.linux.test_linux_disks import STOP_MARKER
from tests.integration.linux.test_linux_vsock import GUEST_RESET, OLD_STREAM_ENDS

MiB = 1 << 20
MEM_MIB = 1024
CPUS = 2
SEED = 0xA64
TOKEN = "pyvmm.token=a64c0de"
# From the initramfs, not the ext4 root disk (-r): the net and vsock checks need its writable
# /tmp and its vsock helper. The root disk has a boot of its own (ROOT_CHECKS).
CHECKS = [
    "uptime", "mem", "cpus", "cmdline", "rtc", "hwrng", "dt", "disks", "rwdisk", "trim",
    "net", "vsock", "vsockreset", "vsockconn", "balloon", "dmesg",
]  # fmt: skip
# The third boot: the NIC and the vsock device through the host kernel's vhost-net and
# vhost-vsock (the arm64 test VM loads both), each in its device process under its policy.
VHOST_CHECKS = ["net", "vsock", "vsockreset", "vsockconn", "dmesg"]
ROOT_CHECKS = ["root", "hwrng", "input", "wait"]  # the last waits for `pyvmm stop`
TYPED = "typed on the arm64 console"
COPY_MIB = 8
DATA_MIB = 12
TRIM_MIB = 32
FILL_MIB = 12
MIN_TRIMMED = 8 * MiB
NET_MIB = 4  # each way
VSOCK_MIB = 4  # each way
BALLOON_MIB = 128
BALLOON_FILL_MIB = 256  # what the guest writes before the balloon grows and after it shrinks
# The guest's bound on each balloon step: an upper bound only (the run beside another test VM
# took over two minutes for the last one once).
BALLOON_WAIT_S = 240
WAIT_S = 60  # the guest's bound on each transfer
VSOCK_PORT = 5000
VSOCK_CID = 3
VHOST_CID = 10000 + os.getpid() % 50000  # vhost-vsock's CIDs are the (test VM's) host's to share
CONNS = 20  # streams the host opens in turn to a guest that closes each at once


def _cannot_run() -> str | None:
    """Why arm64 guests cannot be booted here (None when they can)."""
    if os.uname().machine == "aarch64":
        return None if os.path.exists("/dev/kvm") else "/dev/kvm is absent"
    if shutil.which(QEMU_ARM64) is None:
        return f"{QEMU_ARM64} not found (apt-get install qemu-system-arm)"
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        return "aarch64-linux-gnu-gcc not found (apt-get install gcc-aarch64-linux-gnu)"
    return missing_emulation()


pytestmark = pytest.mark.skipif(_cannot_run() is not None, reason=f"arm64: {_cannot_run()}")


@dataclass
class Streams:
    """A boot's net and vsock checks and what the host's peers reported ({} when one never
    ran)."""

    result: BootResult
    cid: int
    old_streams_end: set[str]  # how the host sees the streams a transport reset dropped end
    net: dict[str, Any]
    vsock: dict[str, Any]
    vsock_reset: dict[str, Any]
    conns: dict[str, Any]


@dataclass
class Boot:
    result: BootResult
    own: Streams  # through pyvmm's own net and vsock devices (the main boot)
    vhost: Streams  # through vhost-net and vhost-vsock
    source: bytes
    data: bytes
    trim: str
    device_tree: bytes
    balloon: dict[str, Any]  # balloonpeer's reports ({} when it never ran)
    balloon_done: dict[str, Any]
    root: BootResult  # the root-disk boot, ended by pyvmm stop
    no_initrd: BootResult  # the kernel alone: as far as the root mount, then PSCI reset
    pressure: PressureRun
    root_token: str
    root_control: str


def _trim_image(directory: Path) -> Path:
    """An ext4 image holding one FILL_MIB MiB file, every block of it allocated."""
    tree = directory / "trim-tree"
    tree.mkdir()
    (tree / "fill").write_bytes(b"\x5a" * (FILL_MIB * MiB))
    image = make_ext4(tree, directory / "trim.img", TRIM_MIB, label="pyvmm-trim")
    shutil.rmtree(tree)
    fd = os.open(image, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, TRIM_MIB * MiB)
    finally:
        os.close(fd)
    return image


def _stream_peers(python: str, guest: vsockpeer.Guest, control: str) -> dict[str, list[str]]:
    """The host's peers for a boot's net and vsock checks, by the guest line that starts each."""
    return {
        netcheck.NET_READY: netcheck.peer_argv(NET_MIB, 2 * WAIT_S, python),
        vsockpeer.DATA_READY: vsockpeer.peer_argv(
            "data", guest, VSOCK_PORT, 2 * WAIT_S, str(VSOCK_MIB), python=python
        ),
        vsockpeer.RESET_READY: vsockpeer.peer_argv(
            "reset", guest, VSOCK_PORT, WAIT_S, "--control", control, python=python
        ),
        vsockpeer.CONNS_READY: vsockpeer.peer_argv(
            "conns", guest, VSOCK_PORT, WAIT_S, "--count", str(CONNS), python=python
        ),
    }


def _vsock_params(cid: int) -> str:
    """The vsock checks' parameters without their pyvmm.check= (the net's names them all)."""
    return vsockpeer.kernel_params([], cid, VSOCK_PORT, VSOCK_MIB, WAIT_S, CONNS).split(" ", 1)[1]


def _streams(result: BootResult, cid: int, old_streams_end: set[str]) -> Streams:
    return Streams(
        result,
        cid,
        old_streams_end,
        netcheck.peer_report(result),
        vsockpeer.peer_report(result.commands, vsockpeer.DATA_READY),
        vsockpeer.peer_report(result.commands, vsockpeer.RESET_READY),
        vsockpeer.peer_report(result.commands, vsockpeer.CONNS_READY),
    )


@pytest.fixture(scope="module")
def boot() -> Iterator[Boot]:
    harness = LinuxHarness(progress=print, arch="aarch64")
    print(harness.placement.describe())
    files = harness.guest_files()
    source = random.Random(SEED).randbytes(COPY_MIB * MiB)
    with harness.session() as dirs:
        src_img = dirs.local / "src.img"
        src_img.write_bytes(source)
        data_img = dirs.shared / "data.img"
        with open(data_img, "wb") as f:
            f.truncate(DATA_MIB * MiB)
        trim_img = _trim_image(dirs.local)
        dtb = dirs.shared / "guest.dtb"
        control = str(dirs.local / "arm64.ctl")
        root = harness.root_image()
        root_control = str(dirs.local / "arm64-root.ctl")
        uds = str(dirs.local / "vsock.sock")  # a Unix socket: not on 9p

        vsock_guest = vsockpeer.Guest(uds=uds)
        spec = BootSpec(
            "arm64",
            harness.pyvmm_argv(
                *["-c", str(CPUS), "-m", str(MEM_MIB), "-p", "quiet"],
                *["-i", str(files.initramfs)],
                *["--rwdisk", str(data_img), "-d", str(src_img), "--rwdisk", str(trim_img)],
                *[*netcheck.pyvmm_net_args(), "--cid", str(VSOCK_CID), "--vsock-uds", uds],
                *["-p", netcheck.kernel_params(CHECKS, NET_MIB, WAIT_S), "-p", TOKEN],
                *["-p", _vsock_params(VSOCK_CID)],
                *["-p", f"pyvmm.mem={MEM_MIB}", "-p", f"pyvmm.cpus={CPUS}"],
                *["--dump-device-tree-blob", str(dtb), "-s", control],
                *["-p", f"pyvmm.balloon_mib={BALLOON_MIB} pyvmm.balloon_fill={BALLOON_FILL_MIB}"],
                *["-p", f"pyvmm.balloon_wait={BALLOON_WAIT_S}"],
                "-p",
                f"pyvmm.data=vda pyvmm.src=vdb pyvmm.mib={COPY_MIB} pyvmm.trim=vdc",
                str(files.vmlinux),
            ),
            watch=[str(trim_img)],
            timeout=DEFAULT_TIMEOUT + 5 * WAIT_S + 4 * BALLOON_WAIT_S,
            on_line={
                **_stream_peers(harness.python, vsock_guest, control),
                READY: balloonpeer.peer_argv(
                    "cycle", control, 2 * BALLOON_WAIT_S, str(BALLOON_MIB), python=harness.python
                ),
                FILLED: balloonpeer.peer_argv(
                    "done", control, BALLOON_WAIT_S, python=harness.python
                ),
            },
            netns=True,
        )
        root_spec = BootSpec(
            "arm64-root",
            harness.pyvmm_argv(
                *["-m", str(MEM_MIB), "-p", "quiet", "--disable-sandbox"],
                *["-i", str(files.initramfs), "-r", str(root.path), "-s", root_control],
                *["-p", f"pyvmm.check={','.join(ROOT_CHECKS)} pyvmm.root_token={root.token}"],
                str(files.vmlinux),
            ),
            on_line={STOP_MARKER: harness.pyvmm_control_argv("stop", Path(root_control))},
            watch=[root_control],
            type_line=TYPED,
        )
        vhost_control = str(dirs.local / "arm64-vhost.ctl")
        vhost_spec = BootSpec(
            "arm64-vhost",
            harness.pyvmm_argv(
                *["-m", str(MEM_MIB), "-p", "quiet", "-i", str(files.initramfs)],
                *[*netcheck.pyvmm_net_args(), "--net-vhost", "on", "--cid", str(VHOST_CID)],
                *["-p", netcheck.kernel_params(VHOST_CHECKS, NET_MIB, WAIT_S)],
                *["-p", _vsock_params(VHOST_CID)],
                *["-s", vhost_control, str(files.vmlinux)],
            ),
            timeout=DEFAULT_TIMEOUT + 5 * WAIT_S,
            on_line=_stream_peers(harness.python, vsockpeer.Guest(cid=VHOST_CID), vhost_control),
            netns=True,
        )
        no_initrd_spec = BootSpec(
            "arm64-no-initrd",
            harness.pyvmm_argv("-m", str(MEM_MIB), "-p", "quiet", str(files.vmlinux)),
        )
        pressure = pressure_spec(
            "arm64-pressure", harness.python, dirs.local, files.vmlinux, files.initramfs
        )
        result, root_result, vhost_result, no_initrd_result, pressure_result = harness.run(
            [spec, root_spec, vhost_spec, no_initrd_spec, pressure]
        )
        yield Boot(
            result,
            _streams(result, VSOCK_CID, OLD_STREAM_ENDS["vsock-uds"]),
            # The host kernel's vhost-vsock may also learn of a dropped stream's end at once
            # (seen here: the one the guest had connected, closed as the guest reset it). Either
            # way it is the kernel's doing; pyvmm's own device is held to "closed".
            _streams(vhost_result, VHOST_CID, OLD_STREAM_ENDS["vhost-vsock"] | {"closed"}),
            source,
            data_img.read_bytes(),
            str(trim_img),
            dtb.read_bytes() if dtb.exists() else b"",
            command_report(result.commands, READY, "balloonpeer"),
            command_report(result.commands, FILLED, "balloonpeer"),
            root_result,
            no_initrd_result,
            pressure_run(pressure_result),
            root.token,
            root_control,
        )


def test_arm64_guest_boots_and_runs_every_check(boot: Boot) -> None:
    result = boot.result
    completed(result)
    print(f"arm64 guest: init after {result.to_init_s} s, pyvmm ran {result.wall_s:.1f} s")
    if result.stderr.strip():
        print(f"pyvmm's stderr:\n{result.stderr.strip()[-3000:]}")
    for name in CHECKS:
        guest_check(result, name)
    assert TOKEN in guest_check(result, "cmdline")
    assert guest_check(result, "hwrng").startswith("virtio_rng")
    assert "GUEST done" in result.output, f"init did not finish:\n{result.output[-3000:]}"


def test_arm64_guest_disks_are_named_in_order_and_written_and_trimmed(boot: Boot) -> None:
    assert guest_check(boot.result, "disks").split() == [
        f"vda:{DATA_MIB * MiB}:rw:pyvmm-vda",
        f"vdb:{COPY_MIB * MiB}:ro:pyvmm-vdb",
        f"vdc:{TRIM_MIB * MiB}:rw:pyvmm-vdc",
    ]
    want = hashlib.sha256(boot.source).hexdigest()
    assert guest_check(boot.result, "rwdisk").split()[:2] == ["sha256", want]
    assert hashlib.sha256(boot.data[: COPY_MIB * MiB]).hexdigest() == want
    before, after = boot.result.watched[boot.trim]
    assert before is not None and after is not None, "trim.img vanished"
    assert before.allocated - after.allocated >= MIN_TRIMMED, (before, after)


WAYS = pytest.mark.parametrize("way", ["own", "vhost"])


def _way(boot: Boot, way: str) -> Streams:
    return boot.own if way == "own" else boot.vhost


def test_arm64_vhost_boot_runs_every_check(boot: Boot) -> None:
    completed(boot.vhost.result)
    for name in VHOST_CHECKS:
        guest_check(boot.vhost.result, name)


@WAYS
def test_arm64_guest_moves_data_over_virtio_net_each_way(boot: Boot, way: str) -> None:
    streams = _way(boot, way)
    details = guest_check(streams.result, "net")
    assert details.startswith(f"eth0 {netcheck.MAC} virtio_net; ping {netcheck.HOST_IP} 3/3"), (
        details
    )
    assert "error" not in streams.net, streams.net
    sent, received = streams.net["sent"], streams.net["received"]
    assert sent["bytes"] == received["bytes"] == NET_MIB * MiB, streams.net
    # The guest sends back what it received: the same bytes reach the host.
    assert sent["sha256"] == received["sha256"], streams.net
    assert f"rx {NET_MIB * MiB} bytes sha256 {sent['sha256']}" in details, details


@WAYS
def test_arm64_guest_moves_data_over_vsock_each_way(boot: Boot, way: str) -> None:
    streams = _way(boot, way)
    details = guest_check(streams.result, "vsock")
    assert details.startswith(f"cid {streams.cid};"), details
    assert "error" not in streams.vsock, streams.vsock
    sent, received = streams.vsock["sent"], streams.vsock["received"]
    assert sent["bytes"] == received["bytes"] == VSOCK_MIB * MiB, streams.vsock
    assert f"rx {VSOCK_MIB * MiB} bytes crc32 {sent['crc32']}" in details, details
    assert f"tx {VSOCK_MIB * MiB} bytes crc32 {received['crc32']}" in details, details


@WAYS
def test_arm64_suspend_and_resume_reset_the_guests_vsock_streams(boot: Boot, way: str) -> None:
    streams = _way(boot, way)
    details = guest_check(streams.result, "vsockreset")
    m = GUEST_RESET.fullmatch(details)
    assert m, f"GUEST vsockreset ok line not understood: {details}"
    assert (m["accepted"], m["connected"]) == ("ECONNRESET", "ECONNRESET"), details
    report = peer_ok(streams.result, vsockpeer.RESET_READY, streams.vsock_reset, "vsockpeer")
    assert set(report["old"].values()) <= streams.old_streams_end, report["old"]


@WAYS
def test_arm64_host_streams_opened_in_turn_are_each_taken(boot: Boot, way: str) -> None:
    streams = _way(boot, way)
    details = guest_check(streams.result, "vsockconn")
    assert details.startswith(f"{CONNS} connections in "), details
    report = peer_ok(streams.result, vsockpeer.CONNS_READY, streams.conns, "vsockpeer")
    assert report["connections"] == CONNS


def _guest_tree(output: str) -> dict[str, bytes]:
    """path -> value of every property in the guest's GUEST-DT64 lines (a gzipped tar of its
    /sys/firmware/devicetree/base, in base64)."""
    lines = [
        line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("GUEST-DT64 ")
    ]
    packed = gzip.decompress(base64.b64decode("".join(lines)))
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        files = [(m, tar.extractfile(m)) for m in tar.getmembers() if m.isfile()]
        return {"/" + m.name.removeprefix("./"): f.read() for m, f in files if f is not None}


def test_arm64_guest_sees_the_device_tree_pyvmm_wrote(boot: Boot) -> None:
    """Node by node, property by property: what Linux took in (/sys/firmware/devicetree) is the
    tree --dump-device-tree-blob saved, but for the `name` property Linux gives every node."""
    guest_check(boot.result, "dt")
    assert boot.device_tree, "pyvmm wrote no device tree (--dump-device-tree-blob)"
    written = fdt.properties(boot.device_tree)
    seen = _guest_tree(boot.result.output)
    synthesized = {p for p in seen if p.endswith("/name") and p not in written}
    assert set(written) == set(seen) - synthesized, (
        f"only pyvmm's: {sorted(set(written) - set(seen))}; "
        f"only Linux's: {sorted(set(seen) - synthesized - set(written))}"
    )
    changed = sorted(p for p in written if written[p] != seen[p])
    assert not changed, [(p, written[p].hex(), seen[p].hex()) for p in changed]


def test_arm64_guest_gives_the_balloon_its_memory_and_gets_it_back(boot: Boot) -> None:
    m = guest_match(boot.result, "balloon", GUEST_BALLOON)
    before, inflated, deflated = (int(m[k]) * 1024 for k in ("before", "inflated", "deflated"))
    assert abs((before - inflated) - BALLOON_MIB * MiB) <= SLACK, m.group(0)
    assert abs(before - deflated) <= SLACK, m.group(0)
    cycle = peer_ok(boot.result, READY, boot.balloon, "balloonpeer")
    freed = cycle["before"] - cycle["inflated"]
    assert abs(freed - BALLOON_MIB * MiB) <= SLACK, f"the memfd gave back {freed / MiB:.1f} MiB"
    filled = peer_ok(boot.result, FILLED, boot.balloon_done, "balloonpeer")["filled"]
    assert filled - cycle["inflated"] >= BALLOON_MIB * MiB - SLACK
    assert cycle["stats"]["total_memory"] > (MEM_MIB - 128) * MiB


def test_arm64_guest_runs_from_the_root_disk_and_pyvmm_stop_ends_it(boot: Boot) -> None:
    """-r on arm64: the initramfs switched to the ext4 disk, read-only; the devices as threads
    (virtio-rng answered); `pyvmm stop` through the control socket ends the VM with status 0."""
    result = boot.root
    completed(result)
    details = guest_check(result, "root")
    assert details.startswith(f"/dev/vda ext4 ro marker={boot.root_token},"), details
    assert details.endswith("write refused: Read-only file system"), details
    guest_check(result, "hwrng")
    assert result.checks.get("input") == ["ok", TYPED], "the line typed on the console"
    assert STOP_MARKER in result.output, f"the guest never got ready:\n{result.output[-3000:]}"
    assert "GUEST done" not in result.output, "the guest ended by itself, not by pyvmm stop"
    [stop] = result.commands
    assert stop.returncode == 0, f"pyvmm stop exited {stop.returncode}: {stop.output}"
    before, after = result.watched[boot.root_control]
    assert stop.watched[boot.root_control] is not None, "no control socket while running"
    assert before is None and after is None, "pyvmm left its control socket behind"


def test_arm64_kernel_without_initrd_boots_to_the_root_mount(boot: Boot) -> None:
    """No initrd and no disk: the kernel gets as far as mounting a root and, with panic=1,
    resets through PSCI; pyvmm exits 0."""
    completed(boot.no_initrd)
    assert VFS_PANIC in boot.no_initrd.output, boot.no_initrd.output[-3000:]


def test_arm64_under_pressure_both_guests_finish_and_nothing_is_oom_killed(boot: Boot) -> None:
    check_pressure_ended_well(boot.pressure)


def test_arm64_low_memory_grows_every_balloon_step_by_step(boot: Boot) -> None:
    check_balloons_grew_step_by_step(boot.pressure)


def test_arm64_memory_comes_back_above_the_margin(boot: Boot) -> None:
    check_memory_came_back(boot.pressure)
