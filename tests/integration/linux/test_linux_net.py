"""A stock Debian kernel's virtio_net driver uses pyvmm's virtio-net NIC (a TAP that pyvmm makes
with --host_ip/--netmask/--mac): the NIC has the MAC given, the guest pings the host, NET_MIB MiB
cross over TCP each way intact (the host's random data to the guest, and back), the checksum and
segmentation offloads are negotiated and used (frames larger than the MTU both ways), and the
kernel log stays clean.

Each boot runs in a network namespace of its own (natively, or inside the test VM, which has no
network device anyway). The host's end of the TCP exchange is pyvmm.harness.netpeer, started in
that namespace when the guest says it listens. All boots run in one go (one test VM boot) and
each test judges every boot's report.
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
from pyvmm.harness.netcheck import (
    HOST_IP,
    MAC,
    NET_READY,
    kernel_params,
    peer_argv,
    peer_report,
    pyvmm_net_args,
)
from tests.integration.linux.conftest import completed, guest_check

MiB = 1 << 20
MEM_MIB = 512
NET_MIB = 64  # each way
NET_WAIT_S = 120  # the guest's bound on each transfer (nc is killed then)
PEER_TIMEOUT_S = 2 * NET_WAIT_S
NET_CHECKS = ["net", "dmesg"]
MTU_FRAME = 1514  # the largest Ethernet frame without segmentation (MTU 1500)
# What the driver must accept of what pyvmm offers (UFO only where the host kernel's TAP takes it).
REQUIRED_FEATURES = {
    "CSUM", "GUEST_CSUM", "MAC", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "HOST_TSO4",
    "HOST_TSO6", "HOST_ECN", "MRG_RXBUF", "STATUS", "VERSION_1",
}  # fmt: skip
# One boot per way of running the NIC: name -> pyvmm flags it adds. The test VM loads vhost_net,
# so both of pyvmm's data paths run: its own device, and the kernel's.
NET_BOOTS: dict[str, list[str]] = {
    "net": ["--net-vhost", "off"],
    "net-vhost": ["--net-vhost", "on"],
}
GUEST_NET = re.compile(
    r"(?P<iface>\S+) (?P<mac>\S+) (?P<driver>\S+); "
    r"ping (?P<host>\S+) (?P<replies>\d+)/(?P<pings>\d+); "
    r"rx (?P<rx_bytes>\d+) bytes sha256 (?P<sha256>[0-9a-f]{64}) in (?P<rx_frames>\d+) frames of "
    r"(?P<rx_avg>\d+) bytes; tx (?P<tx_bytes>\d+) bytes in (?P<tx_frames>\d+) frames of "
    r"(?P<tx_avg>\d+) bytes; features (?P<features>\S+)$"
)


@dataclass
class NetBoot:
    result: BootResult
    peer: dict[str, Any]  # pyvmm.harness.netpeer's report ({} when it never ran)


@pytest.fixture(scope="module")
def boots() -> Iterator[dict[str, NetBoot]]:
    harness = LinuxHarness(progress=print)
    print(harness.placement.describe())
    if harness.placement.native and os.geteuid() != 0:
        pytest.skip("a boot with a TAP runs in a network namespace of its own: that needs root")
    files = harness.guest_files()
    params = kernel_params(NET_CHECKS, NET_MIB, NET_WAIT_S)
    peer = peer_argv(NET_MIB, PEER_TIMEOUT_S)
    specs = [
        BootSpec(
            name,
            harness.pyvmm_argv(
                *["-m", str(MEM_MIB), "-p", "quiet", "-i", str(files.initramfs)],
                *pyvmm_net_args(),
                *flags,
                *["-p", params, str(files.bzimage)],
            ),
            # Boot (~180 s to init in CI beside another test VM), ping, both transfers (each
            # bounded in the guest), the dmesg check. A guest that stops is caught sooner, by
            # its beat.
            timeout=300 + 2 * NET_WAIT_S,
            on_line={NET_READY: peer},
            netns=True,
        )
        for name, flags in NET_BOOTS.items()
    ]
    results = harness.run(specs)
    out: dict[str, NetBoot] = {}
    for result in results:
        report = peer_report(result)
        out[result.name] = NetBoot(result, report)
        _say_throughput(result.name, report)
    yield out


def _say_throughput(name: str, report: dict[str, Any]) -> None:
    for way, label in (("sent", "host -> guest"), ("received", "guest -> host")):
        phase = report.get(way)
        if phase and phase["seconds"] > 0:
            mib, seconds = phase["bytes"] / MiB, phase["seconds"]
            print(f"{name}: {label}: {mib:.0f} MiB in {seconds:.1f} s, {mib / seconds:.1f} MiB/s")


def _guest_net(boot: NetBoot) -> re.Match[str]:
    details = guest_check(boot.result, "net")
    m = GUEST_NET.fullmatch(details)
    assert m, f"{boot.result.name}: GUEST net ok line not understood: {details}"
    return m


def _peer(boot: NetBoot) -> dict[str, Any]:
    commands = boot.result.commands
    assert commands, f"{boot.result.name}: the guest never said '{NET_READY}'"
    assert "error" not in boot.peer and commands[0].returncode == 0, (
        f"{boot.result.name}: netpeer exited {commands[0].returncode}: {commands[0].output}"
    )
    return boot.peer


BOOT_NAMES = pytest.mark.parametrize("name", list(NET_BOOTS))


@BOOT_NAMES
def test_net_boot_runs_every_check_and_resets(boots: dict[str, NetBoot], name: str) -> None:
    result = boots[name].result
    completed(result)
    for check in NET_CHECKS:
        guest_check(result, check)
    assert "GUEST done" in result.output, f"init did not finish:\n{result.output[-3000:]}"


@BOOT_NAMES
def test_virtio_net_drives_the_nic_with_the_mac_given(boots: dict[str, NetBoot], name: str) -> None:
    m = _guest_net(boots[name])
    assert (m["mac"], m["driver"]) == (MAC, "virtio_net")


@BOOT_NAMES
def test_guest_pings_the_host(boots: dict[str, NetBoot], name: str) -> None:
    m = _guest_net(boots[name])
    assert m["host"] == HOST_IP
    assert m["replies"] == m["pings"] == "3"


@BOOT_NAMES
def test_tcp_carries_the_data_intact_each_way(boots: dict[str, NetBoot], name: str) -> None:
    m = _guest_net(boots[name])
    peer = _peer(boots[name])
    sent, received = peer["sent"], peer["received"]
    assert sent["bytes"] == int(m["rx_bytes"]) == NET_MIB * MiB, "host -> guest: lengths differ"
    assert m["sha256"] == sent["sha256"], "host -> guest: the guest received other data"
    assert int(m["tx_bytes"]) == received["bytes"] == NET_MIB * MiB, "guest -> host: lengths differ"
    assert received["sha256"] == sent["sha256"], "guest -> host: the echo came back changed"


@BOOT_NAMES
def test_checksum_and_segmentation_offloads_are_negotiated(
    boots: dict[str, NetBoot], name: str
) -> None:
    features = set(_guest_net(boots[name])["features"].split(","))
    missing = REQUIRED_FEATURES - features
    assert not missing, f"not negotiated: {sorted(missing)} (negotiated: {sorted(features)})"


@BOOT_NAMES
def test_segmentation_offloads_carry_frames_larger_than_the_mtu(
    boots: dict[str, NetBoot], name: str
) -> None:
    # Whole TSO segments cross: the guest's driver counts them as single frames, as does the TAP.
    m = _guest_net(boots[name])
    peer = _peer(boots[name])
    assert int(m["rx_avg"]) > MTU_FRAME, f"the guest received no large frames: {m[0]}"
    assert int(m["tx_avg"]) > MTU_FRAME, f"the guest sent no large frames: {m[0]}"
    for way in ("sent", "received"):
        phase = peer[way]
        avg = phase["frame_bytes"] / max(phase["frames"], 1)
        assert avg > MTU_FRAME, f"the TAP's frames while the host {way}: {phase}"


@BOOT_NAMES
def test_kernel_log_is_clean_with_net(boots: dict[str, NetBoot], name: str) -> None:
    guest_check(boots[name].result, "dmesg")
