"""The jail's constants against the system headers, and its errors: one line naming the device,
the step and the reason. Everything here runs in the test process, so no step that would jail
it runs for real: failures come from the spec's checks, or from a stand-in for libc."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pyvmm.sandbox import jail
from pyvmm.sandbox.jail import (
    M_ARENA_MAX,
    MNT_DETACH,
    SECBIT_NO_SETUID_FIXUP,
    SYS_PIVOT_ROOT,
    Clone,
    JailError,
    JailSpec,
    MountFlag,
    Prctl,
)
from tests.cheaders import mismatches

HEADERS = ["linux/sched.h", "sys/mount.h", "sys/prctl.h", "linux/securebits.h", "sys/syscall.h",
           "malloc.h"]  # fmt: skip
NAME = "virtio-blk vda"


def test_constants_match_the_system_headers(tmp_path: Path) -> None:
    facts = [(f"CLONE_{flag.name}", int(flag)) for flag in Clone]
    facts += [(f"MS_{flag.name}", int(flag)) for flag in MountFlag]
    facts += [(f"PR_{option.name}", int(option)) for option in Prctl]
    facts += [("MNT_DETACH", MNT_DETACH), ("SECBIT_NO_SETUID_FIXUP", SECBIT_NO_SETUID_FIXUP)]
    facts += [("-M_ARENA_MAX", -M_ARENA_MAX)]  # negative: compared as unsigned long
    machine = os.uname().machine
    if machine in SYS_PIVOT_ROOT:
        facts.append(("SYS_pivot_root", SYS_PIVOT_ROOT[machine]))
    assert not mismatches(tmp_path, HEADERS, facts)


def test_pivot_root_has_a_number_on_this_machine() -> None:
    assert os.uname().machine in SYS_PIVOT_ROOT


def test_libcap_knows_every_capability_of_this_kernel() -> None:
    """The bounding set is dropped for each of cap_max_bits(): all of the kernel's."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert jail._load_libcap(NAME).cap_max_bits() == last + 1


def _spec(**changes: Any) -> JailSpec:
    return JailSpec(name=NAME, parent_pid=os.getppid(), **changes)


@pytest.fixture
def safety_net(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that call enter_jail in this process: should the check under test let it
    through, its first kernel call (a prctl) fails instead of jailing the test run."""
    monkeypatch.setattr(jail, "_libc", FailingLibc("prctl"))


@pytest.mark.usefixtures("safety_net")
def test_a_kept_directory_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(JailError) as e:
            jail.enter_jail(_spec(keep_fds=(fd,)))
    finally:
        os.close(fd)
    assert str(e.value) == f"{NAME}: jail: kept fd {fd}: a directory, a way out of the empty root"


@pytest.mark.usefixtures("safety_net")
def test_a_kept_fd_that_is_not_open_is_refused() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(JailError) as e:
        jail.enter_jail(_spec(keep_fds=(fd,)))
    assert str(e.value) == f"{NAME}: jail: kept fd {fd}: Bad file descriptor"


@pytest.mark.usefixtures("safety_net")
def test_a_process_with_threads_is_refused() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(JailError) as e:
            jail.enter_jail(_spec())
    finally:
        stop.set()
        thread.join()
    assert e.value.step == "threads"
    assert str(e.value).startswith(f"{NAME}: jail: threads: ")
    assert str(e.value).endswith(" running; a jail needs a single thread")


def test_only_root_can_run_a_device_as_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    with pytest.raises(JailError) as e:
        jail._run_as(_spec(run_as=(65534, 65534)))
    assert str(e.value) == f"{NAME}: jail: run as: only root can become uid 65534 gid 65534"


def test_running_as_oneself_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(jail, "_libc", FailingLibc(""))  # any prctl would fail
    jail._run_as(_spec(run_as=(1000, 1000)))


class FailingLibc:
    """libc whose `failing` call fails with `err`; the others succeed and do nothing."""

    def __init__(self, failing: str, err: int = errno.EPERM) -> None:
        self.failing = failing
        self.err = err
        self.calls: list[str] = []

    def __getattr__(self, function: str) -> Any:
        def call(*args: object) -> int:
            self.calls.append(function)
            if function == self.failing:
                jail._ffi.errno = self.err
                return -1
            return 0

        return call


def test_a_failing_step_names_the_device_the_step_and_errno(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jail, "_libc", FailingLibc("mount"))
    with pytest.raises(JailError) as e:
        jail._empty_root(NAME)
    assert str(e.value) == f"{NAME}: jail: private mounts: Operation not permitted"


def test_the_root_is_not_left_unless_the_tmpfs_is_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """If /.. did not lead into a tmpfs on /, pivot_root is not even tried."""
    monkeypatch.chdir(tmp_path)  # _empty_root changes directory: back after the test
    libc = FailingLibc("")
    monkeypatch.setattr(jail, "_libc", libc)
    with pytest.raises(JailError) as e:
        jail._empty_root(NAME)
    assert str(e.value) == f"{NAME}: jail: enter tmpfs: /.. did not reach the tmpfs mounted on /"
    assert libc.calls == ["mount", "mount"]


@pytest.mark.parametrize("err", sorted(jail.USER_NAMESPACE_REFUSED))
def test_a_host_that_refuses_a_user_namespace_is_recorded(
    monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    monkeypatch.setattr(jail, "_libc", FailingLibc("unshare", err))
    assert jail._unshare_user(NAME, 1000, 1000) == os.strerror(err)


def test_any_other_user_namespace_error_is_a_jail_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail, "_libc", FailingLibc("unshare", errno.ENOMEM))
    with pytest.raises(JailError) as e:
        jail._unshare_user(NAME, 1000, 1000)
    assert str(e.value) == f"{NAME}: jail: user namespace: Cannot allocate memory"
