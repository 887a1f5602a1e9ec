"""A device process behind its proxy, without KVM: the virtio-rng function answers register and
configuration accesses from its own process, asks the VMM for what only the VMM does, and when
the process dies the function reads as absent hardware, reported once."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import pytest

from pyvmm.devices.child import DeviceSpec
from pyvmm.devices.irq import LevelIrq
from pyvmm.devices.pci.config import Command, Reg
from pyvmm.devices.pci.device import VmCalls
from pyvmm.devices.proxy import DeviceProcessError, ProxyDevice, spawn_device
from pyvmm.devices.virtio.device import DeviceType
from pyvmm.devices.virtio.pci import VIRTIO_DEVICE_ID_BASE, VIRTIO_VENDOR_ID, plain_bar_sizes
from pyvmm.memory import GuestMemory

MiB = 1 << 20
BAR_ADDR = 0xE000_0000


class FakeVm:
    """Records what the device process asks of the VM."""

    def __init__(self) -> None:
        self.gsis: list[int] = []
        self.irqfds: dict[int, int] = {}
        self.ioeventfds: dict[int, int] = {}  # address -> our copy of the eventfd
        self.calls = VmCalls(
            allocate_gsi=self.allocate_gsi,
            set_msi_route=lambda gsi, address, data: None,
            register_irqfd=lambda fd, gsi: self.irqfds.__setitem__(gsi, fd),
            register_ioeventfd=lambda fd, address, n: self.ioeventfds.__setitem__(address, fd),
            unregister_ioeventfd=lambda fd, address, n: self.ioeventfds.pop(address),
        )

    def allocate_gsi(self) -> int:
        self.gsis.append(24 + len(self.gsis))
        return self.gsis[-1]


def rng_spec(mem: GuestMemory, intx: LevelIrq) -> DeviceSpec:
    """A virtio-rng device process's spec, its BARs placed at BAR_ADDR."""
    return DeviceSpec(
        name="rng",
        kind="rng_device",
        parent_pid=0,
        sock=-1,
        memfd=mem.memfd,
        ram=[(0, mem.size)],
        intx=(intx.gsi, intx.fd, intx.resample_fd),
        bars=[(index, BAR_ADDR, size) for index, size in plain_bar_sizes().items()],
    )


@pytest.fixture
def rng() -> Iterator[tuple[ProxyDevice, FakeVm]]:
    mem = GuestMemory([(0, 4 * MiB)])
    intx = LevelIrq(16)
    vm = FakeVm()
    device = spawn_device(rng_spec(mem, intx), vm.calls)
    try:
        yield device, vm
    finally:
        device.close()
        intx.close()
        mem.close()


def read(device: ProxyDevice, offset: int, size: int) -> int:
    data = bytearray(size)
    device.config_read(offset, memoryview(data))
    return int.from_bytes(data, "little")


def test_the_process_answers_for_the_function(rng: tuple[ProxyDevice, FakeVm]) -> None:
    device, vm = rng
    device.wait_ready()
    assert device.pid != os.getpid()
    assert read(device, Reg.VENDOR_ID, 2) == VIRTIO_VENDOR_ID
    assert read(device, Reg.DEVICE_ID, 2) == VIRTIO_DEVICE_ID_BASE + DeviceType.RNG
    # Building the device took a GSI and an irqfd for each MSI-X vector (a queue and config).
    assert vm.gsis == [24, 25]
    assert sorted(vm.irqfds) == vm.gsis


def test_bar_moves_reach_the_vm_as_ioeventfds(rng: tuple[ProxyDevice, FakeVm]) -> None:
    device, vm = rng
    # The BARs are where the spec placed them: the root has nothing left to allocate.
    device.allocate_bars(lambda size, what: pytest.fail(f"{what} allocated again"))
    windows = device.config_write(Reg.COMMAND, Command.MEMORY_SPACE.to_bytes(2, "little"))
    assert windows is not None and windows[0][0] == BAR_ADDR
    device.bars_changed({0: BAR_ADDR})
    assert len(vm.ioeventfds) == 1  # the queue's notify address, with the process's eventfd
    (address,) = vm.ioeventfds
    assert address >= BAR_ADDR
    device.bars_changed({})
    assert vm.ioeventfds == {}


def test_a_dead_process_is_reported_once_and_reads_as_absent(
    rng: tuple[ProxyDevice, FakeVm], caplog: pytest.LogCaptureFixture
) -> None:
    device, _ = rng
    device.wait_ready()
    os.kill(device.pid, signal.SIGSYS)
    device.process.wait(10)
    with caplog.at_level(logging.ERROR):
        assert read(device, Reg.VENDOR_ID, 2) == 0xFFFF
        assert read(device, Reg.DEVICE_ID, 2) == 0xFFFF
        device.bar_write(0, 0, b"\x01")  # ignored, no error
    failures = [r.getMessage() for r in caplog.records if "device process" in r.getMessage()]
    assert len(failures) <= 1  # the watcher may have reported it before the reads did
    assert not device.alive
    assert device.pause(1.0)  # nothing left to move


def test_the_death_is_reported_even_without_an_access(
    rng: tuple[ProxyDevice, FakeVm], caplog: pytest.LogCaptureFixture
) -> None:
    device, _ = rng
    device.wait_ready()
    with caplog.at_level(logging.ERROR):
        os.kill(device.pid, signal.SIGSYS)
        device.process.wait(10)
        device._watcher.join(10)
    (message,) = [r.getMessage() for r in caplog.records if "device process" in r.getMessage()]
    assert message.startswith(f"virtio rng: device process {device.pid} failed: killed by SIGSYS")
    assert "seccomp" in message


def test_close_leaves_no_process(rng: tuple[ProxyDevice, FakeVm]) -> None:
    device, _ = rng
    device.wait_ready()
    device.close()
    assert device.process.returncode == 0  # it shut down when asked
    with pytest.raises(ProcessLookupError):
        os.kill(device.pid, 0)


def test_a_process_that_cannot_build_its_device_says_why() -> None:
    mem = GuestMemory([(0, 4 * MiB)])
    intx = LevelIrq(16)
    spec = DeviceSpec(
        "rng", "rng_device", 0, -1, mem.memfd, [(0, 4 * MiB)], (16, intx.fd, intx.resample_fd)
    )
    try:
        with pytest.raises(DeviceProcessError) as info:
            spawn_device(spec, FakeVm().calls)  # no BARs placed: the device disagrees
        assert str(info.value).startswith("virtio rng: the VMM placed BARs [];")
    finally:
        intx.close()
        mem.close()


def test_pause_and_resume_are_answered(rng: tuple[ProxyDevice, FakeVm]) -> None:
    device, _ = rng
    assert device.pause(1.0)
    device.resume()
    assert read(device, Reg.VENDOR_ID, 2) == VIRTIO_VENDOR_ID
