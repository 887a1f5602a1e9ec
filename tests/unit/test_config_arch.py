"""What `VmConfig.validate` checks against the VM's architecture: the limits (the x86 MP
table's and IO-APIC's, or arm64's GICv3 redistributors and SPIs), and whether it has a device
tree to dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.arch.aarch64.machine import Aarch64
from pyvmm.arch.interface import Arch
from pyvmm.arch.x86_64.machine import X86_64
from pyvmm.config import ConfigError, DiskConfig, VmConfig

ARCHES = [pytest.param(X86_64(), id="x86_64"), pytest.param(Aarch64(), id="aarch64")]


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    path = tmp_path / "kernel"
    path.write_bytes(b"\0" * 64)
    return str(path)


def _disks(tmp_path: Path, count: int) -> tuple[DiskConfig, ...]:
    disks = []
    for i in range(count):
        image = tmp_path / f"d{i}.img"
        image.write_bytes(bytes(4096))
        disks.append(DiskConfig(str(image), writable=False))
    return tuple(disks)


def test_the_limits_are_the_machines() -> None:
    assert (X86_64.max_cpus, X86_64.max_pci_devices) == (33, 16)  # EBDA, 16 PCI IO-APIC pins
    assert (Aarch64.max_cpus, Aarch64.max_pci_devices) == (511, 31)  # redistributors, slots


@pytest.mark.parametrize("arch", ARCHES)
def test_as_many_vcpus_as_the_machine_describes_and_no_more(kernel: str, arch: Arch) -> None:
    VmConfig(kernel, cpus=arch.max_cpus).validate(arch)
    with pytest.raises(ConfigError, match=rf"-c/--cpus {arch.max_cpus + 1}: .* 1 to"):
        VmConfig(kernel, cpus=arch.max_cpus + 1).validate(arch)


@pytest.mark.parametrize("arch", ARCHES)
def test_disks_fill_the_pci_devices_left_by_rng_and_the_balloon(
    tmp_path: Path, kernel: str, arch: Arch
) -> None:
    room = arch.max_pci_devices - 2
    VmConfig(kernel, disks=_disks(tmp_path, room)).validate(arch)
    with pytest.raises(ConfigError, match=rf"d{room}.img: at most {room} disks"):
        VmConfig(kernel, disks=_disks(tmp_path, room + 1)).validate(arch)
    VmConfig(kernel, disks=_disks(tmp_path, room + 1), balloon=None).validate(arch)


def test_a_device_tree_is_dumped_only_where_there_is_one(tmp_path: Path, kernel: str) -> None:
    blob = str(tmp_path / "guest.dtb")
    VmConfig(kernel, dump_device_tree=blob).validate(Aarch64())
    with pytest.raises(ConfigError, match=r"^--dump-device-tree-blob .*guest.dtb: x86_64 guests"):
        VmConfig(kernel, dump_device_tree=blob).validate(X86_64())


@pytest.mark.parametrize(
    ("where", "why"),
    [("missing/guest.dtb", "is not a directory this process can write"), (".", "a directory")],
)
def test_a_device_tree_dump_needs_a_file_it_can_write(
    tmp_path: Path, kernel: str, where: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^--dump-device-tree-blob .*: .*{why}"):
        VmConfig(kernel, dump_device_tree=str(tmp_path / where)).validate(Aarch64())
