"""A stock Debian kernel's vsock driver (vmw_vsock_virtio_transport) uses pyvmm's virtio-vsock,
both ways pyvmm runs it: its own device (`--cid 3 --vsock-uds PATH`: host programs go through
the Unix socket PATH) and the host kernel's vhost-vsock (`--cid N`: host programs use AF_VSOCK).
Each way, the guest has the CID given; a host program reaches a guest listener and VSOCK_MIB MiB
cross intact (CRC-32 at both ends); the guest reaches a host listener and as many cross back;
a suspend and resume through the control socket resets the transport: the streams open then
end in the guest with ECONNRESET, and new ones work both ways; and streams the host opens one
after another are each taken by the guest. The kernel log stays clean.

The host's side is pyvmm.harness.vsockpeer, started when the guest says it is ready. All boots
run in one go (one test VM boot, which loads vhost_vsock) and each test judges every boot's
report.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pyvmm.harness.boots import BootResult, BootSpec
from pyvmm.harness.linux import LinuxHarness
from pyvmm.harness.vsockpeer import (
    CONNS_READY,
    DATA_READY,
    GUEST_VSOCK,
    RESET_READY,
    Guest,
    kernel_params,
    peer_argv,
    peer_report,
)
from tests.integration.linux.conftest import completed, guest_check, guest_match, peer_ok

MiB = 1 << 20
MEM_MIB = 512
VSOCK_MIB = 64  # each way
PORT = 5000  # the guest listens on it (and + 2), the host on + 1 (and + 3)
WAIT_S = 120  # the guest's bound on each step (its vsock tool is killed then)
CONNS = 20  # streams the host opens in turn to a guest that closes each at once
CHECKS = ["uptime", "vsock", "vsockreset", "vsockconn", "dmesg"]
UDS_CID = 3
# vhost-vsock's CIDs are the host's to share among all its VMs: one out of the way of others'.
VHOST_CID = 10000 + os.getpid() % 50000
VHOST_VSOCK = "/dev/vhost-vsock"
GUEST_RESET = re.compile(
    r"accepted: ended (?P<accepted>\S+) after (?P<accepted_s>[\d.]+) s, accepted again; "
    r"connected: ended (?P<connected>\S+) after (?P<connected_s>[\d.]+) s, connected again"
)
# How the host sees the streams that the transport reset dropped end. pyvmm's device closes its
# host sockets as it drops the streams. vhost-vsock leaves the host's sockets open (the host
# kernel is not told): one learns it only when it next sends, and the guest answers with RST.
OLD_STREAM_ENDS = {
    "vsock-uds": {"closed"},
    "vhost-vsock": {"closed when written to", "reset when written to"},
}


@dataclass
class VsockBoot:
    result: BootResult
    cid: int
    data: dict[str, Any]  # vsockpeer's reports ({} when it never ran)
    reset: dict[str, Any]
    conns: dict[str, Any]


@pytest.fixture(scope="module")
def boots() -> Iterator[dict[str, VsockBoot]]:
    harness = LinuxHarness(progress=print)
    print(harness.placement.describe())
    files = harness.guest_files()
    with harness.session() as dirs:
        uds = str(dirs.local / "vsock.sock")  # a Unix socket: not on 9p
        ways: dict[str, tuple[int, list[str], Guest]] = {
            "vsock-uds": (UDS_CID, ["--vsock-uds", uds], Guest(uds=uds))
        }
        if not harness.placement.native or os.path.exists(VHOST_VSOCK):
            ways["vhost-vsock"] = (VHOST_CID, [], Guest(cid=VHOST_CID))
        specs = []
        for name, (cid, flags, guest) in ways.items():
            control = str(dirs.local / f"{name}.ctl")
            specs.append(
                BootSpec(
                    name,
                    harness.pyvmm_argv(
                        *["-m", str(MEM_MIB), "-p", "quiet", "-i", str(files.initramfs)],
                        *["--cid", str(cid), *flags, "-s", control],
                        *["-p", kernel_params(CHECKS, cid, PORT, VSOCK_MIB, WAIT_S, CONNS)],
                        str(files.bzimage),
                    ),
                    # Boot, the transfers each way and the reset (each bounded in the guest).
                    timeout=120 + 3 * WAIT_S,
                    on_line={
                        DATA_READY: peer_argv("data", guest, PORT, 2 * WAIT_S, str(VSOCK_MIB)),
                        RESET_READY: peer_argv("reset", guest, PORT, WAIT_S, "--control", control),
                        CONNS_READY: peer_argv("conns", guest, PORT, WAIT_S, "--count", str(CONNS)),
                    },
                )
            )
        results = harness.run(specs)
    out: dict[str, VsockBoot] = {}
    for result, (cid, _, _) in zip(results, ways.values(), strict=True):
        boot = VsockBoot(
            result,
            cid,
            peer_report(result.commands, DATA_READY),
            peer_report(result.commands, RESET_READY),
            peer_report(result.commands, CONNS_READY),
        )
        out[result.name] = boot
        _say(boot)
    yield out


def _say(boot: VsockBoot) -> None:
    """The throughput each way, as the sender clocked it: from its connection to the
    receiver's answer that every byte came."""
    name = boot.result.name
    uptime = boot.result.checks.get("uptime", ["", "?"])[1]
    to_init = boot.result.to_init_s or 0.0
    print(
        f"{name}: {boot.result.wall_s:.1f} s in all; init ran {to_init:.1f} s after the VMM "
        f"started, {uptime} s after the kernel did"
    )
    m = GUEST_VSOCK.search(boot.result.checks.get("vsock", ["", ""])[1])
    ways: list[tuple[str, int, float, str, str]] = []
    if "sent" in boot.data and m:
        sent = boot.data["sent"]
        ways.append(("host -> guest", sent["bytes"], sent["seconds"], "host", m["rx_cpu"]))
    if m:
        ways.append(("guest -> host", int(m["tx_bytes"]), float(m["tx_s"]), "guest", m["tx_cpu"]))
    for label, size, seconds, clock, tool_cpu in ways:
        rate = f"{size / seconds / 1e6:.1f} MB/s" if seconds > 0 else "no time"
        print(
            f"{name}: {label}: {size / 1e6:.0f} MB in {seconds:.2f} s ({clock}'s clock), {rate}; "
            f"the guest's tool used {tool_cpu} of CPU"
        )
    if "received" in boot.data:
        took = boot.data["received"]["seconds"]
        print(f"{name}: guest -> host by the host's clock, from its accept: {took:.2f} s")
    if "resume_s" in boot.reset:
        r = boot.reset
        print(f"{name}: suspend {r['suspend_s']:.2f} s, resume {r['resume_s']:.2f} s")
        print(f"{name}: the old streams as the host saw them end: {r['old']}")
    if "seconds" in boot.conns:
        took = boot.conns["seconds"]
        print(f"{name}: {CONNS} connections opened in turn in {took:.2f} s")


def _boot(boots: dict[str, VsockBoot], name: str) -> VsockBoot:
    if name not in boots:
        pytest.skip(f"{VHOST_VSOCK} is absent on this host (modprobe vhost_vsock)")
    return boots[name]


def _peer(boot: VsockBoot, marker: str, report: dict[str, Any]) -> dict[str, Any]:
    return peer_ok(boot.result, marker, report, "vsockpeer")


def _guest_vsock(boot: VsockBoot) -> re.Match[str]:
    return guest_match(boot.result, "vsock", GUEST_VSOCK)


BOOT_NAMES = pytest.mark.parametrize("name", ["vsock-uds", "vhost-vsock"])


@BOOT_NAMES
def test_vsock_boot_runs_every_check_and_resets(boots: dict[str, VsockBoot], name: str) -> None:
    result = _boot(boots, name).result
    completed(result)
    for check in CHECKS:
        guest_check(result, check)
    assert "GUEST done" in result.output, f"init did not finish:\n{result.output[-3000:]}"


@BOOT_NAMES
def test_the_guest_has_the_cid_given(boots: dict[str, VsockBoot], name: str) -> None:
    boot = _boot(boots, name)
    assert int(_guest_vsock(boot)["cid"]) == boot.cid


@BOOT_NAMES
def test_a_host_program_reaches_a_guest_listener(boots: dict[str, VsockBoot], name: str) -> None:
    boot = _boot(boots, name)
    m = _guest_vsock(boot)
    sent = _peer(boot, DATA_READY, boot.data)["sent"]
    assert sent["bytes"] == int(m["rx_bytes"]) == VSOCK_MIB * MiB, "host -> guest: lengths differ"
    assert sent["guest"]["bytes"] == sent["bytes"], "the guest's answer to the host differs"
    assert m["rx_crc"] == sent["guest"]["crc32"] == sent["crc32"], "host -> guest: data differ"


@BOOT_NAMES
def test_the_guest_reaches_a_host_listener(boots: dict[str, VsockBoot], name: str) -> None:
    boot = _boot(boots, name)
    m = _guest_vsock(boot)
    received = _peer(boot, DATA_READY, boot.data)["received"]
    assert received["bytes"] == int(m["tx_bytes"]) == VSOCK_MIB * MiB, "guest -> host: lengths"
    assert received["crc32"] == m["tx_crc"], "guest -> host: the host received other data"


@BOOT_NAMES
def test_resume_resets_the_guests_streams(boots: dict[str, VsockBoot], name: str) -> None:
    # TRANSPORT_RESET: Linux's driver ends every connected stream with ECONNRESET (a stream the
    # peer closed would end without an error).
    boot = _boot(boots, name)
    details = guest_check(boot.result, "vsockreset")
    m = GUEST_RESET.fullmatch(details)
    assert m, f"{name}: GUEST vsockreset ok line not understood: {details}"
    assert (m["accepted"], m["connected"]) == ("ECONNRESET", "ECONNRESET"), details
    old = _peer(boot, RESET_READY, boot.reset)["old"]
    assert set(old.values()) <= OLD_STREAM_ENDS[name], f"{name}: the host's old streams: {old}"


@BOOT_NAMES
def test_new_streams_work_after_the_reset(boots: dict[str, VsockBoot], name: str) -> None:
    boot = _boot(boots, name)
    details = guest_check(boot.result, "vsockreset")
    assert "accepted again" in details and "connected again" in details, details
    assert _peer(boot, RESET_READY, boot.reset).get("again") is True


@BOOT_NAMES
def test_streams_opened_one_after_another_each_reach_the_guest(
    boots: dict[str, VsockBoot], name: str
) -> None:
    boot = _boot(boots, name)
    details = guest_check(boot.result, "vsockconn")
    assert details.startswith(f"{CONNS} connections in "), f"{name}: {details}"
    assert _peer(boot, CONNS_READY, boot.conns)["connections"] == CONNS


@BOOT_NAMES
def test_kernel_log_is_clean_with_vsock(boots: dict[str, VsockBoot], name: str) -> None:
    guest_check(_boot(boots, name).result, "dmesg")
