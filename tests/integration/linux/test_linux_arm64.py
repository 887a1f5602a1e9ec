"""A stock Debian arm64 kernel boots under pyvmm: natively on an arm64 KVM host, else inside the
arm64 test VM (QEMU's emulated arm64 at EL2, with the arm64 root's Python running pyvmm).

One boot (in one test VM boot: each L2 boot costs a minute or more under emulation), with the
sandbox on (the device processes and seccomp/aarch64 policies) and two vCPUs: the initramfs
switches to an ext4 root on a read-only disk and checks uptime, memory, CPUs, the command line,
the PL031 RTC, virtio-rng, the disks (names and sizes, data written to a writable disk, fstrim)
and a clean kernel log. Skipped, with the reason, where arm64 emulation cannot be installed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm.harness.armroot import missing_emulation
from pyvmm.harness.boots import BootResult, BootSpec
from pyvmm.harness.kit import make_ext4
from pyvmm.harness.linux import LinuxHarness, RootImage
from pyvmm.harness.testvm_arm64 import QEMU_ARM64
from tests.integration.linux.conftest import completed, guest_check

MiB = 1 << 20
MEM_MIB = 1024
CPUS = 2
SEED = 0xA64
TOKEN = "pyvmm.token=a64c0de"
CHECKS = [
    "root", "uptime", "mem", "cpus", "cmdline", "rtc", "hwrng", "disks", "rwdisk", "trim",
    "dmesg",
]  # fmt: skip
COPY_MIB = 8
DATA_MIB = 12
TRIM_MIB = 32
FILL_MIB = 12
MIN_TRIMMED = 8 * MiB


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
class Boot:
    result: BootResult
    root: RootImage
    source: bytes
    data: bytes
    trim: str


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


@pytest.fixture(scope="module")
def boot() -> Iterator[Boot]:
    harness = LinuxHarness(progress=print, arch="aarch64")
    print(harness.placement.describe())
    files = harness.guest_files()
    root = harness.root_image()
    source = random.Random(SEED).randbytes(COPY_MIB * MiB)
    with harness.session() as dirs:
        src_img = dirs.local / "src.img"
        src_img.write_bytes(source)
        data_img = dirs.shared / "data.img"
        with open(data_img, "wb") as f:
            f.truncate(DATA_MIB * MiB)
        trim_img = _trim_image(dirs.local)

        spec = BootSpec(
            "arm64",
            harness.pyvmm_argv(
                *["-c", str(CPUS), "-m", str(MEM_MIB), "-p", "quiet"],
                *["-i", str(files.initramfs), "-r", str(root.path)],
                *["--rwdisk", str(data_img), "-d", str(src_img), "--rwdisk", str(trim_img)],
                *["-p", f"pyvmm.check={','.join(CHECKS)}", "-p", TOKEN],
                *["-p", f"pyvmm.mem={MEM_MIB}", "-p", f"pyvmm.cpus={CPUS}"],
                *["-p", f"pyvmm.root_token={root.token}"],
                "-p",
                f"pyvmm.data=vdb pyvmm.src=vdc pyvmm.mib={COPY_MIB} pyvmm.trim=vdd",
                str(files.vmlinux),
            ),
            watch=[str(trim_img)],
        )
        (result,) = harness.run([spec])
        yield Boot(result, root, source, data_img.read_bytes(), str(trim_img))


def test_arm64_guest_boots_and_runs_every_check(boot: Boot) -> None:
    result = boot.result
    completed(result)
    print(f"arm64 guest: init after {result.to_init_s} s, pyvmm ran {result.wall_s:.1f} s")
    for name in CHECKS:
        guest_check(result, name)
    assert TOKEN in guest_check(result, "cmdline")
    assert guest_check(result, "hwrng").startswith("virtio_rng")
    assert "GUEST done" in result.output, f"init did not finish:\n{result.output[-3000:]}"


def test_arm64_guest_root_is_the_read_only_ext4_disk(boot: Boot) -> None:
    root = guest_check(boot.result, "root")
    assert root.startswith(f"/dev/vda ext4 ro marker={boot.root.token},"), root


def test_arm64_guest_disks_are_named_in_order_and_written_and_trimmed(boot: Boot) -> None:
    assert guest_check(boot.result, "disks").split() == [
        f"vda:{boot.root.size_mib * MiB}:ro:pyvmm-vda",
        f"vdb:{DATA_MIB * MiB}:rw:pyvmm-vdb",
        f"vdc:{COPY_MIB * MiB}:ro:pyvmm-vdc",
        f"vdd:{TRIM_MIB * MiB}:rw:pyvmm-vdd",
    ]
    want = hashlib.sha256(boot.source).hexdigest()
    assert guest_check(boot.result, "rwdisk").split()[:2] == ["sha256", want]
    assert hashlib.sha256(boot.data[: COPY_MIB * MiB]).hexdigest() == want
    before, after = boot.result.watched[boot.trim]
    assert before is not None and after is not None, "trim.img vanished"
    assert before.allocated - after.allocated >= MIN_TRIMMED, (before, after)
