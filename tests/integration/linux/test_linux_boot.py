"""A stock Debian kernel boots under pyvmm: bzImage and vmlinux, with and without an initrd,
one and two vCPUs, natively where the host can, else inside the test VM.

All boots run in one go (one test VM boot) and each test judges one boot's report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pyvmm.harness.boots import BootResult, BootSpec
from pyvmm.harness.linux import LinuxHarness
from tests.integration.linux.conftest import completed

MEM_MIB = 2048
TOKEN = "pyvmm.token=7f3a9c"
TYPED = "hello from the host console"
# Each boot's result, and when the run of all of them started and finished (time.time()).
Boots = dict[str, tuple[BootResult, tuple[float, float]]]
WITH_INITRD_CHECKS = "uptime,mem,cpus,cmdline,rtc,dmesg"
VFS_PANIC = "VFS: Unable to mount root fs"


@pytest.fixture(scope="module")
def boots() -> Iterator[Boots]:
    harness = LinuxHarness(progress=print)
    print(harness.placement.describe())
    files = harness.guest_files()

    def pyvmm(kernel: str, cpus: int, *extra: str) -> list[str]:
        return harness.pyvmm_argv(
            "-c", str(cpus), "-m", str(MEM_MIB), "-p", "quiet", *extra, kernel
        )

    checks = f"pyvmm.check={WITH_INITRD_CHECKS}"
    expect = ["-p", f"pyvmm.mem={MEM_MIB}"]
    specs = [
        BootSpec(
            "bzimage-initrd-2cpu",
            pyvmm(
                str(files.bzimage),
                2,
                "-i",
                str(files.initramfs),
                "-p",
                TOKEN,
                "-p",
                f"{checks},input",
                "-p",
                "pyvmm.cpus=2",
                *expect,
            ),
            type_line=TYPED,
        ),
        BootSpec(
            "vmlinux-initrd-1cpu",
            pyvmm(
                str(files.vmlinux),
                1,
                "-i",
                str(files.initramfs),
                "-p",
                checks,
                "-p",
                "pyvmm.cpus=1",
                *expect,
            ),
        ),
        BootSpec("bzimage-no-initrd-1cpu", pyvmm(str(files.bzimage), 1)),
        BootSpec("vmlinux-no-initrd-2cpu", pyvmm(str(files.vmlinux), 2)),
    ]
    started = time.time()
    results = harness.run(specs)
    finished = time.time()
    yield {r.name: (r, (started, finished)) for r in results}


def _all_ok(result: BootResult, names: list[str]) -> None:
    for name in names:
        assert name in result.checks, f"{result.name}: no GUEST {name} line in:\n{result.output}"
        status, details = result.checks[name]
        assert status == "ok", f"{result.name}: GUEST {name} FAIL {details}"
    assert "GUEST done" in result.output, f"{result.name}: init did not finish"


@pytest.mark.parametrize("name", ["bzimage-initrd-2cpu", "vmlinux-initrd-1cpu"])
def test_kernel_boots_to_init_and_sees_the_machine(boots: Boots, name: str) -> None:
    result, (started, finished) = boots[name]
    completed(result)
    _all_ok(result, WITH_INITRD_CHECKS.split(","))
    cpus = 2 if "2cpu" in name else 1
    assert result.checks["cpus"][1].startswith(f"{cpus} online")
    assert "quiet" in result.checks["cmdline"][1]
    rtc = int(result.checks["rtc"][1].split()[0])
    # The guest read the RTC during this boot, one of those run between `started` and
    # `finished` (a minute's slack for a clock read in whole seconds, and the test VM's own).
    assert started - 60 <= rtc <= finished + 5


def test_kernel_command_line_carries_params(boots: Boots) -> None:
    result, _ = boots["bzimage-initrd-2cpu"]
    completed(result)
    cmdline = result.checks["cmdline"][1].split()
    assert TOKEN in cmdline
    assert "console=ttyS0" in cmdline


def test_console_input_reaches_the_guest(boots: Boots) -> None:
    result, _ = boots["bzimage-initrd-2cpu"]
    completed(result)
    assert result.checks.get("input") == ["ok", TYPED]


@pytest.mark.parametrize("name", ["bzimage-no-initrd-1cpu", "vmlinux-no-initrd-2cpu"])
def test_kernel_without_initrd_boots_to_the_root_mount(boots: Boots, name: str) -> None:
    # No disks yet: the kernel gets as far as mounting a root and, with panic=1, resets.
    result, _ = boots[name]
    completed(result)
    assert VFS_PANIC in result.output
