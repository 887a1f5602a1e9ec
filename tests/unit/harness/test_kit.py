"""The guest kit's offline parts: extract-vmlinux, module closure, initramfs keys and contents,
the warm-cache path (no apt), refresh and apt-get update retry, and make_ext4."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyvmm.harness import kit as kit_module
from pyvmm.harness.cpio import parse
from pyvmm.harness.kit import (
    GuestKit,
    ImageFile,
    KitError,
    ModuleIndex,
    extract_vmlinux,
    find_tool,
    guest_module_file,
    image_files,
    initramfs_key,
    make_ext4,
    module_bytes,
    module_name,
)

VERSION = "6.1.0-99-amd64"
BUSYBOX_DEB = "busybox-static_1%3a1.35.0-4_amd64.deb"
KERNEL_DEB = f"linux-image-{VERSION}_6.1.999-1_amd64.deb"
TINY_ELF = b"\x7fELF\x02\x01\x01" + bytes(57) + b"kernel text " * 200
BUSYBOX_BYTES = b"\x7fELF busybox"
MiB = 1 << 20

# --- extract-vmlinux ---------------------------------------------------------------------------


def _compress(fmt: str, data: bytes) -> bytes:
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if fmt == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    if fmt == "bzip2":
        return bz2.compress(data)
    tool = {"zstd": ["zstd", "-cq"], "lz4": ["lz4", "-lcq"]}[fmt]  # lz4 -l: the kernel's format
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


def _bzimage(payload: bytes) -> bytes:
    """A bzImage-shaped blob: setup code with stray magics, the payload, then trailing data."""
    setup = b"MZ" + bytes(510) + b"HdrS" + b"\x1f\x8b\x08junk" + b"\xfd7zXZ\x00not xz" + b"BZh9x"
    return setup + bytes(100) + payload + b"\x00trailer" * 64


FORMATS = [
    "gzip",
    "xz",
    "lzma",
    "bzip2",
    pytest.param("zstd", marks=pytest.mark.skipif(not shutil.which("zstd"), reason="no zstd")),
    pytest.param("lz4", marks=pytest.mark.skipif(not shutil.which("lz4"), reason="no lz4")),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_extract_vmlinux_finds_the_compressed_elf(fmt: str) -> None:
    assert extract_vmlinux(_bzimage(_compress(fmt, TINY_ELF))) == TINY_ELF


@pytest.mark.parametrize("fmt", ["gzip", "xz"])
def test_extract_vmlinux_skips_compressed_data_that_is_not_elf(fmt: str) -> None:
    blob = _bzimage(_compress(fmt, b"not a kernel" * 10) + _compress(fmt, TINY_ELF))
    assert extract_vmlinux(blob) == TINY_ELF


def test_extract_vmlinux_passes_an_elf_through() -> None:
    assert extract_vmlinux(TINY_ELF) == TINY_ELF


def test_extract_vmlinux_without_elf_names_the_source() -> None:
    with pytest.raises(KitError, match="no compressed ELF kernel found in vmlinuz-x"):
        extract_vmlinux(_bzimage(_compress("xz", b"no elf here")), "vmlinuz-x")


def test_extract_vmlinux_rejects_a_truncated_stream() -> None:
    stream = _compress("xz", TINY_ELF)
    with pytest.raises(KitError):
        extract_vmlinux(b"HdrS" + stream[: len(stream) // 2])


# --- modules -----------------------------------------------------------------------------------

MODULES_DEP = """\
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko \
kernel/drivers/crypto/ccp/ccp.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/zram.ko.xz:
"""
MODULES_BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio-mmio.ko\n"


def _write_modules(modules_dir: Path) -> None:
    modules_dir.mkdir(parents=True)
    (modules_dir / "modules.dep").write_text(MODULES_DEP)
    (modules_dir / "modules.builtin").write_text(MODULES_BUILTIN)
    for line in MODULES_DEP.splitlines():
        ko = modules_dir / line.split(":")[0]
        ko.parent.mkdir(parents=True, exist_ok=True)
        content = f"module {module_name(ko.name)}\n".encode()
        ko.write_bytes(lzma.compress(content) if ko.name.endswith(".xz") else content)


@pytest.fixture
def index(tmp_path: Path) -> ModuleIndex:
    _write_modules(tmp_path / "mods")
    return ModuleIndex.load(tmp_path / "mods")


def _names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_closure_puts_dependencies_first(index: ModuleIndex) -> None:
    assert _names(index.closure(["kvm_amd"])) == ["ccp.ko", "irqbypass.ko", "kvm.ko", "kvm-amd.ko"]


def test_closure_has_no_duplicates_and_keeps_request_order(index: ModuleIndex) -> None:
    got = _names(index.closure(["9p", "9pnet_virtio", "9p", "kvm"]))
    assert got == [
        "netfs.ko",
        "9pnet.ko",
        "9p.ko",
        "virtio_ring.ko",
        "9pnet_virtio.ko",
        "irqbypass.ko",
        "kvm.ko",
    ]
    loaded: set[str] = set()
    for path in index.closure(["9p", "9pnet_virtio", "kvm_amd"]):
        assert set(index.deps[module_name(path.name)]) <= loaded
        loaded.add(module_name(path.name))


def test_closure_accepts_dashes_or_underscores(index: ModuleIndex) -> None:
    assert index.closure(["kvm-amd"]) == index.closure(["kvm_amd"])
    assert index.closure(["kvm-amd"])[-1] == index.directory / "kernel/arch/x86/kvm/kvm-amd.ko"


def test_builtin_modules_need_nothing(index: ModuleIndex) -> None:
    assert index.closure(["ext4", "virtio_mmio", "virtio-mmio"]) == []


def test_unknown_module_is_named(index: ModuleIndex) -> None:
    with pytest.raises(KitError, match="kernel module no_such_thing not found"):
        index.closure(["kvm", "no-such-thing"])


def test_missing_modules_dep_says_run_depmod(tmp_path: Path) -> None:
    with pytest.raises(KitError, match=r"modules\.dep not found: run depmod"):
        ModuleIndex.load(tmp_path)


def test_compressed_modules_are_named_and_unpacked(index: ModuleIndex) -> None:
    (path,) = index.closure(["zram"])
    assert path.name == "zram.ko.xz"
    assert guest_module_file(path) == "zram.ko"
    assert module_bytes(path) == b"module zram\n"


# --- initramfs inputs ----------------------------------------------------------------------------


def test_image_file_modes(tmp_path: Path) -> None:
    host = tmp_path / "tool"
    host.write_bytes(b"host")
    host.chmod(0o750)
    files = image_files(
        {"/bin/helper": b"x", "usr/bin/other": b"y", "/etc/conf": b"z", "/opt/tool": host}
    )
    assert [(f.path, f.mode) for f in files] == [
        ("bin/helper", 0o755),
        ("etc/conf", 0o644),
        ("opt/tool", 0o750),
        ("usr/bin/other", 0o755),
    ]
    assert files[2].data == b"host"


def test_image_files_refuse_missing_hosts_files_and_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(KitError, match="cannot read"):
        image_files({"/x": tmp_path / "missing"})
    with pytest.raises(KitError, match="not a regular file"):
        image_files({"/x": tmp_path})
    with pytest.raises(KitError, match="not a path inside the image"):
        image_files({"/../etc/passwd": b""})


def test_initramfs_key_changes_with_every_input() -> None:
    files = [ImageFile("bin/x", b"x", 0o755)]
    base = initramfs_key(b"init", ["kvm_amd"], files, VERSION, "1.35")
    assert base == initramfs_key(b"init", ["kvm-amd"], files, VERSION, "1.35")
    variants = [
        initramfs_key(b"init2", ["kvm_amd"], files, VERSION, "1.35"),
        initramfs_key(b"init", ["kvm_amd", "9p"], files, VERSION, "1.35"),
        initramfs_key(b"init", [], files, VERSION, "1.35"),
        initramfs_key(b"init", ["kvm_amd"], [ImageFile("bin/x", b"y", 0o755)], VERSION, "1.35"),
        initramfs_key(b"init", ["kvm_amd"], [ImageFile("bin/x", b"x", 0o644)], VERSION, "1.35"),
        initramfs_key(b"init", ["kvm_amd"], [ImageFile("bin/y", b"x", 0o755)], VERSION, "1.35"),
        initramfs_key(b"init", ["kvm_amd"], files, "6.1.0-100-amd64", "1.35"),
        initramfs_key(b"init", ["kvm_amd"], files, VERSION, "1.36"),
    ]
    assert len({base, *variants}) == len(variants) + 1


# --- the kit with a warm cache (no apt) ----------------------------------------------------------


def _warm_cache(cache: Path) -> None:
    """A cache as a previous run leaves it (see kit.py's docstring for the layout)."""
    base = cache / "kernel" / VERSION
    (base / "root" / "boot").mkdir(parents=True)
    (base / "root" / "boot" / f"vmlinuz-{VERSION}").write_bytes(b"bzImage")
    (base / "vmlinux").write_bytes(TINY_ELF)
    _write_modules(base / "root" / "lib" / "modules" / VERSION)
    bb = cache / "busybox" / BUSYBOX_DEB.removesuffix(".deb") / "busybox"
    bb.parent.mkdir(parents=True)
    bb.write_bytes(BUSYBOX_BYTES)
    manifest = {
        "kernel": {"package": f"linux-image-{VERSION}", "version": VERSION, "deb": KERNEL_DEB},
        "busybox": {"package": "busybox-static", "version": "1:1.35.0-4", "deb": BUSYBOX_DEB},
    }
    (cache / "kit.json").write_text(json.dumps(manifest))


@pytest.fixture
def no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.delenv("PYVMM_KIT_REFRESH", raising=False)


@pytest.fixture
def warm(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    _warm_cache(cache)
    return cache


INIT = "#!/bin/busybox sh\necho hello\n"


@pytest.mark.usefixtures("no_subprocesses")
def test_warm_cache_needs_no_apt_and_is_silent(warm: Path) -> None:
    said: list[str] = []
    kit = GuestKit(warm, progress=said.append)
    kernel = kit.kernel()
    assert kernel.version == VERSION
    assert kernel.vmlinux.read_bytes() == TINY_ELF
    assert kernel.bzimage.read_bytes() == b"bzImage"
    assert kit.busybox().read_bytes() == BUSYBOX_BYTES
    assert _names(kit.module_closure(["kvm-amd"])) == [
        "ccp.ko",
        "irqbypass.ko",
        "kvm.ko",
        "kvm-amd.ko",
    ]
    assert said == []


@pytest.mark.usefixtures("no_subprocesses")
def test_cache_dir_comes_from_pyvmm_cache(warm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVMM_CACHE", str(warm))
    assert GuestKit().kernel().version == VERSION


@pytest.mark.usefixtures("no_subprocesses")
def test_initramfs_contents(warm: Path, tmp_path: Path) -> None:
    host = tmp_path / "script"
    host.write_text("#!/bin/sh\n")
    host.chmod(0o700)
    kit = GuestKit(warm)
    out = kit.build_initramfs(
        "t", INIT, ["kvm_amd", "zram"], {"/bin/helper": b"\x7fELF", "/etc/x": host}
    )
    assert out.parent == warm / "initramfs"
    assert out.name.startswith("t-") and out.name.endswith(".cpio.gz")
    entries = {e.path: e for e in parse(out.read_bytes())}
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "root", "etc", "lib/modules"):
        assert entries[d].is_dir, d
    assert entries["bin/busybox"].data == BUSYBOX_BYTES
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["init"].data == INIT.encode()
    assert entries["init"].mode == stat.S_IFREG | 0o755
    order = entries["lib/modules/load-order"].data.decode().split()
    assert order == ["ccp.ko", "irqbypass.ko", "kvm.ko", "kvm-amd.ko", "zram.ko"]
    for name in order:
        assert entries[f"lib/modules/{name}"].data == f"module {module_name(name)}\n".encode()
    assert entries["bin/helper"].mode == stat.S_IFREG | 0o755
    assert entries["etc/x"].mode == stat.S_IFREG | 0o700
    assert entries["etc/x"].data == b"#!/bin/sh\n"


@pytest.mark.usefixtures("no_subprocesses")
def test_initramfs_is_cached_until_an_input_changes(warm: Path) -> None:
    said: list[str] = []
    kit = GuestKit(warm, progress=said.append)
    first = kit.build_initramfs("t", INIT, ["kvm"])
    assert said == ["kit: building initramfs t"]
    mtime = first.stat().st_mtime_ns
    again = GuestKit(warm, progress=said.append).build_initramfs("t", INIT.encode(), ["kvm"])
    assert again == first and first.stat().st_mtime_ns == mtime
    assert said == ["kit: building initramfs t"]
    changed = [
        kit.build_initramfs("t", INIT + "\n", ["kvm"]),
        kit.build_initramfs("t", INIT, ["kvm", "9p"]),
        kit.build_initramfs("t", INIT, ["kvm"], {"/etc/a": b"1"}),
        kit.build_initramfs("t", INIT, ["kvm"], {"/etc/a": b"2"}),
    ]
    assert len({first, *changed}) == 5
    assert all(p.is_file() for p in changed)
    same_bytes = GuestKit(warm).build_initramfs("u", INIT, ["kvm"])
    assert same_bytes.read_bytes() == first.read_bytes()  # deterministic output


@pytest.mark.usefixtures("no_subprocesses")
def test_initramfs_errors(warm: Path) -> None:
    kit = GuestKit(warm)
    with pytest.raises(KitError, match="plain file name"):
        kit.build_initramfs("a/b", INIT, [])
    with pytest.raises(KitError, match="kernel module nope not found"):
        kit.build_initramfs("t", INIT, ["nope"])


# --- resolving with apt (faked) ------------------------------------------------------------------

DEPENDS = f"linux-image-amd64\n  Depends: linux-image-{VERSION}\n"
BUSYBOX_URIS = f"'http://mirror.example/pool/busybox-static.deb' {BUSYBOX_DEB} 928188 SHA256:ab\n"
KERNEL_URIS = f"'http://deb.debian.org/pool/linux-image.deb' {KERNEL_DEB} 70550672 SHA256:cd\n"


class FakeApt:
    """Stands in for GuestKit._apt: canned answers, and a record of what was asked."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def fake(kit: GuestKit, args: list[str], what: str, cwd: Path | None = None) -> str:
            return self.answer(args)

        monkeypatch.setattr(GuestKit, "_apt", fake)

    def answer(self, args: list[str]) -> str:
        self.calls.append(args)
        if args[:2] == ["apt-cache", "depends"]:
            return DEPENDS
        if "--print-uris" in args:
            return BUSYBOX_URIS if args[-1] == "busybox-static" else KERNEL_URIS
        raise AssertionError(f"unexpected apt call {args}")


@pytest.mark.usefixtures("no_subprocesses")
def test_refresh_resolves_again_but_reuses_what_is_there(
    warm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apt = FakeApt()
    apt.install(monkeypatch)
    monkeypatch.setenv("PYVMM_KIT_REFRESH", "1")
    said: list[str] = []
    kit = GuestKit(warm, progress=said.append)
    assert kit.kernel().version == VERSION
    kit.build_initramfs("t", INIT, [])
    assert ["apt-cache", "depends", "linux-image-amd64"] in apt.calls
    assert said[:2] == ["kit: resolving linux-image-amd64", "kit: resolving busybox-static"]
    assert not any("downloading" in line for line in said)
    calls = len(apt.calls)
    kit.kernel()
    kit.busybox()
    assert len(apt.calls) == calls  # resolved once per kit
    manifest = json.loads((warm / "kit.json").read_text())
    assert manifest["busybox"]["version"] == "1:1.35.0-4"


@pytest.mark.usefixtures("no_subprocesses")
def test_empty_cache_resolves_and_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apt = FakeApt()
    apt.install(monkeypatch)
    downloads: list[str] = []

    def fake_install(self: GuestKit, entry: dict[str, str]) -> None:
        downloads.append(entry["deb"])
        path = self._busybox_path(entry["deb"])
        path.parent.mkdir(parents=True)
        path.write_bytes(BUSYBOX_BYTES)

    monkeypatch.setattr(GuestKit, "_install_busybox", fake_install)
    assert GuestKit(tmp_path).busybox().read_bytes() == BUSYBOX_BYTES
    assert downloads == [BUSYBOX_DEB]
    assert json.loads((tmp_path / "kit.json").read_text())["busybox"]["deb"] == BUSYBOX_DEB
    assert GuestKit(tmp_path).busybox().read_bytes() == BUSYBOX_BYTES
    assert downloads == [BUSYBOX_DEB]


def _completed(returncode: int, stdout: str = "", stderr: str = "") -> Any:
    return subprocess.CompletedProcess([], returncode, stdout, stderr)


def test_unknown_package_as_root_runs_apt_get_update_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[list[str]] = []
    unknown = _completed(100, stderr="W: something\nE: Unable to locate package busybox-static\n")

    def run(cmd: list[str], **kwargs: Any) -> Any:
        runs.append(cmd)
        if cmd[-1] == "update":
            return _completed(0)
        return unknown if len(runs) == 1 else _completed(0, stdout=BUSYBOX_URIS)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    said: list[str] = []
    kit = GuestKit(tmp_path, progress=said.append)
    assert kit._resolve_deb("busybox-static") == BUSYBOX_DEB
    assert [c[-1] for c in runs] == ["busybox-static", "update", "busybox-static"]
    assert "kit: apt-get update" in said


def test_unknown_package_as_user_says_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(cmd: list[str], **kwargs: Any) -> Any:
        return _completed(100, stderr="W: ignore me\nE: Unable to locate package nope\n")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(KitError) as err:
        GuestKit(tmp_path)._resolve_deb("nope")
    message = str(err.value)
    assert message.startswith(
        "apt-get download --print-uris nope failed: E: Unable to locate package nope"
    )
    assert "\n" not in message


def test_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kit_module, "SBIN_DIRS", ())
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KitError, match=r"^mkfs.ext4 not found: apt-get install e2fsprogs$"):
        find_tool("mkfs.ext4")
    with pytest.raises(KitError, match=r"^depmod not found: apt-get install kmod$"):
        find_tool("depmod")


# --- make_ext4 ---------------------------------------------------------------------------------

EXT4_SUPERBLOCK = 1024
EXT4_MAGIC_OFFSET = 0x38
EXT4_LABEL_OFFSET = 0x78
EXT4_MAGIC = 0xEF53


def _have_mkfs() -> bool:
    try:
        find_tool("mkfs.ext4")
    except KitError:
        return False
    return True


@pytest.mark.skipif(not _have_mkfs(), reason="mkfs.ext4 not installed")
def test_make_ext4(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "hello").write_text("hello\n")
    out = make_ext4(src, tmp_path / "img" / "disk.ext4", 8, label="pyvmm")
    assert out.stat().st_size == 8 * MiB
    with out.open("rb") as f:
        f.seek(EXT4_SUPERBLOCK)
        sb = f.read(1024)
    assert struct.unpack_from("<H", sb, EXT4_MAGIC_OFFSET)[0] == EXT4_MAGIC
    assert sb[EXT4_LABEL_OFFSET : EXT4_LABEL_OFFSET + 16].rstrip(b"\0") == b"pyvmm"
    assert sorted(os.listdir(out.parent)) == ["disk.ext4"]  # no temporary left behind
    debugfs = shutil.which("debugfs") or shutil.which("/usr/sbin/debugfs") or "/sbin/debugfs"
    if os.path.exists(debugfs):
        cat = subprocess.run(
            [debugfs, "-R", "cat /sub/hello", str(out)], capture_output=True, check=True
        )
        assert cat.stdout == b"hello\n"


def test_make_ext4_errors(tmp_path: Path) -> None:
    with pytest.raises(KitError, match="size must be positive"):
        make_ext4(tmp_path, tmp_path / "x.img", 0)
    with pytest.raises(KitError, match=r"source directory .* not found"):
        make_ext4(tmp_path / "missing", tmp_path / "x.img", 8)


# --- helpers -------------------------------------------------------------------------------------

PT_INTERP = 3
needs_static_gcc = pytest.mark.skipif(
    shutil.which("gcc") is None or os.uname().machine != "x86_64",
    reason="guest helpers are built by an x86_64 gcc",
)


def _has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit ELF asks for a dynamic loader (a PT_INTERP program header)."""
    (phoff,) = struct.unpack_from("<Q", elf, 32)  # e_phoff
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)  # e_phentsize, e_phnum
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    return PT_INTERP in types


@needs_static_gcc
def test_helpers_are_compiled_static_and_cached_by_their_source(tmp_path: Path) -> None:
    source = tmp_path / "seven.c"
    source.write_text("int main(void) { return 7; }\n")
    said: list[str] = []
    kit = GuestKit(tmp_path / "cache", progress=said.append)
    out = kit.build_helper(source)
    assert out.name.startswith("seven-") and out.parent.name == "helpers"
    assert subprocess.run([out], check=False).returncode == 7
    assert not _has_interpreter(out.read_bytes()), "a helper must need no dynamic loader"
    assert kit.build_helper(source) == out
    assert said == ["kit: compiling seven.c"]
    source.write_text("int main(void) { return 8; }\n")
    assert kit.build_helper(source) != out
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


@needs_static_gcc
def test_a_helper_that_does_not_compile_says_why(tmp_path: Path) -> None:
    source = tmp_path / "broken.c"
    source.write_text("int main(void) { return undeclared; }\n")
    with pytest.raises(KitError, match=r"gcc .*broken\.c failed: .*undeclared"):
        GuestKit(tmp_path / "cache").build_helper(source)
    with pytest.raises(KitError, match=r"missing\.c: No such file"):
        GuestKit(tmp_path / "cache").build_helper(tmp_path / "missing.c")


# --- the arm64 kit -------------------------------------------------------------------------------

ARM_VERSION = "6.1.0-99-arm64"
ARM_IMAGE = b"\x00" * 56 + b"ARM\x64" + b"arm64 kernel text " * 100


@pytest.mark.usefixtures("no_subprocesses")
def test_the_arm64_kit_keeps_its_own_manifest_entries_and_image(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _warm_cache(cache)  # the x86_64 kit's entries are there too, and stay unused
    base = cache / "kernel" / ARM_VERSION
    (base / "root" / "boot").mkdir(parents=True)
    (base / "root" / "boot" / f"vmlinuz-{ARM_VERSION}").write_bytes(gzip.compress(ARM_IMAGE))
    (base / "Image").write_bytes(ARM_IMAGE)
    _write_modules(base / "root" / "lib" / "modules" / ARM_VERSION)
    manifest = json.loads((cache / "kit.json").read_text())
    manifest["kernel-arm64"] = {
        "package": f"linux-image-{ARM_VERSION}",
        "version": ARM_VERSION,
        "deb": f"linux-image-{ARM_VERSION}_6.1.999-1_arm64.deb",
    }
    (cache / "kit.json").write_text(json.dumps(manifest))
    kernel = GuestKit(cache, arch="aarch64").kernel()
    assert kernel.version == ARM_VERSION
    assert kernel.vmlinux == base / "Image"
    assert GuestKit(cache).kernel().version == VERSION


def test_the_arm64_image_is_the_vmlinuz_uncompressed(tmp_path: Path) -> None:
    kit = GuestKit(tmp_path, arch="aarch64")
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(gzip.compress(ARM_IMAGE))
    assert kit._uncompressed_kernel(vmlinuz, vmlinuz) == ARM_IMAGE
    vmlinuz.write_bytes(ARM_IMAGE)
    assert kit._uncompressed_kernel(vmlinuz, vmlinuz) == ARM_IMAGE


def test_kit_arches() -> None:
    arm = kit_module.KIT_ARCHES["aarch64"]
    assert (arm.debian, arm.kernel_metapackage, arm.elf_machine) == (
        "arm64",
        "linux-image-arm64",
        183,
    )
    assert arm.manifest_key("kernel") == "kernel-arm64"
    assert kit_module.KIT_ARCHES["x86_64"].manifest_key("kernel") == "kernel"
    with pytest.raises(KitError, match="no guest kit for 'riscv64'"):
        GuestKit(arch="riscv64")


@pytest.mark.skipif(os.uname().machine == "aarch64", reason="apt is the host's own on arm64")
def test_a_foreign_kit_asks_apt_with_its_own_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[-2:] == ["-q", "update"]:
            lists = tmp_path / "apt" / "arm64" / "lists"
            (lists / "deb.debian.org_debian_dists_bookworm_main_binary-arm64_Packages").touch()
        return subprocess.CompletedProcess(cmd, 0, "out", "")

    monkeypatch.setattr(subprocess, "run", run)
    kit = GuestKit(tmp_path, arch="aarch64")
    assert kit._apt(["apt-cache", "depends", "x"], "what") == "out"
    assert kit._apt(["apt-cache", "depends", "y"], "what") == "out"
    update, first, second = calls
    assert "APT::Architecture=arm64" in update and update[-1] == "update"
    assert f"Dir::State::Lists={tmp_path / 'apt' / 'arm64' / 'lists'}" in first
    assert first[-2:] == ["depends", "x"] and second[-1] == "y"
