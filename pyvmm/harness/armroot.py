"""The arm64 test VM's root: Debian arm64 with Python and pyvmm's runtime dependencies.

The x86_64 test VM runs the host's own Python; an arm64 one cannot, so it boots from an ext4
image made by `mmdebstrap --arch=arm64` (the arm64 programs run on this host through
qemu-user-static and binfmt_misc). The image is cached in the kit's directory by a hash of what
it is made from (`testvm-root/arm64-root-<key>.ext4`); a warm cache needs no network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pyvmm.harness.kit import GuestKit, KitError, find_tool, make_ext4

ROOT_FORMAT = b"pyvmm-arm64-root-1"  # bump when the way the root is made changes
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEBIAN_ARCH = "arm64"
# pyvmm's runtime dependencies as Debian packages (pyproject.toml's, in Debian's versions), the
# libraries its sandbox opens (libseccomp, libcap), and what the boots use beside Python: unshare
# (util-linux, essential) and ip (iproute2).
PACKAGES = (
    "python3", "python3-cffi", "python3-pyelftools", "python3-pyroute2", "python3-libfdt",
    "libseccomp2", "libcap2", "iproute2",
)  # fmt: skip
ROOT_DIR = "testvm-root"
LOCK_FILE = ".arm64-root.lock"
# Free room in the image beyond what the tree holds (the test VM mounts it read-only under a
# tmpfs overlay, so this only has to satisfy mkfs).
SLACK_MIB = 64
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = BINFMT_DIR / "qemu-aarch64"


class RootError(KitError):
    """The arm64 root cannot be made here; the message names what is missing."""


def root_key() -> str:
    h = hashlib.sha256()
    for part in (ROOT_FORMAT, SUITE.encode(), MIRROR.encode(), " ".join(PACKAGES).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def root_path(kit: GuestKit) -> Path:
    return kit.cache_dir / ROOT_DIR / f"{DEBIAN_ARCH}-root-{root_key()}.ext4"


def missing_emulation() -> str | None:
    """Why arm64 programs cannot run on this host (None when they can): mmdebstrap runs the
    root's own maintainer scripts."""
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap not found: apt-get install mmdebstrap"
    if not BINFMT_ENTRY.exists():
        return (
            f"{BINFMT_ENTRY} not registered: apt-get install qemu-user-static binfmt-support, "
            f"and mount binfmt_misc on {BINFMT_DIR}"
        )
    if BINFMT_ENTRY.read_text().split("\n", 1)[0].strip() != "enabled":
        return f"{BINFMT_ENTRY} is disabled: update-binfmts --enable qemu-aarch64"
    return None


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _tree_mib(tree: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(tree):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total // (1 << 20) + 1


def build_root(kit: GuestKit) -> Path:
    """The arm64 root image, built with mmdebstrap on the first call (about two minutes)."""
    out = root_path(kit)
    if out.is_file():
        return out
    with _locked(kit.cache_dir):
        if out.is_file():
            return out
        why = missing_emulation()
        if why is not None:
            raise RootError(f"cannot make the arm64 root: {why}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".arm64-root-") as d:
            tree = Path(d) / "root"
            cmd = [
                find_tool("mmdebstrap"),
                f"--arch={DEBIAN_ARCH}",
                "--variant=essential",
                "--include=" + ",".join(PACKAGES),
                "--quiet",
                SUITE,
                str(tree),
                MIRROR,
            ]
            print(f"arm64 root: {' '.join(cmd)}", flush=True)
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise RootError(f"mmdebstrap failed (status {proc.returncode}): {' | '.join(tail)}")
            mib = _tree_mib(tree)
            make_ext4(tree, out, mib + mib // 4 + SLACK_MIB, label="pyvmm-arm64")
            print(
                f"arm64 root: {out} ({mib} MiB of files) in {time.monotonic() - start:.0f} s",
                flush=True,
            )
    return out


if __name__ == "__main__":
    print(build_root(GuestKit(progress=print)))
