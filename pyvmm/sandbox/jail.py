"""The jail a device process puts itself in: namespaces, an empty root, no privileges, rlimits.

A device process is forked by the VMM's device zygote (a fresh interpreter, single-threaded),
which passes it the fds it needs. Still single-threaded, with every module it will use imported
and every fd it will hold made, it calls `enter_jail`, then installs its seccomp filter
(pyvmm.sandbox.seccomp) as the very last step. Afterwards nothing can be imported (there is no
file system), no fd opened (CPython's mmap dup()s the fd it maps: guest memory is mapped
before) and no thread started (RLIMIT_NPROC counts threads). `enter_jail` goes, in this order:

1. The user (`run_as`, root only): root becomes an unprivileged host user first, keeping its
   capabilities for the steps below. It must come before the user namespace (a process can map
   only its own uid into one). Without it, RLIMIT_NPROC would not hold: the kernel never
   applies it to host uid 0, capabilities or not.
2. Parent death: PR_SET_PDEATHSIG(SIGKILL), then a check that the parent is still the VMM. The
   signal is armed only from that call on, so a VMM that died just before would go unnoticed;
   and a change of uid or gid disarms it, hence after 1.
3. The fds: every fd not kept is closed, so nothing leaked by the spawner enters the jail.
4. Namespaces: a user namespace where the host allows one (so an unprivileged VMM can do the
   rest; uid and gid 0 inside map to the host ids), then mount, PID, IPC, UTS and network ones.
5. An empty root: a small read-only tmpfs mounted over /, pivot_root into it, the old root
   detached. No host directory has to exist for it, and no host file is reachable by path.
6. Capabilities: all dropped (bounding, ambient, inheritable, permitted, effective). Steps 4
   and 5 need CAP_SYS_ADMIN, so this comes after them.
7. no_new_privs, so that no execve can regain a privilege (and seccomp may be installed then).
8. A fork: unshare(CLONE_NEWPID) applies to children only. The child is PID 1 of the new
   namespace and returns from `enter_jail`; the parent waits and exits with its status. Steps
   5-7 come before the fork so that this parent, alive as long as the device, shares the empty
   root, the lack of capabilities and no_new_privs instead of being a privileged process in
   the host's file system. It closes the device's fds.
9. rlimits, in the child: no core dumps, no new process or thread (RLIMIT_NPROC 0, enforced
   only once the capabilities are gone: hence after 6; unless the process is to start
   threads, see `JailSpec.threads`), and no new fd: holes below the highest kept fd are filled
   with inert fds and RLIMIT_NOFILE is set just above it (above it by `JailSpec.new_fds` for a
   device that accepts sockets).
10. One malloc arena for every thread (mallopt M_ARENA_MAX), for a process that starts threads:
   the first time a thread arena's heap shrinks, glibc opens /proc/sys/vm/overcommit_memory,
   which the seccomp filter kills the process for (the vsock device under load in CI, when a
   stream's buffer emptied). The main arena gives memory back with brk instead.

Every failure raises JailError, one line naming the device, the step and the reason.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import resource
import signal
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from pyvmm.cdecl import declare

_ffi: Any = declare(
    "sandbox_jail",
    """
    int unshare(int flags);
    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const void *data);
    int umount2(const char *target, int flags);
    int prctl(int option, ...);
    long syscall(long number, ...);
    int mallopt(int param, int value);

    typedef void *cap_t;  /* a pointer to what libcap keeps opaque */
    typedef int cap_value_t;
    cap_t cap_init(void);
    int cap_clear(cap_t cap_p);
    int cap_set_proc(cap_t cap_p);
    int cap_free(void *obj_d);
    int cap_drop_bound(cap_value_t cap);
    int cap_reset_ambient(void);
    cap_value_t cap_max_bits(void);
    """,
)
_libc: Any = _ffi.dlopen(None)
LIBCAP = "libcap.so.2"


class Clone(enum.IntFlag):
    """unshare(2) flags: the namespaces (<linux/sched.h>)."""

    NEWNS = 0x00020000
    NEWUTS = 0x04000000
    NEWIPC = 0x08000000
    NEWUSER = 0x10000000
    NEWPID = 0x20000000
    NEWNET = 0x40000000


class MountFlag(enum.IntFlag):
    """mount(2) flags (<sys/mount.h>)."""

    RDONLY = 1
    NOSUID = 2
    NODEV = 4
    NOEXEC = 8
    REC = 1 << 14
    PRIVATE = 1 << 18


MNT_DETACH = 2
M_ARENA_MAX = -8  # <malloc.h>


class Prctl(enum.IntEnum):
    """prctl(2) options (<sys/prctl.h>)."""

    SET_PDEATHSIG = 1
    GET_DUMPABLE = 3
    SET_DUMPABLE = 4
    SET_NAME = 15
    SET_SECUREBITS = 28
    SET_CHILD_SUBREAPER = 36
    SET_NO_NEW_PRIVS = 38


SECBIT_NO_SETUID_FIXUP = 1 << 2  # <linux/securebits.h>
# glibc has no pivot_root(); its number per `os.uname().machine` (<sys/syscall.h>).
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

OTHER_NAMESPACES = Clone.NEWNS | Clone.NEWPID | Clone.NEWIPC | Clone.NEWUTS | Clone.NEWNET
# What unshare(CLONE_NEWUSER) answers on a host that does not offer user namespaces to this
# process: not permitted (policy, a chroot), not built in, or too many already.
USER_NAMESPACE_REFUSED = frozenset({errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.EUSERS})
ROOT_FLAGS = MountFlag.RDONLY | MountFlag.NOSUID | MountFlag.NODEV | MountFlag.NOEXEC
# Empty and read-only: its root directory is its only inode, a page is room enough.
ROOT_OPTIONS = b"mode=0555,size=4k,nr_inodes=1"


class JailError(Exception):
    """A step of the jail failed. The message is one line: device, step and reason."""

    def __init__(self, name: str, step: str, why: str) -> None:
        super().__init__(f"{name}: jail: {step}: {why}")
        self.step = step


@dataclass(frozen=True)
class JailSpec:
    """What the jail needs to know, from the VMM."""

    name: str  # the device as messages name it, e.g. "virtio-blk vda"
    parent_pid: int  # the VMM: the jail is not entered once it is gone
    keep_fds: tuple[int, ...] = ()  # the device's fds; 0, 1 and 2 are always kept
    run_as: tuple[int, int] | None = None  # host (uid, gid); a change needs root
    user_namespace: bool = True  # False: do not try one (for tests of the fallback)
    # RLIMIT_NPROC counts threads too, and every process of the host user: a process that
    # will start threads (a device's worker) leaves it alone, and its seccomp policy, which
    # lets clone make threads only, is what forbids a new process.
    threads: bool = False
    # Room for fds made after the jail (sockets a device accepts or is handed): RLIMIT_NOFILE
    # is this much above the highest kept fd.
    new_fds: int = 0


@dataclass(frozen=True)
class JailReport:
    """What the jail turned out to be on this host."""

    user_namespace: bool
    no_user_namespace_why: str  # why not, "" with one
    host_uid: int
    host_gid: int
    nproc_enforced: bool  # False for host uid 0, which the kernel exempts: only seccomp stops fork
    fd_limit: int  # RLIMIT_NOFILE: every fd below it is open, or free for new_fds
    closed_fds: tuple[int, ...]  # fds held but not kept (the spawner leaked them), now closed
    filled_fds: tuple[int, ...]  # holes below the highest kept fd, now inert fds


def enter_jail(spec: JailSpec) -> JailReport:
    """Jail this process, as this module's docstring says, and return in the jailed process:
    PID 1 of its namespace, ready for its seccomp filter. The process that called it never
    returns: it waits for the jailed one and exits with its status."""
    name = spec.name
    cap = _load_libcap(name)  # now: dlopen() needs the file system
    kept = _kept_fds(spec)
    _run_as(spec)
    die_with_parent(name, spec.parent_pid)
    closed = close_all_but(kept)
    uid, gid = os.geteuid(), os.getegid()
    why_not = _unshare_user(name, uid, gid) if spec.user_namespace else "not asked for"
    _check(name, "namespaces", _libc.unshare(OTHER_NAMESPACES))
    _empty_root(name)
    _drop_capabilities(name, cap)
    _prctl(name, "no_new_privs", Prctl.SET_NO_NEW_PRIVS, 1)
    _fork_into_pid_namespace(name)
    filled = _fill_fd_holes(name, kept)
    limit = max(kept) + 1 + spec.new_fds
    with _step(name, "rlimits"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if not spec.threads:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    if spec.threads:
        single_malloc_arena(name)
    return JailReport(
        user_namespace=not why_not,
        no_user_namespace_why=why_not,
        host_uid=uid,
        host_gid=gid,
        nproc_enforced=uid != 0 and not spec.threads,
        fd_limit=limit,
        closed_fds=closed,
        filled_fds=filled,
    )


@contextlib.contextmanager
def _step(name: str, step: str) -> Iterator[None]:
    """Turn an OSError of the step into its JailError."""
    try:
        yield
    except OSError as e:
        raise JailError(name, step, e.strerror or str(e)) from None


def _check(name: str, step: str, result: int) -> int:
    """`result` of a C call, or its errno as a JailError."""
    if result == -1:
        raise JailError(name, step, os.strerror(_ffi.errno))
    return result


def _prctl(name: str, step: str, option: Prctl, arg: int = 0) -> int:
    # Some options insist that the unused arguments are 0: pass them all.
    args = [_ffi.cast("unsigned long", a) for a in (arg, 0, 0, 0)]
    return _check(name, step, _libc.prctl(option, *args))


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def held_fds() -> tuple[int, ...]:
    """Every fd above 2 this process holds now (for a process that keeps all it was given)."""
    listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    return tuple(sorted(fd for fd in listed if fd > 2 and _is_open(fd)))  # the listing's is gone


def _kept_fds(spec: JailSpec) -> frozenset[int]:
    """The fds to keep, checked; and check that the process is alone (a fork and a user
    namespace both need that)."""
    for fd in spec.keep_fds:
        with _step(spec.name, f"kept fd {fd}"):
            mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise JailError(spec.name, f"kept fd {fd}", "a directory, a way out of the empty root")
    with _step(spec.name, "threads"):
        threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise JailError(spec.name, "threads", f"{threads} running; a jail needs a single thread")
    return frozenset((0, 1, 2, *spec.keep_fds))


def name_process(name: str, comm: str) -> None:
    """Name the calling thread (its /proc comm, at most 15 bytes): what the kernel's own
    messages about the process (a seccomp kill or log) call it."""
    buffer = _ffi.new("char[]", comm.encode()[:15])
    _check(name, "name", _libc.prctl(Prctl.SET_NAME, buffer, *[_ffi.cast("unsigned long", 0)] * 3))


def die_with_parent(name: str, parent: int) -> None:
    """SIGKILL for this process when `parent` ends; a JailError if it has already."""
    _prctl(name, "parent death signal", Prctl.SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        raise JailError(name, "parent", f"pid {parent} is gone (the parent is now {os.getppid()})")


def adopt_orphans(on: bool) -> None:
    """Make this process the parent of its descendants whose own parent ends (a child
    subreaper), or stop; a JailError if the kernel refuses."""
    _prctl("pyvmm", "child subreaper", Prctl.SET_CHILD_SUBREAPER, int(on))


def close_all_but(kept: frozenset[int]) -> tuple[int, ...]:
    """Close every fd not in `kept`; the ones that were open."""
    try:
        listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        listed = []  # no /proc: they are closed all the same, just not named
    # (The fd of the listing itself is closed by now: hence _is_open.)
    leaked = tuple(sorted(fd for fd in listed if fd not in kept and _is_open(fd)))
    ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if not 0 < ceiling < 2**31:
        ceiling = 2**31 - 1
    bounds = sorted(kept)
    for low, high in zip([-1, *bounds], [*bounds, ceiling], strict=True):
        if high - low > 1:
            os.closerange(low + 1, high)
    return leaked


def single_malloc_arena(name: str) -> None:
    """Every thread allocates from glibc's main arena from now on (step 10)."""
    if _libc.mallopt(M_ARENA_MAX, 1) != 1:  # 1: done
        raise JailError(name, "malloc arenas", "mallopt(M_ARENA_MAX, 1) refused")


def _run_as(spec: JailSpec) -> None:
    if spec.run_as is None or spec.run_as == (os.geteuid(), os.getegid()):
        return
    uid, gid = spec.run_as
    if os.geteuid() != 0:
        raise JailError(spec.name, "run as", f"only root can become uid {uid} gid {gid}")
    # Without it the capabilities go with uid 0, and a host without user namespaces for this
    # process still needs them for the mount namespace.
    _prctl(spec.name, "securebits", Prctl.SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP)
    with _step(spec.name, "run as"):
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)


def _unshare_user(name: str, uid: int, gid: int) -> str:
    """A user namespace with uid and gid 0 mapped to the host's `uid` and `gid`; "" or, when
    the host refuses one, why."""
    if _libc.unshare(Clone.NEWUSER) == -1:
        err = _ffi.errno
        if err in USER_NAMESPACE_REFUSED:
            return os.strerror(err)
        raise JailError(name, "user namespace", os.strerror(err))
    # A change of uid (run_as) made the process undumpable, which hands its /proc files to the
    # host's root, out of this namespace's reach: dumpable just for the writes.
    undumpable = _prctl(name, "dumpable", Prctl.GET_DUMPABLE) == 0
    if undumpable:
        _prctl(name, "dumpable", Prctl.SET_DUMPABLE, 1)
    # setgroups must be denied before an unprivileged process may write gid_map.
    for file, text in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {gid} 1")):
        with _step(name, file):
            fd = os.open(f"/proc/self/{file}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    if undumpable:
        _prctl(name, "dumpable", Prctl.SET_DUMPABLE, 0)
    return ""


def _empty_root(name: str) -> None:
    null = _ffi.NULL
    # Else the mounts below would propagate back to the host's mount namespace.
    mount_private = MountFlag.REC | MountFlag.PRIVATE
    _check(name, "private mounts", _libc.mount(null, b"/", null, mount_private, null))
    _check(name, "mount tmpfs", _libc.mount(b"tmpfs", b"/", b"tmpfs", ROOT_FLAGS, ROOT_OPTIONS))
    with _step(name, "enter tmpfs"):
        # The process's root is still the old root, under the tmpfs now: "/" names it, and ".."
        # from it is where the walk crosses into the mount on top.
        os.chdir("/..")
        if os.stat(".").st_dev == os.stat("/").st_dev:
            raise JailError(name, "enter tmpfs", "/.. did not reach the tmpfs mounted on /")
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise JailError(name, "pivot_root", f"no syscall number known for {os.uname().machine}")
    # pivot_root(".", "."): the old root ends up mounted on top of the new one, at ".", from
    # where it is detached; no directory to put it in is needed.
    here = _ffi.new("char[]", b".")
    _check(name, "pivot_root", _libc.syscall(number, here, here))
    _check(name, "detach old root", _libc.umount2(b".", MNT_DETACH))
    with _step(name, "chdir /"):
        os.chdir("/")


def _load_libcap(name: str) -> Any:
    try:
        return _ffi.dlopen(LIBCAP)
    except OSError as e:
        raise JailError(name, "capabilities", f"cannot load {LIBCAP}: {e}") from None


def _drop_capabilities(name: str, cap: Any) -> None:
    _check(name, "ambient capabilities", cap.cap_reset_ambient())
    # Lowering the bounding set takes CAP_SETPCAP: before the process's own sets are emptied.
    for value in range(cap.cap_max_bits()):
        _check(name, f"bounding set (capability {value})", cap.cap_drop_bound(value))
    empty = cap.cap_init()
    if empty == _ffi.NULL:
        raise JailError(name, "capabilities", os.strerror(_ffi.errno))
    try:
        _check(name, "capabilities", cap.cap_clear(empty))
        _check(name, "capabilities", cap.cap_set_proc(empty))
    finally:
        cap.cap_free(empty)


def _fork_into_pid_namespace(name: str) -> None:
    """Fork; only the child, PID 1 of the new PID namespace, returns."""
    with _step(name, "fork"):
        alive_r, alive_w = os.pipe()
        child = os.fork()
    if child:
        _wait_and_pass_on(name, child, keep=alive_w)
    os.close(alive_w)
    _prctl(name, "parent death signal", Prctl.SET_PDEATHSIG, signal.SIGKILL)
    # The parent is outside the namespace, so getppid() is 0 whether it is alive or not; its
    # end of the pipe is open as long as it is.
    os.set_blocking(alive_r, False)
    try:
        gone = os.read(alive_r, 1) == b""
    except BlockingIOError:
        gone = False
    os.close(alive_r)
    if gone:
        raise JailError(name, "parent", "the process that forked into the PID namespace is gone")


def _wait_and_pass_on(name: str, child: int, keep: int) -> NoReturn:
    """Wait for `child` and exit as it did: with its exit code, or killed by its signal."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # die of it (and the child with us)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        close_all_but(frozenset({0, 1, 2, keep}))  # the device's fds are the child's alone
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            sig = -code
            code = 128 + sig
            with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(2, f"{name}: jail: waiting for PID 1: {e}\n".encode())
    finally:
        os._exit(code)


def _fill_fd_holes(name: str, kept: frozenset[int]) -> tuple[int, ...]:
    """Make every fd below the highest kept one open, so that RLIMIT_NOFILE just above it
    leaves no number for a new fd; the holes filled."""
    with _step(name, "fill fd holes"):
        holes = tuple(fd for fd in range(max(kept)) if not _is_open(fd))
        if holes:
            # An O_PATH fd on the empty root: it reads, writes and reaches nothing. It takes
            # the lowest free number, the first hole.
            inert = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            for fd in holes:
                if fd != inert:
                    os.dup2(inert, fd, inheritable=False)
    return holes
