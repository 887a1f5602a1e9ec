"""Policies compiled with libseccomp and installed in a real process: what they allow, what
they refuse and how, and compile errors naming the policy line."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.sandbox import seccomp
from pyvmm.sandbox.policy import load_policy
from pyvmm.sandbox.seccomp import SeccompError, load_filter, syscall_number
from tests.cheaders import layout_facts, mismatches

# What the child below needs once the filter is in: its own exit and the write of its answer,
# and memory for Python's allocator.
BASE = "write: 1\nexit_group: 1\nbrk: 1\nmmap: 1\nmunmap: 1\n"
CHILD = """
import fcntl, os, sys
from pathlib import Path
from pyvmm.sandbox import seccomp
compiled = seccomp.load_filter(Path(sys.argv[1]), "dev", log_failures=sys.argv[2] == "log")
action, arg = sys.argv[3], int(sys.argv[4])
compiled.install()
try:
    if action == "uname":
        answer = os.uname().sysname
    elif action == "fcntl":
        answer = str(fcntl.fcntl(0, arg))
    else:
        answer = "nothing"
except OSError as exc:
    answer = f"errno {exc.errno}"
os.write(1, answer.encode())
os._exit(0)
"""


def run(
    tmp_path: Path, policy: str, action: str, arg: int = 0, log: bool = False
) -> tuple[int, str]:
    (tmp_path / "dev.policy").write_text(BASE + policy)
    argv = [sys.executable, "-c", CHILD, str(tmp_path), "log" if log else "kill", action, str(arg)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout


KILLED = -signal.SIGSYS


def test_a_call_the_policy_allows_runs(tmp_path: Path) -> None:
    assert run(tmp_path, "uname: 1\n", "uname") == (0, "Linux")


def test_a_call_without_a_line_kills_the_process(tmp_path: Path) -> None:
    assert run(tmp_path, "", "uname") == (KILLED, "")


def test_a_call_whose_expression_fails_kills_it(tmp_path: Path) -> None:
    policy = "fcntl: arg1 == F_GETFL\n"
    assert run(tmp_path, policy, "fcntl", seccomp.constant("F_GETFL") or 0)[0] == 0
    assert run(tmp_path, policy, "fcntl", seccomp.constant("F_GETFD") or 0) == (KILLED, "")


def test_return_errno_fails_the_call_instead(tmp_path: Path) -> None:
    policy = "fcntl: arg1 == F_GETFL || arg1 == F_SETFL; return EPERM\nuname: return ENOSYS\n"
    assert run(tmp_path, policy, "fcntl", seccomp.constant("F_GETFL") or 0)[0] == 0
    assert run(tmp_path, policy, "fcntl", seccomp.constant("F_GETFD") or 0) == (
        0,
        f"errno {errno.EPERM}",
    )
    assert run(tmp_path, policy, "uname") == (0, f"errno {errno.ENOSYS}")


def test_in_allows_only_bits_inside_the_mask(tmp_path: Path) -> None:
    policy = "fcntl: arg1 in 0x3; return EPERM\n"  # F_GETFD 1, F_SETFD 2, F_GETFL 3
    assert run(tmp_path, policy, "fcntl", 3)[0] == 0
    assert run(tmp_path, policy, "fcntl", 4) == (0, f"errno {errno.EPERM}")  # F_SETFL


# The log mode's child hands its filter's listener to the test (on the socket argv[2] names)
# before the call.
LOGGING_CHILD = """
import os, socket, sys
from pathlib import Path
from pyvmm.sandbox import seccomp
compiled = seccomp.load_filter(Path(sys.argv[1]), "dev", log_failures=True)
to_test = socket.socket(fileno=int(sys.argv[2]))
compiled.install()
socket.send_fds(to_test, [b"x"], [compiled.listener()])
os.write(1, os.uname().sysname.encode())
os._exit(0)
"""


def test_log_failures_names_a_refused_call_and_lets_it_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dev.policy").write_text(BASE + "sendmsg: 1\n")
    ours, theirs = socket.socketpair()
    ours.settimeout(60)
    with ours, theirs:
        argv = [sys.executable, "-c", LOGGING_CHILD, str(tmp_path), str(theirs.fileno())]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, pass_fds=[theirs.fileno()], text=True)
        with caplog.at_level(logging.WARNING):
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            watcher = seccomp.watch_denials(fds[0], "dev", "dev.policy")
            out, _ = proc.communicate(timeout=60)
            watcher.join(10)
    assert (proc.returncode, out) == (0, "Linux")
    uname = seccomp.syscall_number("uname", os.uname().machine)
    assert f"dev: seccomp: uname ({uname}) is not in dev.policy; allowed" in caplog.text
    assert not watcher.is_alive(), "the watcher outlived the process"


def test_a_policy_naming_no_real_system_call_is_refused_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "dev.policy").write_text("read: 1\nno_such_call: 1\n")
    with pytest.raises(SeccompError) as info:
        load_filter(tmp_path, "dev")
    assert str(info.value) == (
        f"{tmp_path}/dev.policy:2: no_such_call is not a system call on this machine"
    )


def test_a_malformed_policy_is_a_seccomp_error_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "dev.policy").write_text("read: 1\nwrite: arg0 ==\n")
    with pytest.raises(SeccompError, match=rf"^{tmp_path}/dev.policy:2: "):
        load_filter(tmp_path, "dev")


def test_every_shipped_policy_compiles() -> None:
    directory = seccomp.policy_dir()
    policies = sorted(p.stem for p in directory.glob("*.policy"))
    if not policies:
        pytest.skip(f"no policies for this machine in {directory}")
    for name in policies:
        load_filter(directory, name).close()


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_every_shipped_policy_names_real_system_calls_of_its_architecture(arch: str) -> None:
    directory = Path(seccomp.__file__).resolve().parents[2] / "seccomp" / arch
    policies = sorted(directory.glob("*.policy"))
    devices = {"common_device", "block_device", "net_device", "vhost_net_device", "rng_device"}
    assert {p.stem for p in policies} >= devices
    for path in policies:
        policy = load_policy(path, seccomp.constant, seccomp.errno_value)
        unknown = [
            r.where for r in policy.rules.values() if syscall_number(r.syscall, arch) is None
        ]
        assert not unknown, f"not system calls on {arch}: {unknown}"


def test_constants_match_the_system_headers(tmp_path: Path) -> None:
    if not Path("/usr/include/seccomp.h").exists():
        pytest.skip("libseccomp's header is not installed (apt-get install libseccomp-dev)")
    mask = (1 << 64) - 1
    facts = [
        ("SCMP_ACT_KILL_PROCESS", seccomp.SCMP_ACT_KILL_PROCESS),
        ("SCMP_ACT_ERRNO(0)", seccomp.SCMP_ACT_ERRNO_BASE),
        ("SCMP_ACT_NOTIFY", seccomp.SCMP_ACT_NOTIFY),
        ("SCMP_ARCH_NATIVE", seccomp.SCMP_ARCH_NATIVE),
        ("SECCOMP_USER_NOTIF_FLAG_CONTINUE", seccomp.SECCOMP_USER_NOTIF_FLAG_CONTINUE),
        ("SCMP_ACT_ALLOW", seccomp.SCMP_ACT_ALLOW),
        ("SCMP_FLTATR_ACT_BADARCH", seccomp.SCMP_FLTATR_ACT_BADARCH),
        ("SCMP_FLTATR_CTL_NNP", seccomp.SCMP_FLTATR_CTL_NNP),
        ("SCMP_CMP_MASKED_EQ", seccomp.SCMP_CMP_MASKED_EQ),
        *((f"SCMP_CMP_{op.name}", value) for op, value in seccomp.CMP_OPS.items()),
        *((name, value & mask) for name, value in seccomp.EXTRA_CONSTANTS.items()),
    ]
    facts += layout_facts(seccomp._ffi, ["seccomp_data", "seccomp_notif", "seccomp_notif_resp"])
    headers = ["seccomp.h", "linux/fcntl.h", "linux/futex.h", "linux/sched.h", "linux/falloc.h"]
    headers += ["sys/ioctl.h", "linux/if_tun.h", "linux/vhost.h"]
    assert not mismatches(tmp_path, ["sys/prctl.h", *headers], facts)


GROW = """
import os, sys
from pathlib import Path
from pyvmm.sandbox import seccomp
seccomp.load_filter(Path(sys.argv[1]), sys.argv[2]).install()
buffer = bytearray()
for _ in range(256):  # 1 MiB in 4 KiB steps: glibc mmaps it past 128 KiB, then mremaps it
    buffer += bytes(4096)
os.write(2, b"grown %d" % len(buffer))
os._exit(0)
"""


@pytest.mark.parametrize("device", ["vsock_device", "net_device", "block_device"])
def test_a_buffer_a_device_grows_past_the_mmap_threshold_is_allowed(device: str) -> None:
    """realloc of a block glibc mmapped moves it with mremap, as a vsock stream's buffer for a
    slow host reader grows."""
    policies = seccomp.policy_dir()
    argv = [sys.executable, "-c", GROW, str(policies), device]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (0, f"grown {1 << 20}")


SHRINK = """
import ctypes, os, sys, threading
from pathlib import Path
from pyvmm.sandbox import jail, seccomp
# A fixed trim threshold (M_TRIM_THRESHOLD): glibc's own grows with the large blocks it frees.
ctypes.CDLL(None).mallopt(-1, 128 << 10)
if sys.argv[3] == "one arena":
    jail.single_malloc_arena("test")
seccomp.load_filter(Path(sys.argv[1]), sys.argv[2]).install()
def churn():
    # ~8 MB in small blocks from this thread's malloc arena, freed: the heap shrinks.
    for _ in range(3):
        blocks = [bytearray(4000) for _ in range(2000)]
        del blocks
thread = threading.Thread(target=churn)
thread.start()
thread.join()
os.write(2, b"churned")
os._exit(0)
"""


@pytest.mark.parametrize("device", ["vsock_device", "net_device", "block_device"])
def test_a_thread_giving_memory_back_is_allowed_with_one_malloc_arena(device: str) -> None:
    """glibc opens /proc/sys/vm/overcommit_memory the first time a thread arena's heap shrinks,
    and the policy kills the process for it (the vsock device's worker, in CI, once a stream's
    buffer emptied): the jail leaves the process one arena, the main one, which shrinks with brk."""
    policies = seccomp.policy_dir()
    for arenas, expected in (("one arena", (0, "churned")), ("default", (-signal.SIGSYS, ""))):
        argv = [sys.executable, "-c", SHRINK, str(policies), device, arenas]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert (proc.returncode, proc.stderr) == expected, arenas
