"""Container images and runs, through the Python `docker` SDK (the only way we talk to engines).

Engine: a Docker engine where one answers (`DOCKER_HOST`, else /var/run/docker.sock), else
podman's Docker-compatible API service, which `Engine` starts itself (`podman system service`)
with a containers.conf it writes, and stops again. No registry is reachable, so the Debian base
image is made here with `debootstrap --variant=minbase` from the apt mirror this host uses and
imported; `docker/Dockerfile` (tag `pyvmm`) and `docker/Dockerfile.test` (tag `pyvmm-test`)
build on it with the build arguments in `docker/versions`. An image is rebuilt only when its
key (the Dockerfile, docker/versions and the files it copies in) changed.

State lives under `PYVMM_CACHE/containers` (default ~/.cache/pyvmm/containers): containers.conf,
the podman API socket and its log.

    python -m pyvmm.harness.containers build [--arch A] [runtime|test|base|all]
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pyvmm.harness.armroot import missing_emulation
from pyvmm.harness.kit import cache_root, find_tool

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
VERSIONS_FILE = DOCKER_DIR / "versions"
STATE_SUBDIR = "containers"
CONF_FILE = "containers.conf"
PODMAN_SOCKET = "podman.sock"
PODMAN_LOG = "podman-service.log"

DOCKER_HOST_ENV = "DOCKER_HOST"
DOCKER_SOCKET = "/var/run/docker.sock"
ENGINE_ENV = "PYVMM_CONTAINER_ENGINE"  # "docker" or "podman": use only that one
INSTALL_HINT = "no container engine: install podman (apt-get install podman runc) or run Docker"

# podman on these machines (DESIGN.md, "Containers"): runc, no systemd, root without
# CAP_SYS_RESOURCE (so the default ulimits must fit under the hard limits we have).
PODMAN_RUNTIME = "runc"
PODMAN_CGROUP_MANAGER = "cgroupfs"
PODMAN_EVENTS_LOGGER = "file"
PODMAN_ULIMITS = ("nofile=20000:20000", "nproc=4096:4096")
PODMAN_START_TIMEOUT = 30.0
PODMAN_STOP_TIMEOUT = 10.0
API_TIMEOUT = 600  # seconds for one API call (image builds stream, so this bounds silence)

ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}  # ours -> Debian's
BASE_REPOSITORY = "pyvmm-base"
RUNTIME_TAG = "pyvmm"
TEST_TAG = "pyvmm-test"
KEY_LABEL = "pyvmm.key"
KEY_FORMAT = b"pyvmm-image-1"  # bump when the way images are built changes
# What each image's build context holds (the context is made here, never the whole tree).
RUNTIME_CONTEXT = ("pyproject.toml", "README.md", "pyvmm", "seccomp")
TEST_CONTEXT = ("pyproject.toml",)
PIP_CA_FILE = "pip-ca.pem"
CONTEXT_SKIP = ("__pycache__", ".pyc")
BUILD_OUTPUT_LINES = 40  # how much of the failing step's output an ImageBuildError keeps
# A step header: docker's "Step 3/9 : RUN ..." and podman's "STEP 3/9: RUN ...".
STEP_LINE = re.compile(r"^(?:\[\d+/\d+\] )?(?:Step|STEP) \d+(?:/\d+)? ?:")
KVM_DEVICE = "/dev/kvm"
TUN_DEVICE = "/dev/net/tun"

Progress = Callable[[str], None]


class ContainerError(Exception):
    """A container operation failed; the message says what and, where known, the fix."""


class NoEngineError(ContainerError):
    """No container engine can be used here; the message says what to install."""


class ImageBuildError(ContainerError):
    """An image build failed: `step` is the failing step, `output` what it printed."""

    def __init__(self, image: str, step: str, output: Sequence[str], error: str) -> None:
        self.image = image
        self.step = step
        self.output = list(output)
        self.error = error
        shown = "\n".join(f"    {line}" for line in self.output[-BUILD_OUTPUT_LINES:])
        super().__init__(
            f"building {image} failed at {step or 'the first step'}: {error}"
            + (f"\n  its output:\n{shown}" if shown else "")
        )


class DeviceRefusedError(ContainerError):
    """The engine would not pass a device (such as /dev/kvm) into a container."""


# --- engine selection --------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineChoice:
    kind: str  # "docker" or "podman"
    url: str  # the API's base URL ("" for podman: the harness's own socket, made at start)
    reason: str  # why this one, for the log


def _default_probe(url: str) -> bool:
    """Does a Docker API answer at `url`?"""
    import docker

    try:
        client = docker.DockerClient(base_url=url, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def select_engine(
    env: Mapping[str, str] | None = None,
    probe: Callable[[str], bool] = _default_probe,
    which: Callable[[str], str | None] = shutil.which,
    exists: Callable[[str], bool] = os.path.exists,
) -> EngineChoice:
    """The engine to use: a Docker engine that answers (DOCKER_HOST, else the default socket),
    else podman's API service; `PYVMM_CONTAINER_ENGINE=docker|podman` forces one. Raises
    NoEngineError with what to install when there is none."""
    env = os.environ if env is None else env
    forced = env.get(ENGINE_ENV, "").strip().lower()
    if forced not in ("", "docker", "podman"):
        raise ContainerError(f"{ENGINE_ENV}={forced}: expected docker or podman")
    tried: list[str] = []
    if forced in ("", "docker"):
        host = env.get(DOCKER_HOST_ENV, "").strip()
        candidates = [host] if host else []
        if exists(DOCKER_SOCKET):
            candidates.append(f"unix://{DOCKER_SOCKET}")
        for url in candidates:
            if probe(url):
                return EngineChoice("docker", url, f"a Docker engine answers at {url}")
            tried.append(f"nothing answers at {url}")
        if forced == "docker":
            why = "; ".join(tried) or f"{DOCKER_HOST_ENV} is unset and {DOCKER_SOCKET} is absent"
            raise NoEngineError(f"{ENGINE_ENV}=docker but {why}")
    if which("podman") is not None:
        if which(PODMAN_RUNTIME) is None:
            raise NoEngineError(f"podman needs {PODMAN_RUNTIME}: apt-get install {PODMAN_RUNTIME}")
        reason = "podman's API service" + (f" ({'; '.join(tried)})" if tried else "")
        return EngineChoice("podman", "", reason)
    raise NoEngineError(INSTALL_HINT)


def containers_conf(
    runtime: str = PODMAN_RUNTIME,
    cgroup_manager: str = PODMAN_CGROUP_MANAGER,
    ulimits: Sequence[str] = PODMAN_ULIMITS,
    events_logger: str = PODMAN_EVENTS_LOGGER,
) -> str:
    """The containers.conf the podman service runs with (TOML)."""

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    return (
        "# Written by pyvmm.harness.containers; podman reads it through CONTAINERS_CONF.\n"
        "[containers]\n"
        f"default_ulimits = [{', '.join(q(u) for u in ulimits)}]\n"
        "\n"
        "[engine]\n"
        f"runtime = {q(runtime)}\n"
        f"cgroup_manager = {q(cgroup_manager)}\n"
        f"events_logger = {q(events_logger)}\n"
    )


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    return cache_root(env) / STATE_SUBDIR


# --- the Debian mirror -------------------------------------------------------------------------


def host_codename(os_release: str | None = None) -> str:
    if os_release is None:
        try:
            os_release = Path("/etc/os-release").read_text()
        except OSError:
            os_release = ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", os_release, re.M)
    return m.group(1) if m else ""


def apt_sources(root: Path = Path("/etc/apt")) -> list[tuple[str, str, str]]:
    """(uri, suite, components) for each `deb` source this host's apt uses, from sources.list
    and sources.list.d (one-line and deb822 formats)."""
    found: list[tuple[str, str, str]] = []
    files = [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], words[2], " ".join(words[3:]) or "main"))
    for path in sorted((root / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        found.append((uri, suite, fields.get("components", "main")))
    return found


def debian_sources(suite: str, sources: Sequence[tuple[str, str, str]]) -> list[str]:
    """sources.list lines for `suite` and its -updates and -security suites, taken from the
    host's sources (only Debian's own suites, never third-party repositories)."""
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    lines = []
    for uri, s, components in sources:
        if s in wanted:
            line = f"deb {uri} {s} {components}"
            if line not in lines:
                lines.append(line)
    return lines


def _failed(what: str, proc: subprocess.CompletedProcess[str]) -> str:
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-10:]
    return f"{what} failed (status {proc.returncode}):\n" + "\n".join(f"    {t}" for t in tail)


def debian_mirror(suite: str, sources: Sequence[tuple[str, str, str]]) -> str:
    for uri, s, _ in sources:
        if s == suite:
            return uri
    raise ContainerError(
        f"no apt source for Debian {suite} on this host (/etc/apt/sources.list*): "
        "debootstrap needs a mirror"
    )


# --- build contexts and keys -------------------------------------------------------------------


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """docker/versions as build arguments: KEY=VALUE lines; blank lines and # comments skipped."""
    args: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise ContainerError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        args[key] = value
    return args


def _context_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = ROOT / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in candidates:
            if f.is_file() and not any(s in f.name or s in f.parts for s in CONTEXT_SKIP):
                files.append(f)
    return files


@dataclass(frozen=True)
class ImageSpec:
    tag: str
    dockerfile: str  # relative to ROOT
    context: tuple[str, ...]

    def files(self, pip_ca: bytes = b"") -> dict[str, bytes]:
        """The build context: {path in the context: content}. `pip-ca.pem` is the CA bundle
        pip on this host trusts (empty when it uses its own), for pip inside the build."""
        paths = [ROOT / self.dockerfile, VERSIONS_FILE, *_context_files(self.context)]
        files = {str(f.relative_to(ROOT)): f.read_bytes() for f in paths}
        files[PIP_CA_FILE] = pip_ca
        return files

    def key(self, buildargs: Mapping[str, str], base_id: str, pip_ca: bytes = b"") -> str:
        h = hashlib.sha256(KEY_FORMAT)
        h.update(json.dumps(sorted(buildargs.items())).encode())
        h.update(base_id.encode())
        for name, data in sorted(self.files(pip_ca).items()):
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(data).digest())
        return h.hexdigest()[:24]

    def for_arch(self, arch: str) -> ImageSpec:
        """The image for `arch`: the host's keeps its tag; another architecture's is tagged by
        its Debian name (`pyvmm:arm64`), so that building it leaves the host's alone."""
        if arch == platform.machine():
            return self
        return dataclasses.replace(self, tag=f"{self.tag}:{ARCHES[arch]}")

    def context_tar(self, pip_ca: bytes = b"") -> BytesIO:
        buf = BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in sorted(self.files(pip_ca).items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, BytesIO(data))
        buf.seek(0)
        return buf


RUNTIME_IMAGE = ImageSpec(RUNTIME_TAG, "docker/Dockerfile", RUNTIME_CONTEXT)
TEST_IMAGE = ImageSpec(TEST_TAG, "docker/Dockerfile.test", TEST_CONTEXT)


def host_pip_cert(env: Mapping[str, str] | None = None) -> bytes:
    """The CA bundle pip on this host is told to trust (PIP_CERT, else `cert` in pip.conf), so
    that pip inside builds reaches the index through the same TLS path; b"" if none."""
    env = os.environ if env is None else env
    path = env.get("PIP_CERT", "").strip()
    if not path:
        home = Path(env.get("HOME", "~")).expanduser()
        for conf in (
            Path("/etc/pip.conf"),
            Path("/etc/xdg/pip/pip.conf"),
            home / ".config/pip/pip.conf",
            home / ".pip/pip.conf",
        ):
            parser = configparser.ConfigParser()
            with contextlib.suppress(OSError, configparser.Error):
                parser.read(conf)
                path = parser.get("global", "cert", fallback=path)
    try:
        return Path(path).read_bytes() if path else b""
    except OSError:
        return b""


def pip_index_args(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host's PyPI index for builds (PIP_INDEX_URL), unless it is a local file:// one."""
    env = os.environ if env is None else env
    url = env.get("PIP_INDEX_URL", "").strip()
    return {"PIP_INDEX_URL": url} if url.startswith(("http://", "https://")) else {}


# --- the engine --------------------------------------------------------------------------------


@dataclass
class RunResult:
    status: int
    output: str
    seconds: float


@dataclass
class Engine:
    """A Docker SDK client on the chosen engine; a context manager that starts and stops
    podman's API service when podman is the engine."""

    progress: Progress = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    choice: EngineChoice | None = None
    client: Any = None
    _service: subprocess.Popen[bytes] | None = None
    _socket: Path | None = None

    def __enter__(self) -> Engine:
        import docker

        choice = self.choice or select_engine()
        self.choice = choice
        url = choice.url
        if choice.kind == "podman":
            url = self._start_podman()
        self.client = docker.DockerClient(base_url=url, timeout=API_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        service, self._service = self._service, None
        if service is not None and service.poll() is None:
            service.terminate()
            try:
                service.wait(PODMAN_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)
            self._socket = None

    def _start_podman(self) -> str:
        import docker

        state = state_dir()
        state.mkdir(parents=True, exist_ok=True)
        conf = state / CONF_FILE
        conf.write_text(containers_conf())
        sock = state / f"{PODMAN_SOCKET}.{os.getpid()}"
        sock.unlink(missing_ok=True)
        self._socket = sock
        url = f"unix://{sock}"
        podman = shutil.which("podman") or "podman"
        with (state / PODMAN_LOG).open("ab") as log:
            self._service = subprocess.Popen(
                [podman, "system", "service", "--time=0", url],
                env={**os.environ, "CONTAINERS_CONF": str(conf)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + PODMAN_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._service.poll() is not None:
                break
            if sock.exists():
                client = docker.DockerClient(base_url=url, timeout=5)
                with contextlib.suppress(Exception), contextlib.closing(client):
                    if client.ping():
                        return url
            time.sleep(0.1)
        code = self._service.poll()
        self.close()
        how = f"exited with status {code}" if code is not None else "did not answer"
        raise ContainerError(
            f"podman system service {how} within {PODMAN_START_TIMEOUT:.0f}s; "
            f"see {state / PODMAN_LOG}"
        )

    # --- images --------------------------------------------------------------------------

    def image_label(self, tag: str, label: str) -> str | None:
        """The image's label (None if the image or the label is absent)."""
        import docker.errors

        try:
            image = self.client.images.get(tag)
        except docker.errors.ImageNotFound:
            return None
        labels = image.attrs.get("Config", {}).get("Labels") or {}
        value = labels.get(label)
        return str(value) if value is not None else None

    def image_id(self, tag: str) -> str | None:
        import docker.errors

        try:
            return str(self.client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            return None

    def image_size(self, tag: str) -> int:
        return int(self.client.images.get(tag).attrs.get("Size", 0))

    def ensure_base(self, arch: str, suite: str) -> str:
        """The local Debian base image (tag `pyvmm-base:<suite>-<debarch>`), made once from the
        host's apt mirror and imported: by debootstrap for the host's architecture, by
        mmdebstrap under qemu-user-static for arm64 on another host."""
        debarch = ARCHES[arch]
        tag = f"{BASE_REPOSITORY}:{suite}-{debarch}"
        if self.image_id(tag) is not None:
            return tag
        foreign = arch != platform.machine()
        sources = apt_sources()
        lines = debian_sources(suite, sources) or [
            f"deb {debian_mirror(suite, sources)} {suite} main"
        ]
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="pyvmm-base-") as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            if foreign:
                self._mmdebstrap(arch, suite, lines, tarball)
            else:
                self._debootstrap(debarch, suite, sources, lines, Path(tmp) / "rootfs", tarball)
            answer = self._import(tarball, f"{suite}-{debarch}", debarch if foreign else None)
        if self.image_id(tag) is None:
            # podman's compatible API (4.3) ignores the tag: find the imported image by id.
            m = re.search(r"(?:sha256:)?([0-9a-f]{64})", str(answer))
            if m is None:
                raise ContainerError(f"importing the base image answered {answer!r}, no image id")
            self.client.images.get(m.group(1)).tag(BASE_REPOSITORY, f"{suite}-{debarch}")
        if self.image_id(tag) is None:
            raise ContainerError(f"importing the base image as {tag} left no such image")
        self.progress(f"containers: base image {tag} made in {time.monotonic() - start:.0f}s")
        return tag

    def _debootstrap(
        self,
        debarch: str,
        suite: str,
        sources: Sequence[tuple[str, str, str]],
        lines: list[str],
        rootfs: Path,
        tarball: Path,
    ) -> None:
        debootstrap = shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin")
        if debootstrap is None:
            raise ContainerError("debootstrap not found: apt-get install debootstrap")
        mirror = debian_mirror(suite, sources)
        self.progress(f"containers: debootstrap --variant=minbase {suite} from {mirror} ...")
        cmd = [debootstrap, "--variant=minbase", f"--arch={debarch}", suite, str(rootfs)]
        proc = subprocess.run([*cmd, mirror], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ContainerError(_failed(f"debootstrap {suite} from {mirror}", proc))
        (rootfs / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True
        )

    def _mmdebstrap(self, arch: str, suite: str, lines: list[str], tarball: Path) -> None:
        """A minbase root of another architecture as a tarball: mmdebstrap runs its maintainer
        scripts through qemu-user-static (binfmt_misc), and leaves no apt lists or caches."""
        if arch != "aarch64":
            raise ContainerError(
                f"the {arch} base image is made on an {arch} machine (this one is "
                f"{platform.machine()}; only arm64 images are made under emulation)"
            )
        why = missing_emulation()
        if why is not None:
            raise ContainerError(f"cannot make the {arch} base image here: {why}")
        self.progress(f"containers: mmdebstrap --variant=minbase --arch=arm64 {suite} ...")
        cmd = [find_tool("mmdebstrap"), "--variant=minbase", "--arch=arm64", "--quiet", suite]
        proc = subprocess.run(
            [*cmd, str(tarball), *lines], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ContainerError(_failed(f"mmdebstrap --arch=arm64 {suite}", proc))

    def _import(self, tarball: Path, tag: str, debarch: str | None) -> object:
        """Import `tarball` as BASE_REPOSITORY:`tag`; an image of another architecture says so
        (the import's platform), so that builds from it run its programs under emulation."""
        if debarch is None:
            return self.client.api.import_image_from_file(
                str(tarball), repository=BASE_REPOSITORY, tag=tag
            )
        api = self.client.api
        params = {
            "fromSrc": "-",
            "repo": BASE_REPOSITORY,
            "tag": tag,
            "platform": f"linux/{debarch}",
        }
        with open(tarball, "rb") as data:
            response = api._post(  # the SDK's import has no platform argument
                api._url("/images/create"),
                params=params,
                data=data,
                headers={"Content-Type": "application/tar"},
                timeout=None,
            )
        return api._result(response)

    def build(self, spec: ImageSpec, arch: str = "x86_64", force: bool = False) -> bool:
        """Build `spec` unless an image with the same key exists; True if it was built."""
        if arch not in ARCHES:
            raise ContainerError(f"unknown architecture {arch} (expected one of {list(ARCHES)})")
        versions = read_versions()
        suite = versions.get("DEBIAN_SUITE", "bookworm")
        base = self.ensure_base(arch, suite)
        buildargs = {**versions, **pip_index_args(), "ARCH": arch, "BASE_IMAGE": base}
        spec = spec.for_arch(arch)
        foreign = arch != platform.machine()
        pip_ca = host_pip_cert()
        key = spec.key(buildargs, self.image_id(base) or "", pip_ca)
        if not force and self.image_label(spec.tag, KEY_LABEL) == key:
            self.progress(f"containers: {spec.tag} is up to date ({KEY_LABEL}={key})")
            return False
        self.progress(f"containers: building {spec.tag} from {spec.dockerfile} ({arch})")
        stream = self.client.api.build(
            fileobj=spec.context_tar(pip_ca),
            custom_context=True,
            dockerfile=spec.dockerfile,
            tag=spec.tag,
            buildargs=buildargs,
            labels={KEY_LABEL: key},
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            platform=f"linux/{ARCHES[arch]}" if foreign else None,
        )
        step, output = consume_build_stream(stream, self.progress)
        if step is not None:
            raise ImageBuildError(spec.tag, step, output[0], output[1])
        if self.image_label(spec.tag, KEY_LABEL) != key:
            raise ContainerError(f"building {spec.tag} reported success but left no such image")
        return True

    # --- runs ----------------------------------------------------------------------------

    def run(
        self,
        image: str,
        command: Sequence[str] | None = None,
        *,
        devices: Sequence[str] = (KVM_DEVICE,),
        cap_add: Sequence[str] = (),
        mounts: Mapping[str, str] | None = None,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        entrypoint: Sequence[str] | None = None,
        timeout: float = 3600,
        echo: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Run a container to completion: its output (also passed line by line to `echo`) and
        exit status. Devices are host paths passed through at the same path; `mounts` maps host
        paths to container paths (read-write). The container is removed afterwards."""
        import docker.errors
        import requests.exceptions

        for dev in devices:
            if not os.path.exists(dev):
                raise DeviceRefusedError(f"{dev} is absent on this host: nothing to pass in")
        volumes = {host: {"bind": guest, "mode": "rw"} for host, guest in (mounts or {}).items()}
        start = time.monotonic()
        try:
            container = self.client.containers.create(
                image,
                list(command) if command is not None else None,
                entrypoint=list(entrypoint) if entrypoint is not None else None,
                devices=[f"{d}:{d}" for d in devices],
                cap_add=list(cap_add) or None,
                volumes=volumes or None,
                working_dir=workdir,
                environment=dict(env or {}),
                detach=True,
            )
        except docker.errors.ImageNotFound as e:
            raise ContainerError(f"image {image} not found: build it with docker/build") from e
        except docker.errors.APIError as e:
            raise _refusal(e, devices) from e
        chunks: list[str] = []
        try:
            try:
                container.start()
            except docker.errors.APIError as e:
                raise _refusal(e, devices) from e
            pump = threading.Thread(target=_pump_logs, args=(container, chunks, echo), daemon=True)
            pump.start()
            try:
                status = int(container.wait(timeout=timeout).get("StatusCode", -1))
            except requests.exceptions.ConnectionError as e:  # the SDK's read timeout
                with contextlib.suppress(docker.errors.APIError):
                    container.kill()
                raise ContainerError(f"{image}: no exit within {timeout:.0f}s; killed it") from e
            pump.join(30)
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        return RunResult(status, "".join(chunks), time.monotonic() - start)


def _pump_logs(container: Any, chunks: list[str], echo: Callable[[str], None] | None) -> None:
    pending = ""
    with contextlib.suppress(Exception):
        for data in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            text = data.decode(errors="replace")
            chunks.append(text)
            if echo is not None:
                pending += text
                *lines, pending = pending.split("\n")
                for line in lines:
                    echo(line)
    if echo is not None and pending:
        echo(pending)


def _refusal(error: Exception, devices: Sequence[str]) -> ContainerError:
    text = str(error)
    for dev in devices:
        if dev in text:
            return DeviceRefusedError(f"the container engine refused {dev}: {text}")
    return ContainerError(f"the container engine refused the container: {text}")


def consume_build_stream(
    stream: Iterator[dict[str, Any]], progress: Progress | None = None
) -> tuple[str | None, tuple[list[str], str]]:
    """Read a build's JSON stream: (None, ...) on success, else (the failing step, (its output,
    the error)). Only step headers are passed to `progress`."""
    step = ""
    output: list[str] = []
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            error = str(chunk.get("error") or chunk.get("errorDetail", {}).get("message", ""))
            return step, (output, error.strip())
        text = chunk.get("stream")
        if not isinstance(text, str):
            continue
        for line in text.splitlines():
            if STEP_LINE.match(line):
                step = line.strip()
                output = []
                if progress is not None:
                    progress(f"containers:   {step[:120]}")
            elif line.strip():
                output.append(line.rstrip())
    return None, ([], "")


# --- command line ------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docker/build", description="build pyvmm's images")
    parser.add_argument("images", nargs="*", default=["all"], help="runtime, test, base or all")
    parser.add_argument("--arch", default=platform.machine(), choices=sorted(ARCHES))
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    wanted = set(args.images)
    unknown = wanted - {"runtime", "test", "base", "all"}
    if unknown:
        parser.error(f"unknown image {sorted(unknown)[0]} (runtime, test, base or all)")
    try:
        with Engine(progress=_say) as engine:
            assert engine.choice is not None
            _say(f"containers: engine: {engine.choice.reason}")
            suite = read_versions().get("DEBIAN_SUITE", "bookworm")
            specs = []
            if wanted & {"runtime", "all"}:
                specs.append(RUNTIME_IMAGE)
            if wanted & {"test", "all"}:
                specs.append(TEST_IMAGE)
            engine.ensure_base(args.arch, suite)
            for spec in specs:
                start = time.monotonic()
                built = engine.build(spec, args.arch, force=args.force)
                tag = spec.for_arch(args.arch).tag
                size = engine.image_size(tag) / 1e6
                what = "built" if built else "cached"
                _say(f"containers: {tag}: {what} in {time.monotonic() - start:.1f}s, {size:.0f} MB")
    except ContainerError as e:
        _say(f"docker/build: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
