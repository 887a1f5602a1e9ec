"""Benchmarks with Debian's kernel, both VMMs under the same KVM: natively where this host's KVM
boots a stock kernel, else inside one test VM. Inside the test VM everything is emulated and
absolute times mean little; the pyvmm/QEMU ratio is what carries over.

- boot: Debian's kernel with the kit's initramfs to its init (the kernel's uptime when init
  starts, and the wall time from starting the VMM to init's first line).
- dd: `dd` of 256 MiB from a virtio-blk disk backed by a raw file in the page cache (of the
  machine the VMM runs on), timed by the guest.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from bench.measure import PYVMM, QEMU, Row
from bench.vmms import qemu_disk_args
from pyvmm.harness.boots import BootResult, BootSpec
from pyvmm.harness.linux import LinuxHarness

MEM_MIB = 1024
DD_MIB = 256


@dataclass(frozen=True)
class Commands:
    """What the report shows so anyone can rerun the QEMU side."""

    pyvmm: str
    qemu: str


def _qemu(bzimage: str, initramfs: str, append: str, disk: str | None = None) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", "pc", "-smp", "1",
        "-m", str(MEM_MIB), "-nodefaults", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-kernel", bzimage, "-initrd", initramfs,
        "-append", f"console=ttyS0 reboot=k panic=1 quiet {append}",
    ]  # fmt: skip
    return argv + qemu_disk_args(disk) if disk is not None else argv


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


def run(runs: int) -> tuple[list[Row], dict[str, str]]:
    harness = LinuxHarness(progress=print)
    files = harness.guest_files()
    bz, initrd = str(files.bzimage), str(files.initramfs)
    boot_checks = "pyvmm.check=uptime"
    dd_checks = f"pyvmm.check=ddread pyvmm.src=vda pyvmm.mib={DD_MIB}"
    with harness.session() as dirs:
        image = str(dirs.local / "dd.img")
        argv = {
            (PYVMM, "boot"): harness.pyvmm_argv(
                "-m", str(MEM_MIB), "-i", initrd, "-p", "quiet", "-p", boot_checks, bz
            ),
            (QEMU, "boot"): _qemu(bz, initrd, boot_checks),
            (PYVMM, "dd"): harness.pyvmm_argv(
                "-m",
                str(MEM_MIB),
                "-i",
                initrd,
                "-d",
                image,
                "-p",
                "quiet",
                "-p",
                dd_checks,
                bz,
            ),
            (QEMU, "dd"): _qemu(bz, initrd, dd_checks, disk=image),
        }
        specs = [
            BootSpec(f"{vmm}-{what}-{i}", _with_image(image, argv[vmm, what]))
            for i in range(runs)
            for what in ("boot", "dd")
            for vmm in (PYVMM, QEMU)
        ]
        results = harness.run(specs)
    where = harness.placement.describe()
    rows = [
        Row("linux boot", "kernel uptime at init", "s", False),
        Row("linux boot", "wall time to init", "s", False),
        Row("linux dd", f"{DD_MIB} MiB from virtio-blk", "MB/s", True),
    ]
    for vmm in (PYVMM, QEMU):
        boots = [r for r in results if r.name.startswith(f"{vmm}-boot-")]
        dds = [r for r in results if r.name.startswith(f"{vmm}-dd-")]
        uptimes = [u for r in boots if (u := _uptime(r)) is not None]
        if not uptimes:
            failed = boots[0] if boots else None
            raise RuntimeError(
                f"{vmm} did not boot to init: "
                + ((failed.stderr or failed.output)[-800:] if failed else "no runs")
            )
        rows[0].record(vmm, uptimes)
        rows[1].record(vmm, [r.to_init_s for r in boots if r.to_init_s is not None])
        dd_s = [s for r in dds if (s := _dd_seconds(r)) is not None]
        if not dd_s:
            failed = dds[0] if dds else None
            raise RuntimeError(
                f"{vmm} dd failed: " + ((failed.stderr or failed.output)[-800:] if failed else "")
            )
        rows[2].record(vmm, [DD_MIB * (1 << 20) / s / 1e6 for s in dd_s])
    commands = {
        "where": where,
        "qemu boot": shlex.join(argv[QEMU, "boot"]),
        "qemu dd": shlex.join(argv[QEMU, "dd"]),
    }
    return rows, commands
