"""The two VMMs under test, as command lines for the same guest work.

pyvmm runs from this tree; QEMU is Debian's qemu-system-x86_64 with KVM. QEMU boots the probe
guest through the PVH note in its ELF and Debian's kernel directly (-kernel), so both run the
same guest binary with the same command line and the same backing files.

QEMU's machine type: `pc` (i440FX). It is the fastest type here that gives the probe a PCI bus
with configuration mechanism #1 and virtio-pci devices: `q35` starts ~0.7 s slower, and
`microvm` has no mechanism #1 (its PCIe host is ECAM-only) and no i8042 to end the run.
`-cpu host,-arch-capabilities`: one PVM host refused QEMU's write of MSR 0x10a.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "guest" / "build" / "probe.elf"
QEMU_BINARY = "qemu-system-x86_64"
QEMU_MACHINE = "pc"
PROBE_MEM_MIB = 256


def qemu_available() -> str | None:
    """Why QEMU cannot be compared here, or None when it can."""
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} not found (apt-get install qemu-system-x86): pyvmm-only numbers"
    return None


def qemu_version() -> str:
    out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def pyvmm_argv(
    kernel: Path,
    params: list[str],
    disks: Sequence[Path] = (),
    mem_mib: int = PROBE_MEM_MIB,
    sandbox: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """pyvmm with its devices in processes of their own (the default), or as threads; `extra`:
    more flags (a NIC)."""
    argv = [sys.executable, "-m", "pyvmm", "run", "-m", str(mem_mib), *extra]
    if not sandbox:
        argv.append("--disable-sandbox")
    for disk in disks:
        argv += ["--rwdisk", str(disk)]
    for param in params:
        argv += ["-p", param]
    return [*argv, str(kernel)]


def pyvmm_threads_argv(
    kernel: Path,
    params: list[str],
    disks: Sequence[Path] = (),
    mem_mib: int = PROBE_MEM_MIB,
    extra: Sequence[str] = (),
) -> list[str]:
    """pyvmm --disable-sandbox: the devices as threads in the VMM process."""
    return pyvmm_argv(kernel, params, disks, mem_mib, sandbox=False, extra=extra)


def qemu_argv(
    kernel: Path,
    params: list[str],
    disks: Sequence[Path] = (),
    mem_mib: int = PROBE_MEM_MIB,
    extra: Sequence[str] = (),
) -> list[str]:
    """QEMU with KVM booting `kernel` through its PVH note; `extra`: more arguments (a NIC)."""
    argv = [
        QEMU_BINARY, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", QEMU_MACHINE,
        "-m", str(mem_mib), "-nodefaults", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-kernel", str(kernel), "-append", " ".join(params),
    ]  # fmt: skip
    for index, disk in enumerate(disks):
        argv += qemu_disk_args(disk, index)
    return [*argv, *extra]


def qemu_disk_args(disk: Path | str, index: int = 0) -> list[str]:
    """A raw virtio-blk disk for QEMU, cached as pyvmm's are: buffered I/O through the host's
    page cache."""
    return [
        "-drive", f"file={disk},format=raw,if=none,id=disk{index},cache=writeback,aio=threads",
        "-device", f"virtio-blk-pci,drive=disk{index},disable-legacy=on",
    ]  # fmt: skip
