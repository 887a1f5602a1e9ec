"""The jail end to end: a fresh interpreter (jailed_child.py) enters it, and the test looks at the
jailed process from outside, through /proc/<pid>, and at what it reported from inside.

These need root, or user namespaces for this user; they are skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHILD = Path(__file__).with_name("jailed_child.py")
ROOT = Path(__file__).resolve().parents[3]
NAME = "test-dev"
PYTHONPATH = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
NOBODY = (65534, 65534)
# Only guards against a hang: a jail starts in well under a second.
PATIENCE = 60.0
NAMESPACES = ["mnt", "pid", "net", "ipc", "uts"]
CAPS = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]


def _unshare_works(*flags: str) -> str:
    """Why `unshare FLAGS true` fails here; "" when it works."""
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    run = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    return "" if run.returncode == 0 else f"unshare {' '.join(flags)}: {run.stderr.strip()}"


def _user_namespaces() -> str:
    return _unshare_works("-U", "-r", "-m", "-p", "-i", "-u", "-n", "-f")


def _namespaces_as_root() -> str:
    if os.geteuid() != 0:
        return "without a user namespace, only root can make the others"
    return _unshare_works("-m", "-p", "-i", "-u", "-n", "-f")


class ChildFailed(Exception):
    """The child exited without a report; the message is its standard error."""


@dataclass
class Jailed:
    """A jailed child, stopped where it waits for the go byte."""

    proc: subprocess.Popen[bytes]
    pid: int  # PID 1 of its namespace, as the host numbers it
    facts: dict[str, Any]  # what it reported from inside
    kept: list[int]
    leaked: int
    file: Path
    go: int
    outside: dict[str, Any]  # what /proc shows of it

    def release(self) -> int:
        """Let it exit; the status its spawner sees."""
        os.write(self.go, b"g")
        return self.wait()

    def wait(self) -> int:
        status = self.proc.wait(timeout=PATIENCE)
        os.close(self.go)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return status


def _above(fd: int, low: int) -> int:
    """A copy of `fd` at the lowest free number >= `low`; `fd` closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return moved


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def start(
    tmp_path: Path,
    run_as: tuple[int, int] | None,
    user_namespace: bool = True,
    exit_code: int = 0,
    parent: int | None = None,
) -> Jailed:
    """Spawn the child as the VMM will (fork+exec, fds passed by number) and wait for its
    report. It keeps a report pipe, a go pipe, a file and a spare fd, in increasing order with
    a leaked fd (passed but not kept) between the go pipe and the file."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    file = tmp_path / "written"
    file.write_bytes(b"")
    os.chmod(file, 0o666)  # run_as: the jail may not be the file's owner; the fd is what counts
    opened = [
        report_w,
        go_r,
        os.open("/dev/null", os.O_RDONLY),
        os.open(file, os.O_WRONLY),
        os.open("/dev/null", os.O_RDONLY),
    ]
    fds: list[int] = []
    for fd in opened:
        fds.append(_above(fd, fds[-1] + 1 if fds else 20))
    report_fd, go_fd, leaked, file_fd, spare_fd = fds
    args = {
        "name": NAME,
        "parent": os.getpid() if parent is None else parent,
        "keep": [report_fd, go_fd, file_fd, spare_fd],
        "run_as": run_as,
        "user_namespace": user_namespace,
        "report": report_fd,
        "go": go_fd,
        "file": file_fd,
        "spare": spare_fd,
        "exit": exit_code,
    }
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(args)],
            pass_fds=fds,
            close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
    finally:
        for fd in fds:
            os.close(fd)
    with os.fdopen(report_r, "rb") as reports:
        ready, _, _ = select.select([reports], [], [], PATIENCE)
        line = reports.readline() if ready else b""
    if not line:
        os.close(go_w)
        proc.kill()
        _, errors = proc.communicate()
        raise ChildFailed(errors.decode())
    (pid,) = _children(proc.pid)
    return Jailed(
        proc, pid, json.loads(line), args["keep"], leaked, file, go_w, _look_from_outside(pid)
    )


def _look_from_outside(pid: int) -> dict[str, Any]:
    proc = Path(f"/proc/{pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    limits = {}
    for line in (proc / "limits").read_text().splitlines()[1:]:
        what, soft, hard, *_ = [column for column in line.split("  ") if column.strip()]
        limits[what.strip()] = (soft.strip(), hard.strip())
    root = os.statvfs(proc / "root")
    return {
        "status": {key: value.strip() for key, value in status.items()},
        "ns": {kind: os.readlink(proc / "ns" / kind) for kind in [*NAMESPACES, "user"]},
        "mounts": (proc / "mountinfo").read_text().splitlines(),
        "root": os.listdir(proc / "root"),
        "root size": root.f_blocks * root.f_frsize,
        "root flags": root.f_flag,
        "limits": limits,
        "fds": sorted(int(fd) for fd in os.listdir(proc / "fd")),
    }


@dataclass(frozen=True)
class Config:
    """How a jail is entered; `skip` is why it cannot be here ("" when it can)."""

    run_as: tuple[int, int] | None
    user_namespace: bool
    skip: str


CAP_SYS_PTRACE = 19


def _cannot_look_inside() -> str:
    """Why this process cannot read a jailed process's /proc files ("" when it can): root
    reads those of another user's process only with CAP_SYS_PTRACE, which containers drop."""
    if os.geteuid() != 0:
        return ""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    if int(status["CapEff"], 16) >> CAP_SYS_PTRACE & 1:
        return ""
    return "root without CAP_SYS_PTRACE (a container) cannot look into a jailed process"


def _configs() -> dict[str, Config]:
    root = os.geteuid() == 0
    blind = _cannot_look_inside()
    return {
        # Root runs devices as an unprivileged user; anyone else as themselves.
        "user namespace": Config(NOBODY if root else None, True, blind or _user_namespaces()),
        "no user namespace": Config(NOBODY, False, blind or _namespaces_as_root()),
    }


@pytest.fixture(scope="module", params=list(_configs()))
def jailed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Jailed]:
    config = _configs()[request.param]
    if config.skip:
        pytest.skip(config.skip)
    child = start(tmp_path_factory.mktemp("jail"), config.run_as, config.user_namespace, 3)
    try:
        yield child
    finally:
        if child.proc.poll() is None:
            child.release()


def test_the_jailed_process_has_no_privileges(jailed: Jailed) -> None:
    status = jailed.outside["status"]
    assert {cap: status[cap] for cap in CAPS} == {cap: "0" * 16 for cap in CAPS}
    assert status["NoNewPrivs"] == "1"
    report = jailed.facts["report"]
    uid, gid = report["host_uid"], report["host_gid"]
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert report["nproc_enforced"] is (uid != 0)
    assert jailed.facts["uid"] == (0 if report["user_namespace"] else uid)


def test_the_jailed_process_is_pid_1_of_its_own_namespaces(jailed: Jailed) -> None:
    assert jailed.outside["status"]["NSpid"].split() == [str(jailed.pid), "1"]
    assert jailed.facts["pid"] == 1
    mine = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in [*NAMESPACES, "user"]}
    theirs = jailed.outside["ns"]
    assert [kind for kind in NAMESPACES if theirs[kind] == mine[kind]] == []
    assert (theirs["user"] != mine["user"]) is jailed.facts["report"]["user_namespace"]


def test_the_root_is_an_empty_read_only_tmpfs_and_nothing_else_is_mounted(jailed: Jailed) -> None:
    (mount,) = jailed.outside["mounts"]
    before, after = mount.split(" - ")
    _, _, _, root, point, options = before.split()[:6]
    fstype = after.split()[0]
    assert (root, point, fstype) == ("/", "/", "tmpfs")
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options.split(","))
    assert jailed.outside["root"] == []
    assert jailed.facts["listdir /"] == []
    assert jailed.outside["root size"] == 4096
    assert jailed.outside["root flags"] & os.ST_RDONLY
    assert jailed.facts["create /x"] in ("EROFS", "EACCES")


def test_it_can_neither_fork_nor_start_a_thread(jailed: Jailed) -> None:
    assert jailed.outside["limits"]["Max processes"] == ("0", "0")
    assert jailed.outside["limits"]["Max core file size"] == ("0", "0")
    assert jailed.facts["fork"] == "EAGAIN"
    assert jailed.facts["thread"] == "RuntimeError"  # "can't start new thread"


def test_it_holds_exactly_its_fds_and_can_open_no_more(jailed: Jailed) -> None:
    top = max(jailed.kept)  # the spare fd, which it closed to list / with
    assert jailed.outside["fds"] == list(range(top))
    assert jailed.outside["limits"]["Max open files"] == (str(top + 1), str(top + 1))
    report = jailed.facts["report"]
    assert report["fd_limit"] == top + 1
    assert report["closed_fds"] == [jailed.leaked]
    holes = [fd for fd in range(3, top) if fd not in jailed.kept]
    assert report["filled_fds"] == holes
    assert jailed.leaked in holes
    new_fds = ["pipe", "eventfd", "socketpair", "open /"]
    assert {what: jailed.facts[what] for what in new_fds} == dict.fromkeys(new_fds, "EMFILE")


def test_it_can_write_through_a_kept_fd(jailed: Jailed) -> None:
    assert jailed.facts["write kept fd"] == "ok"
    assert jailed.file.read_bytes() == b"written in the jail"


def test_its_exit_status_reaches_the_spawner(jailed: Jailed) -> None:
    assert jailed.release() == 3


@pytest.fixture
def jailable() -> tuple[int, int] | None:
    """The run_as of a jail this host can make (skips when none)."""
    config = _configs()["user namespace"]
    if config.skip:
        config = _configs()["no user namespace"]
    if config.skip:
        pytest.skip(config.skip)
    return config.run_as


def test_a_signal_that_kills_the_device_reaches_the_spawner(
    tmp_path: Path, jailable: tuple[int, int] | None
) -> None:
    child = start(tmp_path, jailable)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def _wait_gone(pid_fd: int) -> bool:
    return bool(select.select([pid_fd], [], [], PATIENCE)[0])


def test_the_device_dies_with_the_process_waiting_for_it(
    tmp_path: Path, jailable: tuple[int, int] | None
) -> None:
    child = start(tmp_path, jailable)
    device = os.pidfd_open(child.pid)
    try:
        child.proc.kill()
        child.wait()
        assert _wait_gone(device)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it is gone, as it should be
            signal.pidfd_send_signal(device, signal.SIGKILL)
        os.close(device)


# A VMM stand-in: it jails a child as `start` does, says its pids and waits for its stdin.
VMM = """
import json, sys
from pathlib import Path
from tests.unit.sandbox.test_jail_process import start
run_as = json.loads(sys.argv[2])
child = start(Path(sys.argv[1]), tuple(run_as) if run_as else None)
print(child.proc.pid, child.pid, flush=True)
sys.stdin.read()
"""


def test_the_device_dies_with_the_vmm(tmp_path: Path, jailable: tuple[int, int] | None) -> None:
    """The parent death signal of step 2: the VMM dies, so does the process waiting for the
    device, and with it the device."""
    with subprocess.Popen(
        [sys.executable, "-c", VMM, str(tmp_path), json.dumps(jailable)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=PYTHONPATH),
    ) as vmm:
        assert vmm.stdout is not None
        waiting, device = (int(pid) for pid in vmm.stdout.readline().split())
        pid_fds = [os.pidfd_open(waiting), os.pidfd_open(device)]
        vmm.kill()
    try:
        assert [_wait_gone(fd) for fd in pid_fds] == [True, True]
    finally:
        for fd in pid_fds:
            with contextlib.suppress(ProcessLookupError):  # it is gone, as it should be
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)


def test_a_process_that_is_not_the_vmms_child_does_not_enter(
    tmp_path: Path, jailable: tuple[int, int] | None
) -> None:
    with pytest.raises(ChildFailed) as failed:
        start(tmp_path, jailable, parent=1)
    assert str(failed.value).splitlines() == [
        f"{NAME}: jail: parent: pid 1 is gone (the parent is now {os.getpid()})"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="host uid 0 is what the kernel exempts")
def test_host_root_is_not_held_by_rlimit_nproc_hence_run_as(tmp_path: Path) -> None:
    """Why `run_as` exists: a jail that stays host uid 0 has no capability left, yet the kernel
    does not apply RLIMIT_NPROC to it; only a seccomp filter could stop its forks."""
    if skip := _user_namespaces():
        pytest.skip(skip)
    child = start(tmp_path, None)
    try:
        assert child.outside["status"]["CapEff"] == "0" * 16
        assert child.outside["limits"]["Max processes"] == ("0", "0")
        assert child.facts["report"]["nproc_enforced"] is False
        assert child.facts["fork"] == "ok"
    finally:
        child.release()
