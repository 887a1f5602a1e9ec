"""Seccomp filters for device processes: a policy file (`policy.py`) compiled with libseccomp.

libseccomp (libseccomp.so.2, through cffi) turns the rules into BPF for this machine's
architecture; other architectures' system call conventions (x86's 32-bit `int 0x80`, say) are
killed outright. A call the policy does not allow kills the whole process (SECCOMP_RET_KILL_
PROCESS), or, with `log_failures`, waits while the VMM, which holds the filter's listener fd
(SECCOMP_RET_USER_NOTIF), logs the call by name and lets it go on (`watch_denials`).

Policies live in `seccomp/<arch>/<device>.policy` at the top of the tree, and in
`<prefix>/share/pyvmm/seccomp/<arch>/` where pyvmm is installed without its tree (the container
image); `--seccomp-policy-dir` names another folder (`policy_dir()`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import select
import signal
import socket
import sys
import termios
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.cdecl import declare
from pyvmm.ratelimit import GuestLog
from pyvmm.sandbox.policy import Op, Policy, PolicyError, Rule, load_policy

log = logging.getLogger(__name__)

_ffi: Any = declare(
    "seccomp",
    """
    typedef void *scmp_filter_ctx;
    struct scmp_arg_cmp {
        unsigned int arg;
        int op;
        uint64_t datum_a;
        uint64_t datum_b;
    };
    scmp_filter_ctx seccomp_init(uint32_t def_action);
    void seccomp_release(scmp_filter_ctx ctx);
    int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint64_t value);
    int seccomp_syscall_resolve_name(const char *name);
    uint32_t seccomp_arch_resolve_name(const char *arch_name);
    int seccomp_syscall_resolve_name_arch(uint32_t arch_token, const char *name);
    int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                               unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
    int seccomp_load(const scmp_filter_ctx ctx);

    struct seccomp_data {
        int nr;
        uint32_t arch;
        uint64_t instruction_pointer;
        uint64_t args[6];
    };
    struct seccomp_notif {
        uint64_t id;
        uint32_t pid;
        uint32_t flags;
        struct seccomp_data data;
    };
    struct seccomp_notif_resp {
        uint64_t id;
        int64_t val;
        int32_t error;
        uint32_t flags;
    };
    int seccomp_notify_fd(const scmp_filter_ctx ctx);
    int seccomp_notify_alloc(struct seccomp_notif **req, struct seccomp_notif_resp **resp);
    void seccomp_notify_free(struct seccomp_notif *req, struct seccomp_notif_resp *resp);
    int seccomp_notify_receive(int fd, struct seccomp_notif *req);
    int seccomp_notify_respond(int fd, struct seccomp_notif_resp *resp);
    char *seccomp_syscall_resolve_num_arch(uint32_t arch_token, int num);
    void free(void *ptr);
    """,
)

LIBRARY = "libseccomp.so.2"
# From <seccomp.h> (checked against it in tests/unit/sandbox/test_seccomp.py).
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ERRNO_BASE = 0x00050000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_ARCH_NATIVE = 0
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1  # <linux/seccomp.h>: let the call go on as made
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3
CMP_OPS = {Op.NE: 1, Op.LT: 2, Op.LE: 3, Op.EQ: 4, Op.GE: 5, Op.GT: 6}
SCMP_CMP_MASKED_EQ = 7
U64_MASK = (1 << 64) - 1

# Constants policies may name that Python's standard library does not export, as in the kernel
# headers (checked against them in tests/unit/sandbox/test_seccomp.py).
EXTRA_CONSTANTS = {
    "AT_FDCWD": -100,
    "AT_EMPTY_PATH": 0x1000,
    "FUTEX_WAIT": 0,
    "FUTEX_WAKE": 1,
    "FUTEX_REQUEUE": 3,
    "FUTEX_CMP_REQUEUE": 4,
    "FUTEX_WAKE_OP": 5,
    "FUTEX_WAIT_BITSET": 9,
    "FUTEX_WAKE_BITSET": 10,
    "FUTEX_PRIVATE_FLAG": 128,
    "FUTEX_CLOCK_REALTIME": 256,
    "CLONE_VM": 0x100,
    "CLONE_FS": 0x200,
    "CLONE_FILES": 0x400,
    "CLONE_SIGHAND": 0x800,
    "CLONE_THREAD": 0x10000,
    "CLONE_SYSVSEM": 0x40000,
    "CLONE_SETTLS": 0x80000,
    "CLONE_PARENT_SETTID": 0x100000,
    "CLONE_CHILD_CLEARTID": 0x200000,
    "FALLOC_FL_KEEP_SIZE": 0x01,
    "FALLOC_FL_PUNCH_HOLE": 0x02,
    "FALLOC_FL_ZERO_RANGE": 0x10,
    "PR_SET_PDEATHSIG": 1,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_SET_NO_NEW_PRIVS": 38,
    # virtio-net sets the TAP's offloads and header size when the driver starts the device.
    "TUNSETOFFLOAD": 0x400454D0,
    "TUNSETVNETHDRSZ": 0x400454D8,
    # vhost-net's set-up when the driver starts the device (<linux/vhost.h>).
    "VHOST_SET_OWNER": 0xAF01,
    "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_SET_MEM_TABLE": 0x4008AF03,
    "VHOST_SET_VRING_NUM": 0x4008AF10,
    "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20,
    "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_NET_SET_BACKEND": 0x4008AF30,
    "VHOST_VSOCK_SET_RUNNING": 0x4004AF61,
}
# Prefixes of the names taken from the standard library's modules (their values are this
# machine's, as the C library's headers have them).
_STDLIB_SOURCES: list[tuple[Any, tuple[str, ...]]] = [
    (os, ("O_", "EFD_", "MFD_", "GRND_", "SEEK_", "RWF_", "POSIX_FADV_", "F_OK", "R_OK", "W_OK")),
    (fcntl, ("F_", "LOCK_")),
    (mmap, ("PROT_", "MAP_", "MADV_")),
    (socket, ("AF_", "SOCK_", "MSG_", "SOL_", "SO_", "SCM_", "SHUT_")),
    (select, ("EPOLL",)),
    (termios, ("FIO", "TCGETS", "TCSETS", "TIOCGWINSZ")),
    (signal, ("SIG",)),
]


class SeccompError(Exception):
    """A policy that cannot be compiled or installed; one line naming the file."""


def constant(name: str) -> int | None:
    """The value of a constant a policy names, or None if pyvmm does not know it."""
    if name in EXTRA_CONSTANTS:
        return EXTRA_CONSTANTS[name]
    for module, prefixes in _STDLIB_SOURCES:
        if name.startswith(prefixes):
            value = getattr(module, name, None)
            if isinstance(value, int):
                return int(value)
    return None


def errno_value(name: str) -> int | None:
    value = getattr(errno, name, None)
    return value if isinstance(value, int) and name.startswith("E") else None


def policy_dir(override: str | None = None) -> Path:
    """The folder of this machine's policies: `override`, else seccomp/<arch>/ in pyvmm's
    tree, else the installed copy; a SeccompError says where it looked."""
    if override is not None:
        if not Path(override).is_dir():
            raise SeccompError(f"--seccomp-policy-dir {override}: not a directory")
        return Path(override)
    machine = os.uname().machine
    places = [
        Path(__file__).resolve().parents[2] / "seccomp" / machine,
        Path(sys.prefix) / "share" / "pyvmm" / "seccomp" / machine,
    ]
    for place in places:
        if place.is_dir():
            return place
    raise SeccompError(
        f"no seccomp policies for {machine} in {' or '.join(map(str, places))}; "
        "give --seccomp-policy-dir, or --disable-sandbox"
    )


def read_policy(directory: Path, device: str) -> Policy:
    """`<directory>/<device>.policy`, parsed; a PolicyError names file and line."""
    return load_policy(directory / f"{device}.policy", constant, errno_value)


@dataclass
class Filter:
    """A compiled filter, ready to install in this process."""

    ctx: Any
    where: str  # the policy file, for errors

    def install(self) -> None:
        """Install the filter in the calling process (and every thread it starts later). It
        sets no_new_privs, as the kernel requires; do this last, after the jail."""
        rc = _lib().seccomp_load(self.ctx)
        if rc < 0:
            raise SeccompError(f"{self.where}: cannot install the filter: {os.strerror(-rc)}")

    def listener(self) -> int:
        """After `install` with `log_failures`: the fd the calls outside the policy are
        reported on (hand it to `watch_denials`, in the VMM)."""
        fd = _lib().seccomp_notify_fd(self.ctx)
        if fd < 0:
            raise SeccompError(f"{self.where}: the filter has no listener: {os.strerror(-fd)}")
        return int(fd)

    def close(self) -> None:
        if self.ctx is not None:
            _lib().seccomp_release(self.ctx)
            self.ctx = None


_loaded: Any = None


def _lib() -> Any:
    global _loaded
    if _loaded is None:
        try:
            _loaded = _ffi.dlopen(LIBRARY)
        except OSError as exc:
            raise SeccompError(
                f"cannot load {LIBRARY} (install libseccomp2): {str(exc).splitlines()[0]}"
            ) from None
    return _loaded


def syscall_number(name: str, arch: str) -> int | None:
    """The number of system call `name` on `arch` ("x86_64", "aarch64"), None if it has none."""
    lib = _lib()
    token = lib.seccomp_arch_resolve_name(arch.encode())
    if token == 0:
        raise SeccompError(f"libseccomp does not know the architecture {arch}")
    number = lib.seccomp_syscall_resolve_name_arch(token, name.encode())
    return None if number < 0 else int(number)


def compile_policy(policy: Policy, where: str, log_failures: bool = False) -> Filter:
    """Compile `policy` (read from `where`) for this machine: calls it does not allow kill the
    process, or with `log_failures` go to the filter's listener (`watch_denials`)."""
    lib = _lib()
    default = SCMP_ACT_NOTIFY if log_failures else SCMP_ACT_KILL_PROCESS
    ctx = lib.seccomp_init(default)
    if ctx == _ffi.NULL:
        raise SeccompError(f"{where}: libseccomp could not start a filter")
    compiled = Filter(ctx, where)
    try:
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS), where)
        for rule in policy.rules.values():
            _add_rule(lib, ctx, rule, default)
    except BaseException:
        compiled.close()
        raise
    return compiled


def load_filter(directory: Path, device: str, log_failures: bool = False) -> Filter:
    """Read and compile `<directory>/<device>.policy`; errors name the file (and line)."""
    try:
        policy = read_policy(directory, device)
    except PolicyError as exc:
        raise SeccompError(str(exc)) from None
    return compile_policy(policy, str(directory / f"{device}.policy"), log_failures)


def _add_rule(lib: Any, ctx: Any, rule: Rule, default: int) -> None:
    number = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
    if number < 0:
        raise SeccompError(f"{rule.where}: {rule.syscall} is not a system call on this machine")
    if rule.allowed_when is None:
        _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, _ffi.NULL), rule.where)
        return
    for conjunction in rule.allowed_when:
        args = _ffi.new("struct scmp_arg_cmp[]", len(conjunction))
        for slot, comparison in zip(args, conjunction, strict=True):
            slot.arg = comparison.arg
            if comparison.op is Op.IN:  # no bit outside the mask: (arg & ~mask) == 0
                slot.op = SCMP_CMP_MASKED_EQ
                slot.datum_a = ~comparison.value & U64_MASK
                slot.datum_b = 0
            else:
                slot.op = CMP_OPS[comparison.op]
                slot.datum_a = comparison.value
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, len(conjunction), args)
        _check(rc, rule.where)
    if rule.errno_otherwise is not None:
        # libseccomp tries a call's argument rules before its catch-all, so this one answers
        # only the calls no alternative allowed.
        action = SCMP_ACT_ERRNO_BASE | (rule.errno_otherwise & 0xFFFF)
        _check(lib.seccomp_rule_add_array(ctx, action, number, 0, _ffi.NULL), rule.where)


def watch_denials(listener: int, device: str, where: str) -> threading.Thread:
    """Serve a device process's filter listener (`Filter.listener`) in a thread: log each call
    outside its policy, by name, and let it go on. The thread ends, closing `listener`, when the
    process has ended."""
    lib = _lib()
    guest_log = GuestLog(log, device)

    def serve() -> None:
        requests = _ffi.new("struct seccomp_notif **")
        responses = _ffi.new("struct seccomp_notif_resp **")
        if lib.seccomp_notify_alloc(requests, responses) < 0:
            log.error("%s: cannot serve seccomp notifications", device)
            os.close(listener)
            return
        request, response = requests[0], responses[0]
        request_size = _ffi.sizeof("struct seccomp_notif")
        waiting = select.poll()
        waiting.register(listener, select.POLLIN)
        try:
            while True:
                events = dict(waiting.poll())
                if not events.get(listener, 0) & select.POLLIN:
                    return  # POLLHUP: the process and its filter are gone
                # The kernel takes only a zeroed request (EINVAL otherwise).
                _ffi.memmove(request, bytes(request_size), request_size)
                # A receive fails when the caller was interrupted or died meanwhile: wait again.
                if lib.seccomp_notify_receive(listener, request) != 0:
                    continue
                call = _syscall_name(lib, request.data.nr)
                guest_log.warning(  # a few times a minute for each call, the rest counted
                    call, "seccomp: %s is not in %s; allowed (--seccomp-log-failures)", call, where
                )
                response.id = request.id
                response.val = 0
                response.error = 0
                response.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE
                lib.seccomp_notify_respond(listener, response)  # fails only if it has died
        finally:
            lib.seccomp_notify_free(request, response)
            os.close(listener)

    thread = threading.Thread(target=serve, name=f"seccomp {device}", daemon=True)
    thread.start()
    return thread


def _syscall_name(lib: Any, number: int) -> str:
    name = lib.seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, number)
    if name == _ffi.NULL:
        return f"system call {number}"
    try:
        return f"{_ffi.string(name).decode()} ({number})"
    finally:
        lib.free(name)


def _check(rc: int, where: str) -> None:
    if rc < 0:
        raise SeccompError(f"{where}: libseccomp refused the rule: {os.strerror(-rc)}")
