"""Device processes forked by the zygote: each is a child of the VMM with only the fds its spec
names, the zygote ends when the VMM is done with it, and a zygote that dies is a one-line reason
for every device it still owed."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.child import DeviceSpec, DiskSpec, TapSpec, VsockSpec
from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.proxy import DeviceProcessError, start_device
from pyvmm.devices.spawner import DeviceSpawner
from pyvmm.memory import GuestMemory
from tests.unit.devices.test_proxy import FakeVm, rng_spec

MiB = 1 << 20


@pytest.fixture
def spec() -> Iterator[DeviceSpec]:
    mem = GuestMemory([(0, 4 * MiB)])
    intx = LevelIrq(16)
    try:
        yield rng_spec(mem, intx)
    finally:
        intx.close()
        mem.close()


def children() -> set[int]:
    """This process's children, from every thread's list."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found |= {int(pid) for pid in (task / "children").read_text().split()}
    return found


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def test_fds_and_their_new_numbers() -> None:
    spec = DeviceSpec(
        "net0", "vhost_net_device", 1, 10, 11, [], (5, 12, 13),
        disk=DiskSpec(14, "d.img", True, "s"),
        tap=TapSpec(15, "tap0", True, None, vhost_fd=16),
        vsock=VsockSpec(3, listener=17, dialer=None, vhost_fd=18),
    )  # fmt: skip
    assert spec.fds() == [10, 11, 12, 13, 14, 15, 16, 17, 18]
    moved = spec.renumbered({fd: fd + 100 for fd in spec.fds()})
    assert moved.fds() == [fd + 100 for fd in spec.fds()]
    assert moved.intx == (5, 112, 113)  # the GSI is no fd
    assert moved.vsock is not None and moved.vsock.dialer is None
    assert spec.fds() == [10, 11, 12, 13, 14, 15, 16, 17, 18]  # the original is untouched


def test_a_device_process_is_a_child_of_the_vmm_and_the_zygote_ends(spec: DeviceSpec) -> None:
    before = children()
    spawner = DeviceSpawner()
    device = start_device(spec, FakeVm().calls, spawner)
    try:
        device.wait_ready()
        assert parent_of(device.pid) == os.getpid()
        spawner.close()
        assert children() - before == {device.pid}  # the zygote is gone, the device is not
        assert device.process.poll() is None
    finally:
        device.close()
        spawner.close()
    assert device.process.returncode == 0


def test_a_device_killed_is_seen_with_its_signal(spec: DeviceSpec) -> None:
    spawner = DeviceSpawner()
    device = start_device(spec, FakeVm().calls, spawner)
    spawner.close()
    try:
        device.wait_ready()
        os.kill(device.pid, signal.SIGTERM)
        assert device.process.wait(10) == -signal.SIGTERM
        assert device.process.poll() == -signal.SIGTERM
    finally:
        device.close()


def test_a_zygote_that_dies_is_the_reason_its_devices_give(spec: DeviceSpec) -> None:
    spawner = DeviceSpawner()
    try:
        os.kill(spawner._zygote.pid, signal.SIGSTOP)  # it answers for nothing from now on
        owed = start_device(spec, FakeVm().calls, spawner)
        spawner._zygote.kill()
        spawner._zygote.wait()
        with pytest.raises(DeviceProcessError) as info:
            owed.wait_ready()
        why = str(info.value)
        assert why.startswith("virtio rng: the device process did not start: the device zygote")
        assert "killed by signal 9" in why
        assert owed.pid == 0 and not owed.alive
        owed.close()
        with pytest.raises(DeviceProcessError) as info:  # and for what is asked of it later
            start_device(spec, FakeVm().calls, spawner)
        assert "the device zygote ended (killed by signal 9)" in str(info.value)
    finally:
        spawner.close()
