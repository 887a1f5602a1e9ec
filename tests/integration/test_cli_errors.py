"""Bad input to `pyvmm run`: one line naming the culprit, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import needs_kvm, run_pyvmm
from tests.unit.loader.images import MiB, Seg, make_elf


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_kernel(tmp_path: Path) -> None:
    r = run_pyvmm("run", str(tmp_path / "vmlinux"))
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, "vmlinux", "no such file")


def test_unknown_flag(tmp_path: Path) -> None:
    r = run_pyvmm("run", "--frobnicate", str(tmp_path / "k"))
    assert r.returncode == 2
    _assert_one_line_error(r.stderr, "--frobnicate")


@pytest.mark.parametrize("cpus", ["0", "-1"])
def test_no_vcpus(tmp_path: Path, cpus: str) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    r = run_pyvmm("run", "-c", cpus, str(kernel))
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, "-c", cpus)


def test_not_a_number(tmp_path: Path) -> None:
    r = run_pyvmm("run", "-m", "lots", str(tmp_path / "k"))
    assert r.returncode == 2
    _assert_one_line_error(r.stderr, "-m", "lots")


def test_missing_initrd(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    r = run_pyvmm("run", "-i", str(tmp_path / "initrd.img"), str(kernel))
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, "initrd.img", "no such file")


def test_no_kvm_device(tmp_path: Path, probe_elf: Path) -> None:
    device = str(tmp_path / "kvm")
    r = run_pyvmm("run", str(probe_elf), env={"PYVMM_KVM_DEVICE": device})
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, device, "not found")


def test_kvm_device_that_is_not_kvm(probe_elf: Path) -> None:
    r = run_pyvmm("run", str(probe_elf), env={"PYVMM_KVM_DEVICE": "/dev/null"})
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, "/dev/null", "not a KVM device")


@pytest.mark.skipif(os.getuid() != 0, reason="drops root's file-access override to get EACCES")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_kvm_device_without_permission(tmp_path: Path, probe_elf: Path) -> None:
    device = tmp_path / "kvm"  # stands in for a /dev/kvm we may not open
    device.touch(mode=0o000)
    drop = "-dac_override,-dac_read_search"
    r = run_pyvmm(
        "run",
        str(probe_elf),
        env={"PYVMM_KVM_DEVICE": str(device)},
        wrapper=["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"],
    )
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, str(device), "permission denied")


@needs_kvm
def test_file_that_is_no_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "notes.txt"
    kernel.write_text("not a kernel\n" * 100)
    r = run_pyvmm("run", str(kernel))
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, str(kernel), "neither")


@needs_kvm
def test_memory_too_small_for_the_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    # 1 MiB of code and data followed by a 16 MiB BSS: needs RAM up to 18 MiB.
    code = b"\xf4" * MiB
    kernel.write_bytes(make_elf([Seg(0x100000, code, memsz=17 * MiB)], entry=0x100000))
    r = run_pyvmm("run", "-m", "8", str(kernel))
    assert r.returncode != 0
    _assert_one_line_error(r.stderr, str(kernel), "-m")


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        (None, "KERNEL"),
        ("-i", "-i/--initrd"),
        ("-d", "-d/--disk"),
        ("-r", "-r/--root"),
        ("--rwdisk", "--rwdisk"),
        ("--rwroot", "--rwroot"),
    ],
)
def test_a_fifo_is_refused_without_blocking(
    tmp_path: Path, probe_elf: Path, flag: str | None, named: str
) -> None:
    """Nothing writes to the FIFO: an open() that waits for a writer would hang pyvmm."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [str(fifo)] if flag is None else [flag, str(fifo), str(probe_elf)]
    r = run_pyvmm("run", *args, timeout=60)
    assert r.returncode == 1
    _assert_one_line_error(r.stderr, f"{named} {fifo}: is a FIFO (named pipe); expected a")


def test_a_disk_that_cannot_be_sized(probe_elf: Path) -> None:
    r = run_pyvmm("run", "-d", "/proc/version", str(probe_elf))
    assert r.returncode == 1
    _assert_one_line_error(r.stderr, "-d/--disk /proc/version: cannot find its size")


def test_the_same_image_twice(tmp_path: Path, probe_elf: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    link = tmp_path / "same.img"
    link.symlink_to(image)
    r = run_pyvmm("run", "--rwdisk", str(image), "-d", str(link), str(probe_elf))
    assert r.returncode == 1
    _assert_one_line_error(
        r.stderr, f"-d/--disk {link}: the same image is given twice (also as --rwdisk {image})"
    )


@pytest.mark.parametrize("args", [("--version",), ("version",)])
def test_version(args: tuple[str, ...]) -> None:
    r = run_pyvmm(*args)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("pyvmm 0.")


@pytest.mark.parametrize(("flags", "room"), [([], 14), (["--no-balloon"], 15)])
def test_more_disks_than_the_pci_bus_holds(
    tmp_path: Path, probe_elf: Path, flags: list[str], room: int
) -> None:
    """Each disk is a PCI device whose interrupt the MP table describes: it has room for 16
    devices (the 16th disk was a traceback), virtio-rng and the balloon among them."""
    args: list[str] = []
    for i in range(16):
        image = tmp_path / f"d{i}.img"
        image.write_bytes(bytes(4096))
        args += ["-d", str(image)]
    r = run_pyvmm("run", *flags, *args, str(probe_elf))
    assert r.returncode == 1
    _assert_one_line_error(r.stderr, f"-d/--disk {tmp_path / f'd{room}.img'}: at most {room} disks")


NET = ["--host_ip", "192.0.2.1", "--netmask", "255.255.255.0", "--mac", "52:54:00:12:34:56"]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (NET[:4], ["--mac: missing", "go together"]),
        ([*NET[:5], "01:00:5e:00:00:01"], ["--mac 01:00:5e:00:00:01", "multicast"]),
        ([*NET[:5], "52:54:00:12:34"], ["--mac 52:54:00:12:34", "not a MAC address"]),
        (["--host_ip", "192.0.2.256", *NET[2:]], ["--host_ip 192.0.2.256", "not an IPv4"]),
        ([*NET[:2], "--netmask", "255.0.255.0", *NET[4:]], ["--netmask 255.0.255.0"]),
        (["--host_ip", "192.0.2.255", *NET[2:]], ["--host_ip 192.0.2.255", "broadcast"]),
        (["--tap-fd", "63"], ["--tap-fd 63", "not an open file descriptor"]),
        (["--tap-fd", "0"], ["--tap-fd 0", "not a TAP device"]),
    ],
)
def test_bad_network_flags(tmp_path: Path, flags: list[str], fragments: list[str]) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    r = run_pyvmm("run", *flags, str(kernel))
    assert r.returncode == 1
    _assert_one_line_error(r.stderr, *fragments)
