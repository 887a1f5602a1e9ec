"""The arm64 test VM: QEMU's emulated arm64 with EL2, so a stock Debian arm64 kernel has KVM.

`qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max` boots Debian's arm64
kernel at EL2, and its built-in KVM runs in VHE mode. The host's own Python cannot run there, so
the test VM boots from the arm64 root (pyvmm.harness.armroot: Debian arm64 with Python and
pyvmm's dependencies) read-only on virtio-blk under a tmpfs overlay, and the host shares over 9p,
each at its own path: the project tree and the kit's cache read-only under tmpfs overlays (as
the host's tree is in the x86_64 test VM), the scratch directory read-write. The command runs in
a chroot of that root, as in the x86_64 test VM (same heartbeat, lockup retry and results;
pyvmm.harness.testvm).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pyvmm.harness.armroot import build_root
from pyvmm.harness.kit import GuestKit
from pyvmm.harness.testvm import (
    DEFAULT_MEM_MIB,
    HEARTBEAT_INTERVAL_S,
    SCRATCH_TAG,
    TestVm,
    TestVmError,
    WatchedFiles,
    default_cpus,
)

QEMU_ARM64 = "qemu-system-aarch64"
# EL2 for the guest kernel (KVM), GICv3 (what pyvmm's vGIC prefers). QEMU's own pointer
# authentication algorithm instead of the architected one (QARMA): the same feature to the
# guest, much cheaper to emulate.
MACHINE = "virt,virtualization=on,gic-version=3"
CPU = "max,pauth-impdef=on"
PROJECT_TAG = "project"
CACHE_TAG = "cache"
# The test VM's init loads: virtio-pci, the root disk (ext4 on virtio-blk), the console that
# carries the heartbeat (virtio-console: QEMU's virt machine has one UART, the kernel's
# console), 9p and overlay for the shares, tun, vhost-net and vhost-vsock. KVM is built in.
TESTVM_ARM64_MODULES = [
    "virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "virtio_console", "9pnet_virtio",
    "9p", "overlay", "tun", "vhost_net", "vhost_vsock",
]  # fmt: skip
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TESTVM_ARM64_INIT_TEMPLATE = r"""#!/bin/busybox sh
# arm64 test VM init: load the drivers, mount the arm64 root (read-only, under a tmpfs overlay)
# and the host's shares, run the command in a chroot of the root, record its status, power off.
/bin/busybox --install -s /bin
export PATH={path}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || echo "testvm: insmod $m failed"
done
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
# The heartbeat the host watches to tell a stopped emulator from a slow command.
( while :; do cut -d' ' -f1 /proc/uptime; sleep {heartbeat}; done > /dev/hvc0 2>&1 ) &
param() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
scratch="$(param pyvmm.scratch)"
work="$(param pyvmm.work)"
project="$(param pyvmm.project)"
cache="$(param pyvmm.cache)"
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /lower /upper /host
if ! mount -t ext4 -o ro /dev/vda /lower; then
    echo "testvm: cannot mount the arm64 root"; poweroff -f
fi
mount -t tmpfs -o mode=755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /host
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs tmpfs /host/run
mount -t tmpfs tmpfs /host/tmp
# Each share read-only under a tmpfs overlay, as the host's tree is in the x86_64 test VM: the
# project, so that Python writes its bytecode once per test VM instead of compiling pyvmm in
# every process (device processes too); the kit's cache, where the boots' local files
# (LinuxHarness.session) are, for what they write.
shared() {  # tag, path
    mkdir -p "/shares/$1" "/upper/$1-data" "/upper/$1-work" "/host$2"
    mount -t 9p -o "$opts,ro,cache=loose" "$1" "/shares/$1"
    mount -t overlay -o "lowerdir=/shares/$1,upperdir=/upper/$1-data,workdir=/upper/$1-work" \
        overlay "/host$2"
}
shared {project_tag} "$project"
shared {cache_tag} "$cache"
mkdir -p "/host$scratch"
mount -t 9p -o "$opts" {scratch_tag} "/host$scratch"
echo "testvm: ready after $(cut -d' ' -f1 /proc/uptime) s"
chroot /host /bin/sh "$work/command.sh" > "/host$work/output" 2>&1
echo $? > "/host$work/status"
sync
umount "/host$scratch"
poweroff -f
"""
TESTVM_ARM64_INIT = (
    TESTVM_ARM64_INIT_TEMPLATE.replace("{heartbeat}", str(HEARTBEAT_INTERVAL_S))
    .replace("{path}", PATH)
    .replace("{project_tag}", PROJECT_TAG)
    .replace("{cache_tag}", CACHE_TAG)
    .replace("{scratch_tag}", SCRATCH_TAG)
)


class Arm64TestVm(TestVm):
    """Boots the arm64 kit's Debian kernel under qemu-system-aarch64 with KVM inside; `project`
    (the tree the command runs from) is shared read-only at its own path."""

    __test__ = False

    def __init__(
        self,
        kit: GuestKit,
        project: Path,
        mem_mib: int = DEFAULT_MEM_MIB,
        cpus: int | None = None,
    ) -> None:
        if kit.arch.name != "aarch64":
            raise TestVmError(f"the arm64 test VM needs the aarch64 kit, not {kit.arch.name}'s")
        if shutil.which(QEMU_ARM64) is None:
            raise TestVmError(f"{QEMU_ARM64} not found: apt-get install qemu-system-arm")
        self.kit = kit
        self.project = project.resolve()
        self.mem_mib = mem_mib
        self.cpus = cpus or default_cpus()

    def initramfs(self) -> Path:
        return self.kit.build_initramfs("testvm", TESTVM_ARM64_INIT, TESTVM_ARM64_MODULES)

    def qemu_command(
        self, initramfs: Path, scratch: Path, workdir: Path, watched: WatchedFiles
    ) -> list[str]:
        kernel = self.kit.kernel()
        root = build_root(self.kit)
        cache = self.kit.cache_dir.resolve()
        append = (
            f"console=ttyAMA0 quiet loglevel=4 panic=-1 pyvmm.scratch={scratch} "
            f"pyvmm.work={workdir} pyvmm.project={self.project} pyvmm.cache={cache}"
        )

        def share(path: Path, tag: str, readonly: bool) -> list[str]:
            ro = ",readonly=on" if readonly else ""
            return [
                "-virtfs",
                f"local,path={path},mount_tag={tag},security_model=none{ro},multidevs=remap",
            ]

        return [
            QEMU_ARM64,
            "-M",
            MACHINE,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            CPU,
            "-smp",
            str(self.cpus),
            "-m",
            str(self.mem_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{watched.console}",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"file,id=heartbeat,path={watched.heartbeat}",
            "-device",
            "virtconsole,chardev=heartbeat",
            "-kernel",
            str(kernel.vmlinux),
            "-initrd",
            str(initramfs),
            "-append",
            append,
            "-drive",
            f"file={root},if=none,id=root,format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=root",
            *share(self.project, PROJECT_TAG, True),
            *share(cache, CACHE_TAG, True),
            *share(scratch, SCRATCH_TAG, False),
        ]
