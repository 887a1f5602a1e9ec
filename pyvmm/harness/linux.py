"""Run Linux guest boots where a stock kernel can boot: on this host's KVM, or in the test VM.

`choose_placement()` decides and says why; `LinuxHarness.run()` runs a list of BootSpecs there
and returns their results. The kit's kernel and initramfs are built (or found cached) first.
A harness is for one guest architecture (`arch`, the host's by default); arm64 guests on an
x86_64 host run in the arm64 test VM (pyvmm.harness.testvm_arm64).

Files the boots use live in the directories of a `LinuxHarness.session()`: `shared` is read and
written by the boots and the host sees what they wrote (in the test VM it is the scratch
directory, shared over 9p); `local` is on the filesystem where the boots run, for what 9p cannot
do (fallocate hole punching, Unix sockets), and in the test VM what the boots write there is
discarded with the VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pyvmm.harness.boots import BEAT_PARAM, BootResult, BootSpec, run_boots
from pyvmm.harness.kit import GuestKit, KitError, make_ext4
from pyvmm.harness.testvm import TestVm, TestVmError
from pyvmm.harness.testvm_arm64 import Arm64TestVm
from pyvmm.native.helpers import HELPERS, Helper

ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = ROOT / "guest" / "linux" / "init"
TESTVM_OVERHEAD_S = 180.0
# Drivers the guest checks need that Debian builds as modules. ext4 asks for crc32c (its
# checksums) through request_module, which finds no modprobe in the guest: load it ourselves.
GUEST_MODULES = [
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "crc32c_generic", "ext4",
    "vmw_vsock_virtio_transport", "virtio_balloon",
]  # fmt: skip
# Small static programs for what busybox cannot do, compiled by the kit: path in the
# initramfs -> C source.
GUEST_HELPERS = {"bin/vsock": ROOT / "guest" / "linux" / "vsock.c"}
# The guest root disk (-r): busybox, the same init, and a marker file that tells the init it runs
# from the disk (see guest/linux/init).
ROOT_IMAGE_FORMAT = b"pyvmm-guest-root-1"  # bump when the image layout changes
ROOT_IMAGE_DIR = "images"
ROOT_IMAGE_MIB = 64
ROOT_MARKER = "etc/pyvmm-root"
ROOT_DIRS = ("bin", "dev", "etc", "mnt", "proc", "sbin", "sys", "tmp")
# The Python that runs pyvmm in a test VM of another architecture (the arm64 root's).
TESTVM_PYTHON = "python3"


@dataclass(frozen=True)
class Placement:
    native: bool
    reason: str

    def describe(self) -> str:
        where = "natively on this host's KVM" if self.native else "inside the test VM"
        return f"Linux guests run {where}: {self.reason}"


def cpuinfo(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("" when there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def host_machine() -> str:
    return os.uname().machine


def choose_placement(kvm_path: str = "/dev/kvm", arch: str | None = None) -> Placement:
    """Native when the host's KVM can boot a stock kernel of `arch` (default: the host's),
    else the test VM of that architecture."""
    host = host_machine()
    if arch is not None and arch != host:
        return Placement(False, f"the host is {host}: {arch} guests run in the {arch} test VM")
    if os.environ.get("PYVMM_TEST_KERNEL"):
        return Placement(True, f"PYVMM_TEST_KERNEL={os.environ['PYVMM_TEST_KERNEL']} boots here")
    if not os.path.exists(kvm_path):
        return Placement(False, f"{kvm_path} is absent")
    if host == "aarch64":
        return Placement(True, f"{kvm_path} is an arm64 KVM, which boots stock kernels")
    flags = _cpu_flags()
    if flags & {"vmx", "svm"}:
        found = "VMX" if "vmx" in flags else "SVM"
        return Placement(True, f"the host CPU has {found}, so its KVM boots stock kernels")
    return Placement(
        False,
        "the host CPU has neither VMX nor SVM (its KVM, e.g. PVM, cannot boot a stock kernel)",
    )


@dataclass(frozen=True)
class GuestFiles:
    """The kernel in both forms pyvmm boots (on arm64 both are the Image) and the initramfs."""

    bzimage: Path
    vmlinux: Path
    initramfs: Path


@dataclass(frozen=True)
class RootImage:
    """An ext4 guest root: boot it with the guest initramfs and `-r path`; its init runs the
    checks. `token` is the content of its /etc/pyvmm-root."""

    path: Path
    token: str
    size_mib: int


@dataclass(frozen=True)
class RunTiming:
    """One LinuxHarness.run: the guests' architecture, its wall time (the test VM's start and
    stop included) and the boots it ran (each with its own wall time)."""

    arch: str
    wall_s: float
    results: list[BootResult]


# Every run of this process, in order: the Linux suite reports where its time went.
TIMINGS: list[RunTiming] = []


@dataclass(frozen=True)
class BootDirs:
    """Where a session's boots find and leave files (see the module's docstring)."""

    shared: Path
    local: Path


def _busybox_applets(busybox: Path) -> list[str]:
    try:
        proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise KitError(f"{busybox} --list failed: {e}") from e
    return sorted(a for a in proc.stdout.split() if a and "/" not in a and a != "busybox")


def build_root_image(kit: GuestKit, size_mib: int = ROOT_IMAGE_MIB) -> RootImage:
    """The guest root disk, cached in the kit by a hash of what it is made from. Its /bin has
    busybox and a link per applet (the root is read-only: busybox --install cannot run there)."""
    init = GUEST_INIT.read_bytes()
    busybox = kit.busybox()
    busybox_bytes = busybox.read_bytes()
    applets = _busybox_applets(busybox)
    h = hashlib.sha256()
    for part in (ROOT_IMAGE_FORMAT, init, busybox_bytes, " ".join(applets).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    h.update(size_mib.to_bytes(8, "little"))
    key = h.hexdigest()[:16]
    token = f"pyvmm-guest-root-{key}"
    out = kit.cache_dir / ROOT_IMAGE_DIR / f"guest-root-{key}.ext4"
    if out.is_file():
        return RootImage(out, token, size_mib)
    with tempfile.TemporaryDirectory(prefix="guest-root-") as d:
        tree = Path(d)
        for sub in ROOT_DIRS:
            (tree / sub).mkdir()
        (tree / "tmp").chmod(0o1777)
        (tree / "bin" / "busybox").write_bytes(busybox_bytes)
        (tree / "bin" / "busybox").chmod(0o755)
        for applet in applets:
            (tree / "bin" / applet).symlink_to("busybox")
        (tree / "init").write_bytes(init)
        (tree / "init").chmod(0o755)
        (tree / "sbin" / "init").symlink_to("/init")
        (tree / ROOT_MARKER).write_text(token + "\n")
        make_ext4(tree, out, size_mib, label="pyvmm-root")
    return RootImage(out, token, size_mib)


class LinuxHarness:
    """Builds the guest kit's files and runs boots natively or in the test VM, for guests of
    one architecture: `arch` ("x86_64", "aarch64"), else the kit's, else the host's."""

    def __init__(
        self,
        kit: GuestKit | None = None,
        placement: Placement | None = None,
        progress: Callable[[str], None] | None = None,
        arch: str | None = None,
    ) -> None:
        self.arch = arch or (kit.arch.name if kit is not None else host_machine())
        self.kit = kit or GuestKit(progress=progress, arch=self.arch)
        if self.kit.arch.name != self.arch:
            raise KitError(f"a harness for {self.arch} guests given the {self.kit.arch.name} kit")
        self.placement = placement or choose_placement(arch=self.arch)
        self._dirs: BootDirs | None = None

    @property
    def python(self) -> str:
        """The Python that runs pyvmm where the boots run."""
        foreign = self.arch != host_machine() and not self.placement.native
        return TESTVM_PYTHON if foreign else sys.executable

    def guest_files(self) -> GuestFiles:
        kernel = self.kit.kernel()
        helpers: dict[str, bytes | Path] = {
            path: self.kit.build_helper(source) for path, source in GUEST_HELPERS.items()
        }
        initramfs = self.kit.build_initramfs(
            "guest", GUEST_INIT.read_text(), GUEST_MODULES, helpers
        )
        if self.arch != "x86_64":
            return GuestFiles(kernel.vmlinux, kernel.vmlinux, initramfs)  # the Image
        override = os.environ.get("PYVMM_TEST_KERNEL")
        bzimage = Path(override) if override else kernel.bzimage
        vmlinux = Path(override) if override else kernel.vmlinux
        return GuestFiles(bzimage, vmlinux, initramfs)

    def root_image(self, size_mib: int = ROOT_IMAGE_MIB) -> RootImage:
        return build_root_image(self.kit, size_mib)

    def pyvmm_argv(self, *args: str) -> list[str]:
        """`pyvmm run ARGS`, the guest's init beating (boots.BEAT_PARAM) so that a guest that
        stops is caught then, not at its boot's timeout."""
        return [self.python, "-m", "pyvmm", "run", "-p", BEAT_PARAM, *args]

    def pyvmm_control_argv(self, command: str, socket: Path) -> list[str]:
        return [self.python, "-m", "pyvmm", command, str(socket)]

    @contextlib.contextmanager
    def session(self) -> Iterator[BootDirs]:
        """Directories for the files of the boots run() runs until the block ends (then they
        are deleted). Create the files first, then run()."""
        if self._dirs is not None:
            raise RuntimeError("LinuxHarness.session() is already open")
        scratch_root = self.kit.cache_dir / "scratch"
        scratch_root.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(dir=scratch_root, prefix="shared-") as shared,
            tempfile.TemporaryDirectory(dir=scratch_root, prefix="local-") as local,
        ):
            self._dirs = BootDirs(Path(shared), Path(local))
            try:
                yield self._dirs
            finally:
                self._dirs = None

    def run(self, specs: list[BootSpec]) -> list[BootResult]:
        """Run the boots one after the other; inside a session() when one is open."""
        if self._dirs is None:
            with self.session():
                return self.run(specs)
        start = time.monotonic()
        if self.placement.native:
            results = run_boots(specs)
        else:
            results = self._run_in_testvm(specs, self._dirs.shared)
        TIMINGS.append(RunTiming(self.arch, time.monotonic() - start, results))
        return results

    def _run_in_testvm(self, specs: list[BootSpec], scratch: Path) -> list[BootResult]:
        # The scratch directory is the session's shared one: the boots' own files are there.
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".boots-") as d:
            spec_file = Path(d) / "specs.json"
            result_file = Path(d) / "results.json"
            spec_file.write_text(json.dumps([s.__dict__ for s in specs]))
            # Room for every boot plus one rerun of the longest (run_boots reruns a hung boot).
            timeout = sum(s.timeout for s in specs) + max(s.timeout for s in specs)
            timeout += TESTVM_OVERHEAD_S
            result = self._testvm().run(
                [self.python, "-m", "pyvmm.harness.boots", str(spec_file), str(result_file)],
                scratch=scratch,
                timeout=timeout,
                cwd=ROOT,
            )
            if result.lockup_retry is not None:
                warnings.warn(
                    f"boots reran in a second test VM: {result.lockup_retry}", stacklevel=2
                )
            if result.returncode != 0 or not result_file.exists():
                raise TestVmError(
                    f"the boots inside the test VM failed (status {result.returncode}): "
                    + result.output.strip()[-2000:]
                )
            return [BootResult.from_dict(r) for r in json.loads(result_file.read_text())]

    def _testvm(self) -> TestVm:
        """The test VM for the harness's architecture; for another than the host's, pyvmm's
        compiled helpers are cross-compiled into the tree first (the test VM has no gcc)."""
        if self.arch == host_machine():
            return TestVm(self.kit)
        if self.arch != "aarch64":
            raise TestVmError(f"no test VM runs {self.arch} guests")
        for name in HELPERS:
            Helper(name).build(self.arch, self.kit.arch.gcc)
        return Arm64TestVm(self.kit, ROOT)
