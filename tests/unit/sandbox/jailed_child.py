"""A device process stand-in for the jail's tests: it enters the jail its arguments describe,
tries what a jailed device must not be able to do (and what it must), and reports it as one JSON
line on the fd it was given; then it waits for a "g" on another before it exits.

Everything it uses is imported before the jail: nothing can be imported inside.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.sandbox.jail import JailError, JailSpec, enter_jail


def attempt(action: Callable[[], object]) -> str:
    """Whether `action` worked: "ok", else the errno's name or the exception's type."""
    try:
        action()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    except Exception as e:
        return type(e).__name__
    return "ok"


def fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def start_thread() -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()


def main() -> int:
    args: dict[str, Any] = json.loads(sys.argv[1])
    spec = JailSpec(
        name=args["name"],
        parent_pid=args["parent"],
        keep_fds=tuple(args["keep"]),
        run_as=tuple(args["run_as"]) if args["run_as"] else None,
        user_namespace=args["user_namespace"],
    )
    try:
        report = enter_jail(spec)
    except JailError as e:
        print(e, file=sys.stderr)
        return 1
    facts: dict[str, Any] = {
        "report": dataclasses.asdict(report),
        "pid": os.getpid(),
        "uid": os.getuid(),
        "fork": attempt(fork),
        "thread": attempt(start_thread),
        "pipe": attempt(os.pipe),
        "eventfd": attempt(lambda: os.eventfd(0)),
        "socketpair": attempt(socket.socketpair),
        "open /": attempt(lambda: os.open("/", os.O_RDONLY)),
        "write kept fd": attempt(lambda: os.write(args["file"], b"written in the jail")),
    }
    os.close(args["spare"])  # one free fd number: what listing a directory takes
    try:
        facts["listdir /"] = os.listdir("/")
    except OSError as e:
        facts["listdir /"] = errno.errorcode.get(e.errno or 0, str(e))
    facts["create /x"] = attempt(lambda: os.open("/x", os.O_WRONLY | os.O_CREAT, 0o600))
    os.write(args["report"], json.dumps(facts).encode() + b"\n")
    if os.read(args["go"], 1) != b"g":
        # The test process is gone without a word: only the parent death signal ends this.
        signal.pause()
    return int(args["exit"])


if __name__ == "__main__":
    sys.exit(main())
