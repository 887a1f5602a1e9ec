"""Engine selection, containers.conf, apt sources, versions and build streams: no engine needed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pyvmm.harness import containers as c

DOCKER_SOCK_URL = f"unix://{c.DOCKER_SOCKET}"


def which_only(*names: str):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in names else None


def select(env: dict[str, str], answering: set[str], tools: tuple[str, ...], sock: bool):  # type: ignore[no-untyped-def]
    probed: list[str] = []

    def probe(url: str) -> bool:
        probed.append(url)
        return url in answering

    choice = c.select_engine(
        env=env,
        probe=probe,
        which=which_only(*tools),
        exists=lambda path: sock and path == c.DOCKER_SOCKET,
    )
    return choice, probed


def test_docker_host_that_answers_wins() -> None:
    env = {"DOCKER_HOST": "tcp://10.0.0.1:2375"}
    choice, probed = select(env, {"tcp://10.0.0.1:2375"}, ("podman", "runc"), sock=True)
    assert (choice.kind, choice.url) == ("docker", "tcp://10.0.0.1:2375")
    assert probed == ["tcp://10.0.0.1:2375"]


def test_default_socket_when_docker_host_is_unset() -> None:
    choice, _ = select({}, {DOCKER_SOCK_URL}, ("podman", "runc"), sock=True)
    assert (choice.kind, choice.url) == ("docker", DOCKER_SOCK_URL)


def test_silent_docker_falls_back_to_podman() -> None:
    env = {"DOCKER_HOST": "unix:///nowhere.sock"}
    choice, probed = select(env, set(), ("podman", "runc"), sock=True)
    assert choice.kind == "podman" and choice.url == ""
    assert probed == ["unix:///nowhere.sock", DOCKER_SOCK_URL]
    assert "nothing answers at unix:///nowhere.sock" in choice.reason


def test_docker_client_alone_is_not_an_engine() -> None:
    # The docker CLI without a daemon (as on our machines) does not count.
    choice, probed = select({}, set(), ("docker", "podman", "runc"), sock=False)
    assert choice.kind == "podman"
    assert probed == []


def test_no_engine_says_what_to_install() -> None:
    with pytest.raises(c.NoEngineError) as e:
        select({}, set(), ("docker",), sock=False)
    message = str(e.value)
    assert "\n" not in message
    assert "apt-get install podman" in message


def test_podman_without_runc_names_it() -> None:
    with pytest.raises(c.NoEngineError, match="apt-get install runc"):
        select({}, set(), ("podman",), sock=False)


def test_forced_podman_skips_docker() -> None:
    env = {c.ENGINE_ENV: "podman", "DOCKER_HOST": "tcp://x:1"}
    choice, probed = select(env, {"tcp://x:1"}, ("podman", "runc"), sock=True)
    assert choice.kind == "podman" and probed == []


def test_forced_docker_without_one_fails() -> None:
    with pytest.raises(c.NoEngineError, match="PYVMM_CONTAINER_ENGINE=docker"):
        select({c.ENGINE_ENV: "docker"}, set(), ("podman", "runc"), sock=False)


def test_forced_unknown_engine() -> None:
    with pytest.raises(c.ContainerError, match="expected docker or podman"):
        select({c.ENGINE_ENV: "lxc"}, set(), ("podman", "runc"), sock=False)


def test_containers_conf_has_the_settings_podman_needs_here() -> None:
    conf = tomllib.loads(c.containers_conf())
    assert conf["engine"]["runtime"] == "runc"
    assert conf["engine"]["cgroup_manager"] == "cgroupfs"
    assert conf["containers"]["default_ulimits"] == ["nofile=20000:20000", "nproc=4096:4096"]


def test_containers_conf_quotes_values() -> None:
    conf = tomllib.loads(c.containers_conf(runtime='odd"name', ulimits=()))
    assert conf["engine"]["runtime"] == 'odd"name'
    assert conf["containers"]["default_ulimits"] == []


def test_state_dir_follows_pyvmm_cache(tmp_path: Path) -> None:
    assert c.state_dir({"PYVMM_CACHE": str(tmp_path)}) == tmp_path / "containers"


DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main contrib

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
"""


def test_apt_sources_both_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://other.example/apt cloud-sdk main\n"
        "deb-src http://x/debian bookworm main\n"
    )
    sources = c.apt_sources(tmp_path)
    assert sources == [
        ("http://other.example/apt", "cloud-sdk", "main"),
        ("http://mirror.example/debian", "bookworm", "main"),
        ("http://mirror.example/debian", "bookworm-updates", "main"),
        ("http://mirror.example/debian-security", "bookworm-security", "main contrib"),
    ]
    assert c.debian_mirror("bookworm", sources) == "http://mirror.example/debian"
    assert c.debian_sources("bookworm", sources) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main contrib",
    ]


def test_no_mirror_for_the_suite() -> None:
    with pytest.raises(c.ContainerError, match="no apt source for Debian trixie"):
        c.debian_mirror("trixie", [("http://m/debian", "bookworm", "main")])


def test_host_codename() -> None:
    assert c.host_codename("ID=debian\nVERSION_CODENAME=bookworm\n") == "bookworm"
    assert c.host_codename("ID=x\n") == ""


def test_versions_file_is_valid_and_pins_every_package() -> None:
    versions = c.read_versions()
    assert versions["DEBIAN_SUITE"]
    for key in ("RUNTIME_PACKAGES", "TEST_PACKAGES", "TEST_PACKAGES_X86_64"):
        for package in versions[key].split():
            name, sep, version = package.partition("=")
            assert sep and version, f"{key}: {name} is not pinned"


def test_versions_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "versions"
    path.write_text("# c\n\nA_B=1 2\nbad line\n")
    with pytest.raises(c.ContainerError, match=r"versions:4: expected KEY=VALUE"):
        c.read_versions(path)
    path.write_text("A_B=x=y\n")
    assert c.read_versions(path) == {"A_B": "x=y"}


def test_image_key_changes_with_inputs() -> None:
    args = {"ARCH": "x86_64"}
    key = c.RUNTIME_IMAGE.key(args, "base1")
    assert key == c.RUNTIME_IMAGE.key(dict(args), "base1")
    assert key != c.RUNTIME_IMAGE.key({"ARCH": "aarch64"}, "base1")
    assert key != c.RUNTIME_IMAGE.key(args, "base2")
    assert key != c.TEST_IMAGE.key(args, "base1")


def test_context_holds_only_what_the_dockerfile_copies() -> None:
    import tarfile

    with tarfile.open(fileobj=c.TEST_IMAGE.context_tar()) as tar:
        names = set(tar.getnames())
    assert names == {"docker/Dockerfile.test", "docker/versions", "pyproject.toml", "pip-ca.pem"}
    with tarfile.open(fileobj=c.RUNTIME_IMAGE.context_tar()) as tar:
        names = set(tar.getnames())
    assert "pyvmm/cli.py" in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)


def test_build_stream_success() -> None:
    stream = [{"stream": "STEP 1/2: FROM base\n"}, {"stream": "STEP 2/2: RUN true\n"}]
    seen: list[str] = []
    step, _ = c.consume_build_stream(iter(stream), seen.append)
    assert step is None
    assert len(seen) == 2


def test_build_stream_failure_names_the_step_and_its_output() -> None:
    stream = [
        {"stream": "Step 1/3 : FROM base\n"},
        {"stream": " ---> abc\n"},
        {"stream": "Step 2/3 : RUN apt-get install nosuch\n"},
        {"stream": "Reading package lists...\nE: Unable to locate package nosuch\n"},
        {"error": "The command '/bin/sh -c apt-get install nosuch' returned a non-zero code: 100"},
    ]
    step, (output, error) = c.consume_build_stream(iter(stream))
    assert step == "Step 2/3 : RUN apt-get install nosuch"
    assert output == ["Reading package lists...", "E: Unable to locate package nosuch"]
    err = c.ImageBuildError("pyvmm", step, output, error)
    text = str(err)
    assert "failed at Step 2/3 : RUN apt-get install nosuch" in text
    assert "E: Unable to locate package nosuch" in text
    assert "non-zero code: 100" in text


def test_pip_index_passes_only_remote_indexes() -> None:
    assert c.pip_index_args({"PIP_INDEX_URL": "https://pypi.example/simple"}) == {
        "PIP_INDEX_URL": "https://pypi.example/simple"
    }
    assert c.pip_index_args({"PIP_INDEX_URL": "file:///opt/pypi/simple"}) == {}
    assert c.pip_index_args({}) == {}


def test_another_architectures_image_is_tagged_by_its_debian_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(c.platform, "machine", lambda: "x86_64")
    assert c.RUNTIME_IMAGE.for_arch("x86_64") is c.RUNTIME_IMAGE
    assert c.RUNTIME_IMAGE.for_arch("aarch64").tag == "pyvmm:arm64"
    assert c.TEST_IMAGE.for_arch("aarch64").tag == "pyvmm-test:arm64"
    assert c.TEST_IMAGE.for_arch("aarch64").dockerfile == c.TEST_IMAGE.dockerfile
    monkeypatch.setattr(c.platform, "machine", lambda: "aarch64")
    assert c.TEST_IMAGE.for_arch("aarch64") is c.TEST_IMAGE  # an arm64 runner's own
