"""The Linux guest kit: Debian's kernel, busybox and initramfs images, built from packages.

Everything comes from Debian packages fetched with `apt-get download` and is cached under
`PYVMM_CACHE` (default ~/.cache/pyvmm); a warm cache needs no apt at all (`kit.json` records what
was resolved; `PYVMM_KIT_REFRESH=1` resolves again). Layout of the cache:

    debs/<package file>.deb
    kernel/<version>/root/       the extracted linux-image package, depmod'ed
    kernel/<version>/vmlinux     the ELF kernel, extracted from the bzImage
    busybox/<package file>/busybox
    helpers/<name>-<key>         small static programs for the guest, compiled from guest/linux
    initramfs/<name>-<key>.cpio.gz
    kit.json  .lock

Writers build under temporary names and `os.replace` into place while holding `flock(.lock)`,
so concurrent processes never see (or make) a half-built entry.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from pyvmm.harness.cpio import Archive, CpioError

CACHE_ENV = "PYVMM_CACHE"
REFRESH_ENV = "PYVMM_KIT_REFRESH"
DEFAULT_CACHE_DIR = "~/.cache/pyvmm"
MANIFEST_FILE = "kit.json"
MANIFEST_KEYS = ("package", "version", "deb")  # what kit.json records for each package
LOCK_FILE = ".lock"
DEBS_DIR = "debs"
KERNEL_DIR = "kernel"
BUSYBOX_DIR = "busybox"
INITRAMFS_DIR = "initramfs"
HELPERS_DIR = "helpers"
VMLINUX_FILE = "vmlinux"
BUSYBOX_FILE = "busybox"

KERNEL_METAPACKAGE = "linux-image-amd64"  # the x86_64 kit's; KitArch.kernel_metapackage
KERNEL_PACKAGE_PREFIX = "linux-image-"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_IN_PACKAGE = ("bin/busybox", "usr/bin/busybox")
MODULE_DIRS_IN_PACKAGE = ("lib/modules", "usr/lib/modules")

# Where tools live when the caller's PATH lacks the sbin directories (depmod, mkfs.ext4).
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "zstd": "zstd",
    "lz4": "lz4",
    "gcc": "gcc",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
}
# apt's complaints that mean "the package lists are stale or missing": apt-get update may help.
APT_UNKNOWN_PACKAGE = (
    "Unable to locate package",
    "No packages found",
    "has no installation candidate",
    "Can't select candidate version",
)
APT_ENV = {"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}

# extract-vmlinux: each compression's magic, in the order they are tried.
ELF_MAGIC = b"\x7fELF"
COMPRESSION_MAGICS = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
    ("lz4", b"\x02\x21\x4c\x18"),
)
TOOL_FORMATS = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}
GZIP_WBITS = 16 + zlib.MAX_WBITS
DECOMPRESS_ERRORS = (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError)

# Module files as depmod names them, longest suffix first.
MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
MODULES_DEP = "modules.dep"
MODULES_BUILTIN = "modules.builtin"

# The guest's helper programs: one C file each, static (glibc's libc.a), stripped. The result
# must be an ELF for the guest kernel's machine (e_machine in the ELF header).
HELPER_CFLAGS = ("-static", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-s")
HELPER_KEY_FORMAT = b"pyvmm-helper-1"  # bump when the way helpers are built changes
ELF_MACHINE_OFFSET = 18
ELF_MACHINE_X86_64 = 62
ELF_MACHINE_AARCH64 = 183
ELF_MACHINE_END = ELF_MACHINE_OFFSET + 2
NO_STATIC_LIBC = "cannot find -lc"

# The initramfs.
INITRAMFS_KEY_FORMAT = b"pyvmm-initramfs-1"  # bump when the image layout changes
INITRAMFS_KEY_LENGTH = 16
INITRAMFS_DIRS = ("bin", "dev", "proc", "sys", "tmp", "mnt", "root", "etc")
STICKY_TMP_MODE = 0o1777
GUEST_MODULE_DIR = "lib/modules"
LOAD_ORDER_FILE = "lib/modules/load-order"
EXEC_DIRS = ("bin", "usr/bin")
EXEC_MODE = 0o755
DATA_MODE = 0o644
PUBLIC_DIR_MODE = 0o755

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KitArch:
    """What differs between the kits of two guest architectures."""

    name: str  # pyvmm's (uname -m): "x86_64", "aarch64"
    debian: str  # Debian's: "amd64", "arm64"
    elf_machine: int  # the helpers' e_machine
    # The uncompressed kernel in the kernel's cache directory: the ELF extracted from the
    # bzImage on x86_64; the plain Image (Debian's arm64 vmlinuz is a gzipped Image) on arm64.
    kernel_file: str

    @property
    def kernel_metapackage(self) -> str:
        return f"{KERNEL_PACKAGE_PREFIX}{self.debian}"

    @property
    def foreign(self) -> bool:
        """The host's apt and gcc serve another architecture."""
        return os.uname().machine != self.name

    @property
    def gcc(self) -> str:
        return f"{self.name}-linux-gnu-gcc" if self.foreign else "gcc"

    def manifest_key(self, what: str) -> str:
        """kit.json's key: the x86_64 kit's keys are the plain names it always had."""
        return what if self.name == "x86_64" else f"{what}-{self.debian}"


KIT_ARCHES = {
    "x86_64": KitArch("x86_64", "amd64", ELF_MACHINE_X86_64, VMLINUX_FILE),
    "aarch64": KitArch("aarch64", "arm64", ELF_MACHINE_AARCH64, "Image"),
}
# apt for another architecture than the host's: its own package lists under the cache
# (apt/<debian arch>/), from the host's sources, so the host's apt is left as it is.
FOREIGN_APT_DIR = "apt"


class KitError(Exception):
    """The kit could not provide something; the message names what is missing and the fix."""


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. "6.1.0-56-amd64"
    bzimage: Path  # the package's boot/vmlinuz (on arm64, a gzipped Image)
    vmlinux: Path  # the uncompressed kernel (KitArch.kernel_file): ELF, or the arm64 Image
    root: Path  # the extracted package tree (lib/modules/<version>/...)

    @property
    def modules_dir(self) -> Path:
        for sub in MODULE_DIRS_IN_PACKAGE:
            path = self.root / sub / self.version
            if path.is_dir():
                return path
        return self.root / MODULE_DIRS_IN_PACKAGE[0] / self.version


# --- tools -------------------------------------------------------------------------------------


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The harness's cache: $PYVMM_CACHE, else ~/.cache/pyvmm (the kit, the test VM's scratch
    directories and the container engine's state all live under it)."""
    env = os.environ if env is None else env
    return Path(env.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def find_tool(name: str) -> str:
    """The absolute path of a host tool, also looking in the sbin directories."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        package = TOOL_PACKAGES.get(name, name)
        raise KitError(f"{name} not found: apt-get install {package}")
    return found


def _last_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """apt's last "E:" line, else the last line it printed, else the exit status."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    if errors:
        return errors[-1]
    if lines:
        return lines[-1]
    return f"exit status {proc.returncode}"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **APT_ENV}, check=False
    )
    if proc.returncode != 0:
        raise KitError(f"{what} failed: {_last_error_line(proc)}")
    return proc


# --- extract-vmlinux -----------------------------------------------------------------------------


def _python_decompress(fmt: str, data: memoryview, limit: int | None) -> bytes | None:
    """Decompress one stream of `fmt` at the start of `data` (trailing bytes ignored); at most
    `limit` bytes of output, or the whole stream (None if it does not end)."""
    try:
        if fmt == "gzip":
            gz = zlib.decompressobj(wbits=GZIP_WBITS)
            out = gz.decompress(data, limit or 0)
            complete = gz.eof
        elif fmt in ("xz", "lzma"):
            xz = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
            out = xz.decompress(data, -1 if limit is None else limit)
            complete = xz.eof
        else:
            bz = bz2.BZ2Decompressor()
            out = bz.decompress(data, -1 if limit is None else limit)
            complete = bz.eof
    except DECOMPRESS_ERRORS:
        return None
    return out if complete or limit is not None else None


def _tool_decompress(fmt: str, data: memoryview) -> bytes | None:
    """Decompress with the format's command-line tool; its complaint about the bytes after the
    stream is expected, so its exit status is not looked at."""
    argv = TOOL_FORMATS[fmt]
    proc = subprocess.run(
        [find_tool(argv[0]), *argv[1:]], input=bytes(data), capture_output=True, check=False
    )
    return proc.stdout or None


def extract_vmlinux(image: bytes, source: str = "bzImage") -> bytes:
    """The ELF kernel inside a bzImage, found as scripts/extract-vmlinux finds it: decompress
    from each offset where a compression format's magic appears; the first ELF wins."""
    if image.startswith(ELF_MAGIC):
        return image
    view = memoryview(image)
    missing_tools: list[str] = []
    for fmt, magic in COMPRESSION_MAGICS:
        offset = image.find(magic)
        while offset >= 0:
            candidate = view[offset:]
            if fmt in TOOL_FORMATS:
                try:
                    out = _tool_decompress(fmt, candidate)
                except KitError:
                    missing_tools.append(TOOL_FORMATS[fmt][0])
                    break
            else:
                head = _python_decompress(fmt, candidate, len(ELF_MAGIC))
                out = None
                if head is not None and head.startswith(ELF_MAGIC):
                    out = _python_decompress(fmt, candidate, None)
            if out is not None and out.startswith(ELF_MAGIC):
                return out
            offset = image.find(magic, offset + 1)
    hint = f" ({', '.join(missing_tools)} not installed: apt-get install {' '.join(missing_tools)})"
    raise KitError(f"no compressed ELF kernel found in {source}{hint if missing_tools else ''}")


# --- modules -----------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """'kernel/arch/x86/kvm/kvm-amd.ko' -> 'kvm_amd' (the kernel's spelling of the name)."""
    base = PurePosixPath(path).name
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def guest_module_file(path: Path) -> str:
    """The module's file name inside the initramfs: compression suffixes dropped."""
    for suffix in MODULE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)] + ".ko"
    return path.name


def module_bytes(path: Path) -> bytes:
    """A module file's contents, decompressed (busybox insmod loads only plain .ko files)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        proc = subprocess.run(
            [find_tool("zstd"), "-dcq"], input=data, capture_output=True, check=False
        )
        if proc.returncode != 0:
            raise KitError(f"zstd -d {path} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout
    return data


@dataclass(frozen=True)
class ModuleIndex:
    """A kernel's modules as depmod describes them: modules.dep plus modules.builtin."""

    directory: Path
    files: dict[str, Path]  # module name -> .ko file
    deps: dict[str, tuple[str, ...]]  # module name -> names it needs (as modules.dep lists them)
    builtin: frozenset[str]

    @classmethod
    def load(cls, directory: Path) -> ModuleIndex:
        dep_file = directory / MODULES_DEP
        if not dep_file.is_file():
            raise KitError(f"{dep_file} not found: run depmod -b <root> <version> (kmod)")
        files: dict[str, Path] = {}
        deps: dict[str, tuple[str, ...]] = {}
        for line in dep_file.read_text().splitlines():
            target, sep, rest = line.partition(":")
            if not sep:
                continue
            name = module_name(target)
            files[name] = directory / target.strip()
            deps[name] = tuple(module_name(d) for d in rest.split())
        builtin_file = directory / MODULES_BUILTIN
        builtin: frozenset[str] = frozenset()
        if builtin_file.is_file():
            builtin = frozenset(
                module_name(ln) for ln in builtin_file.read_text().splitlines() if ln.strip()
            )
        return cls(directory, files, deps, builtin)

    def closure(self, names: list[str]) -> list[Path]:
        """The .ko files to insmod for `names`, dependencies first, each once; built-in
        modules need nothing."""
        order: list[Path] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str, wanted_by: str | None) -> None:
            if name in done or name in self.builtin:
                return
            if name not in self.files:
                needed = f" (needed by {wanted_by})" if wanted_by else ""
                raise KitError(
                    f"kernel module {name}{needed} not found in {self.directory / MODULES_DEP}"
                    " nor in modules.builtin"
                )
            if name in visiting:
                raise KitError(f"kernel module {name}: dependency cycle in modules.dep")
            visiting.add(name)
            # modprobe loads a modules.dep line's dependencies from the last to the first.
            for dep in reversed(self.deps[name]):
                visit(dep, name)
            visiting.discard(name)
            done.add(name)
            order.append(self.files[name])

        for name in names:
            visit(name.replace("-", "_"), None)
        return order


# --- initramfs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    """A file to place in an initramfs: its path in the image, content and permission bits."""

    path: str
    data: bytes
    mode: int


def image_files(files: dict[str, bytes | Path]) -> list[ImageFile]:
    """Caller's extra files, read and given modes: a host file keeps its permission bits; bytes
    are executable under /bin and /usr/bin, plain data elsewhere."""
    out: list[ImageFile] = []
    for path, content in sorted(files.items()):
        clean = str(PurePosixPath("/", path)).lstrip("/")
        if not clean or ".." in PurePosixPath(clean).parts:
            raise KitError(f"initramfs file path {path!r} is not a path inside the image")
        if isinstance(content, Path):
            try:
                st = content.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise KitError(f"initramfs file {path}: {content} is not a regular file")
                data = content.read_bytes()
            except OSError as e:
                raise KitError(f"initramfs file {path}: cannot read {content}: {e.strerror}") from e
            mode = stat.S_IMODE(st.st_mode)
        else:
            data = bytes(content)
            parent = str(PurePosixPath(clean).parent)
            mode = EXEC_MODE if parent in EXEC_DIRS else DATA_MODE
        out.append(ImageFile(clean, data, mode))
    return out


def initramfs_key(
    init: bytes,
    modules: list[str],
    files: list[ImageFile],
    kernel_version: str,
    busybox_version: str,
) -> str:
    """A hash of everything an initramfs is made from: any change gives a new key."""
    h = hashlib.sha256()

    def feed(item: bytes) -> None:
        h.update(len(item).to_bytes(8, "little"))
        h.update(item)

    for item in (INITRAMFS_KEY_FORMAT, kernel_version.encode(), busybox_version.encode(), init):
        feed(item)
    feed(b"modules")
    for name in modules:
        feed(name.replace("-", "_").encode())
    feed(b"files")
    for f in files:
        feed(f.path.encode())
        feed(b"%o" % f.mode)
        feed(hashlib.sha256(f.data).digest())
    return h.hexdigest()[:INITRAMFS_KEY_LENGTH]


def initramfs_archive(
    init: bytes, busybox: bytes, modules: list[Path], files: list[ImageFile]
) -> Archive:
    """The initramfs contents: busybox, the usual directories, /init, the modules with their
    load order, then the caller's files (which may replace any of these)."""
    archive = Archive()
    for d in INITRAMFS_DIRS:
        archive.add_dir(d, STICKY_TMP_MODE if d == "tmp" else PUBLIC_DIR_MODE)
    archive.add_dir(GUEST_MODULE_DIR)
    archive.add_file("bin/busybox", busybox, EXEC_MODE)
    archive.add_file("init", init, EXEC_MODE)
    names: list[str] = []
    for path in modules:
        name = guest_module_file(path)
        archive.add_file(f"{GUEST_MODULE_DIR}/{name}", module_bytes(path), DATA_MODE)
        names.append(name)
    archive.add_file(LOAD_ORDER_FILE, "".join(f"{n}\n" for n in names).encode(), DATA_MODE)
    for f in files:
        try:
            archive.add_file(f.path, f.data, f.mode)
        except CpioError as e:
            raise KitError(f"initramfs file /{f.path}: {e}") from e
    return archive


# --- the kit -------------------------------------------------------------------------------------


def _deb_version(deb_file: str) -> str:
    """'busybox-static_1%3a1.35.0-4_amd64.deb' -> '1:1.35.0-4'."""
    parts = deb_file.removesuffix(".deb").split("_")
    return unquote(parts[1]) if len(parts) >= 2 else deb_file


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, DATA_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class GuestKit:
    """Builds and caches the kernel, busybox and initramfs images for Linux guests of one
    architecture (`arch`, pyvmm's name for it: "x86_64" or "aarch64")."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        progress: Progress | None = None,
        arch: str = "x86_64",
    ) -> None:
        if arch not in KIT_ARCHES:
            raise KitError(f"no guest kit for {arch!r}: one of {', '.join(KIT_ARCHES)}")
        self.arch = KIT_ARCHES[arch]
        self.cache_dir = cache_root() if cache_dir is None else cache_dir
        self._progress = progress
        self._refresh = os.environ.get(REFRESH_ENV, "") == "1"
        self._resolved: set[str] = set()  # packages re-resolved by this kit (refresh)
        self._apt_updated = False
        self._lock_depth = 0
        self._lock_fd = -1
        self._kernel: Kernel | None = None
        self._busybox: tuple[Path, str] | None = None
        self._modules: ModuleIndex | None = None

    # -- plumbing

    def _say(self, line: str) -> None:
        if self._progress is not None:
            self._progress(line)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """flock(cache/.lock), re-entrant within this kit."""
        if self._lock_depth == 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = -1

    def _read_manifest(self) -> dict[str, Any]:
        try:
            data = json.loads((self.cache_dir / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _update_manifest(self, key: str, entry: dict[str, str]) -> None:
        manifest = self._read_manifest()
        if manifest.get(key) != entry:
            manifest[key] = entry
            text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            _write_atomic(self.cache_dir / MANIFEST_FILE, text.encode())

    def _needs_resolving(self, package: str, entry: Any) -> bool:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in MANIFEST_KEYS
        ):
            return True
        return self._refresh and package not in self._resolved

    def _foreign_apt_options(self) -> list[str]:
        """apt's options for the kit's architecture when it is not the host's (its own lists
        under the cache, fetched once); none for the host's."""
        if not self.arch.foreign:
            return []
        base = self.cache_dir / FOREIGN_APT_DIR / self.arch.debian
        (base / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (base / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (base / "status").touch()
        options = [
            f"APT::Architecture={self.arch.debian}",
            f"APT::Architectures::={self.arch.debian}",
            f"Dir::State::Lists={base / 'lists'}",
            f"Dir::State::status={base / 'status'}",
            f"Dir::Cache={base / 'cache'}",
        ]
        argv = [a for option in options for a in ("-o", option)]
        if not any((base / "lists").glob("*_Packages*")):
            self._say(f"kit: apt-get update for {self.arch.debian}")
            _run(
                [find_tool("apt-get"), *argv, "-q", "update"],
                f"apt-get update ({self.arch.debian})",
            )
            self._apt_updated = True
        return argv

    def _apt(self, args: list[str], what: str, cwd: Path | None = None) -> str:
        """Run apt-get/apt-cache; if apt does not know the package and we are root, run
        apt-get update once and try again. Returns stdout."""
        cmd = [find_tool(args[0]), *self._foreign_apt_options(), *args[1:]]
        try:
            return _run(cmd, what, cwd).stdout
        except KitError as e:
            stale = any(s in str(e) for s in APT_UNKNOWN_PACKAGE)
            if not stale or self._apt_updated:
                raise
            if os.geteuid() != 0:
                raise KitError(f"{e} (as root, apt-get update may help)") from e
        self._say("kit: apt-get update")
        _run([find_tool("apt-get"), *self._foreign_apt_options(), "-q", "update"], "apt-get update")
        self._apt_updated = True
        return _run(cmd, what, cwd).stdout

    def _resolve_deb(self, package: str) -> str:
        """The .deb file name apt would download for `package` (no download)."""
        out = self._apt(
            ["apt-get", "download", "--print-uris", package],
            f"apt-get download --print-uris {package}",
        )
        for line in out.splitlines():
            fields = shlex.split(line) if line.startswith("'") else []
            if len(fields) >= 2 and fields[1].endswith(".deb"):
                return fields[1]
        raise KitError(f"apt-get download --print-uris {package} named no .deb file")

    def _download(self, package: str, deb_file: str) -> Path:
        """debs/<deb_file>, downloaded with apt-get download unless already there."""
        debs = self.cache_dir / DEBS_DIR
        target = debs / deb_file
        if target.is_file():
            return target
        self._say(f"kit: downloading {package}")
        debs.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=debs, prefix=".download-"))
        try:
            self._apt(["apt-get", "-q", "download", package], f"apt-get download {package}", tmp)
            got = sorted(tmp.glob("*.deb"))
            if not got:
                raise KitError(f"apt-get download {package} left no .deb file in {tmp}")
            fetched = tmp / deb_file if (tmp / deb_file).is_file() else got[0]
            os.replace(fetched, debs / fetched.name)
            return debs / fetched.name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _extract_deb(self, deb: Path, dest: Path) -> None:
        _run([find_tool("dpkg-deb"), "-x", str(deb), str(dest)], f"dpkg-deb -x {deb}")

    def _new_tmp_dir(self, parent: Path, name: str) -> Path:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}-"))
        tmp.chmod(PUBLIC_DIR_MODE)
        return tmp

    @staticmethod
    def _install_dir(tmp: Path, final: Path) -> None:
        """Move a finished temporary directory into place (replacing an incomplete one)."""
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    # -- the kernel

    def _kernel_at(self, version: str) -> Kernel:
        base = self.cache_dir / KERNEL_DIR / version
        root = base / "root"
        return Kernel(
            version, root / "boot" / f"vmlinuz-{version}", base / self.arch.kernel_file, root
        )

    @staticmethod
    def _kernel_complete(kernel: Kernel) -> bool:
        return (
            kernel.vmlinux.is_file()
            and kernel.bzimage.is_file()
            and (kernel.modules_dir / MODULES_DEP).is_file()
        )

    def _resolve_kernel(self) -> dict[str, str]:
        metapackage = self.arch.kernel_metapackage
        self._say(f"kit: resolving {metapackage}")
        out = self._apt(["apt-cache", "depends", metapackage], f"apt-cache depends {metapackage}")
        pattern = re.compile(rf"^\|?Depends:\s+({re.escape(KERNEL_PACKAGE_PREFIX)}[^\s<>]+)$")
        for line in out.splitlines():
            match = pattern.match(line.strip())
            if match:
                package = match.group(1)
                self._resolved.add(metapackage)
                return {
                    "package": package,
                    "version": package.removeprefix(KERNEL_PACKAGE_PREFIX),
                    "deb": self._resolve_deb(package),
                }
        raise KitError(f"apt-cache depends {metapackage} names no {KERNEL_PACKAGE_PREFIX}* package")

    def _install_kernel(self, entry: dict[str, str]) -> Kernel:
        package, version = entry["package"], entry["version"]
        depmod = find_tool("depmod")  # before the download: a missing tool fails fast
        find_tool("dpkg-deb")
        deb = self._download(package, entry["deb"])
        final = self._kernel_at(version)
        tmp = self._new_tmp_dir(final.root.parent.parent, version)
        try:
            staged = Kernel(
                version,
                tmp / final.bzimage.relative_to(final.root.parent),
                tmp / self.arch.kernel_file,
                tmp / final.root.name,
            )
            self._say(f"kit: extracting {package}")
            self._extract_deb(deb, staged.root)
            if not staged.bzimage.is_file():
                raise KitError(f"{deb.name} has no boot/vmlinuz-{version}: not a kernel package?")
            if not staged.modules_dir.is_dir():
                raise KitError(f"{deb.name} has no lib/modules/{version}: not a kernel package?")
            self._say(f"kit: depmod {version}")
            _run([depmod, "-b", str(staged.root), version], f"depmod {version}")
            self._say(f"kit: extracting {self.arch.kernel_file}")
            staged.vmlinux.write_bytes(self._uncompressed_kernel(staged.bzimage, final.bzimage))
            self._install_dir(tmp, final.root.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _uncompressed_kernel(self, vmlinuz: Path, name: Path) -> bytes:
        """The ELF vmlinux in an x86_64 bzImage; the Image in Debian's gzipped arm64 vmlinuz
        (or the file itself when it is not compressed)."""
        data = vmlinuz.read_bytes()
        if self.arch.name == "x86_64":
            return extract_vmlinux(data, str(name))
        if data.startswith(b"\x1f\x8b"):
            try:
                return gzip.decompress(data)
            except DECOMPRESS_ERRORS as e:
                raise KitError(f"{name}: not a whole gzip stream ({e})") from e
        return data

    def kernel(self) -> Kernel:
        """Debian's current kernel for the kit's architecture: the package's vmlinuz, the
        uncompressed kernel (vmlinux, or the arm64 Image) and the depmod'ed module tree."""
        if self._kernel is not None:
            return self._kernel
        with self._locked():
            entry = self._read_manifest().get(self.arch.manifest_key("kernel"))
            if self._needs_resolving(self.arch.kernel_metapackage, entry):
                entry = self._resolve_kernel()
            assert isinstance(entry, dict)
            kernel = self._kernel_at(entry["version"])
            if not self._kernel_complete(kernel):
                kernel = self._install_kernel(entry)
            self._update_manifest(self.arch.manifest_key("kernel"), entry)
        self._kernel = kernel
        return kernel

    def module_closure(self, names: list[str]) -> list[Path]:
        """The kernel's .ko files to insmod for `names`, in load order (dependencies first)."""
        if self._modules is None:
            self._modules = ModuleIndex.load(self.kernel().modules_dir)
        return self._modules.closure(names)

    # -- busybox

    def _busybox_path(self, deb_file: str) -> Path:
        return self.cache_dir / BUSYBOX_DIR / deb_file.removesuffix(".deb") / BUSYBOX_FILE

    def _install_busybox(self, entry: dict[str, str]) -> None:
        find_tool("dpkg-deb")
        deb = self._download(BUSYBOX_PACKAGE, entry["deb"])
        final = self._busybox_path(entry["deb"])
        tmp = self._new_tmp_dir(final.parent.parent, final.parent.name)
        try:
            self._say(f"kit: extracting {BUSYBOX_PACKAGE}")
            self._extract_deb(deb, tmp / "root")
            found = [tmp / "root" / p for p in BUSYBOX_IN_PACKAGE if (tmp / "root" / p).is_file()]
            if not found:
                raise KitError(f"{deb.name} has no bin/busybox: not the busybox-static package?")
            os.replace(found[0], tmp / BUSYBOX_FILE)
            shutil.rmtree(tmp / "root")
            self._install_dir(tmp, final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _busybox_entry(self) -> tuple[Path, str]:
        if self._busybox is not None:
            return self._busybox
        with self._locked():
            entry = self._read_manifest().get(self.arch.manifest_key("busybox"))
            if self._needs_resolving(BUSYBOX_PACKAGE, entry):
                self._say(f"kit: resolving {BUSYBOX_PACKAGE}")
                deb_file = self._resolve_deb(BUSYBOX_PACKAGE)
                self._resolved.add(BUSYBOX_PACKAGE)
                entry = {
                    "package": BUSYBOX_PACKAGE,
                    "version": _deb_version(deb_file),
                    "deb": deb_file,
                }
            assert isinstance(entry, dict)
            path = self._busybox_path(entry["deb"])
            if not path.is_file():
                self._install_busybox(entry)
            self._update_manifest(self.arch.manifest_key("busybox"), entry)
        self._busybox = (path, entry["version"])
        return self._busybox

    def busybox(self) -> Path:
        """The static busybox binary from Debian's busybox-static."""
        return self._busybox_entry()[0]

    # -- helpers

    def build_helper(self, source: Path) -> Path:
        """A static program for the kit's architecture compiled by gcc (a cross gcc for another
        architecture than the host's) from the one C file `source`, cached by a hash of the
        source, the flags and the compiler (helpers/<name>-<key>)."""
        gcc = find_tool(self.arch.gcc)
        try:
            code = source.read_bytes()
        except OSError as e:
            raise KitError(f"guest helper {source}: {e.strerror}") from e
        compiler = _run([gcc, "-dumpmachine"], "gcc -dumpmachine").stdout.strip()
        version = _run([gcc, "-dumpfullversion"], "gcc -dumpfullversion").stdout.strip()
        h = hashlib.sha256()
        flags = " ".join(HELPER_CFLAGS).encode()
        for part in (HELPER_KEY_FORMAT, compiler.encode(), version.encode(), flags, code):
            h.update(len(part).to_bytes(8, "little") + part)
        name = source.name.removesuffix(".c")
        out = self.cache_dir / HELPERS_DIR / f"{name}-{h.hexdigest()[:INITRAMFS_KEY_LENGTH]}"
        if out.is_file():
            return out
        with self._locked():
            if out.is_file():
                return out
            self._say(f"kit: compiling {source.name}")
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
            os.close(fd)
            try:
                cmd = [gcc, *HELPER_CFLAGS, "-o", tmp, str(source)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    libc = TOOL_PACKAGES[self.arch.gcc] if self.arch.foreign else "libc6-dev"
                    hint = f" (no static C library: apt-get install {libc})"
                    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
                    said = errors[0] if errors else _last_error_line(proc)
                    raise KitError(
                        f"gcc {source} failed: {said}"
                        + (hint if NO_STATIC_LIBC in proc.stderr else "")
                    )
                header = Path(tmp).read_bytes()[:ELF_MACHINE_END]
                machine = int.from_bytes(header[ELF_MACHINE_OFFSET:], "little")
                if not header.startswith(ELF_MAGIC) or machine != self.arch.elf_machine:
                    raise KitError(
                        f"gcc ({compiler}) built {source.name} for ELF machine {machine}, not "
                        f"{self.arch.name}: the guest kernel is {self.arch.name}"
                    )
                os.chmod(tmp, EXEC_MODE)
                os.replace(tmp, out)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return out

    # -- initramfs

    def build_initramfs(
        self,
        name: str,
        init: str | bytes,
        modules: list[str],
        files: dict[str, bytes | Path] | None = None,
    ) -> Path:
        """A gzipped newc initramfs with busybox, `init` as /init, the closure of `modules`
        under /lib/modules (load order in /lib/modules/load-order) and `files`. Cached by a hash
        of all inputs: unchanged inputs return the existing file at once."""
        if not name or "/" in name or name.startswith("."):
            raise KitError(f"initramfs name {name!r}: use a plain file name")
        init_bytes = init.encode() if isinstance(init, str) else bytes(init)
        extra = image_files(files or {})
        kernel = self.kernel()
        busybox, busybox_version = self._busybox_entry()
        key = initramfs_key(init_bytes, modules, extra, kernel.version, busybox_version)
        out = self.cache_dir / INITRAMFS_DIR / f"{name}-{key}.cpio.gz"
        if out.is_file():
            return out
        self._say(f"kit: building initramfs {name}")
        archive = initramfs_archive(
            init_bytes, busybox.read_bytes(), self.module_closure(modules), extra
        )
        _write_atomic(out, archive.to_bytes(compress=True))
        return out


def make_ext4(source_dir: Path, out: Path, size_mib: int, label: str = "") -> Path:
    """An ext4 image of `size_mib` MiB holding `source_dir`'s contents (mkfs.ext4 -d), its root
    directory owned by root. Built under a temporary name, then moved to `out`."""
    if size_mib <= 0:
        raise KitError(f"ext4 image {out}: size must be positive, not {size_mib} MiB")
    if not source_dir.is_dir():
        raise KitError(f"ext4 image {out}: source directory {source_dir} not found")
    mkfs = find_tool("mkfs.ext4")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    os.close(fd)
    try:
        cmd = [mkfs, "-q", "-F", "-d", str(source_dir), "-E", "root_owner=0:0"]
        if label:
            cmd += ["-L", label]
        _run([*cmd, tmp, f"{size_mib}M"], f"mkfs.ext4 {out}")
        os.chmod(tmp, DATA_MODE)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out
