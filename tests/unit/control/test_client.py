"""send_command's errors against fake servers, and the stop/suspend/resume CLI end to end."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.control.client import reply_error_message, send_command
from pyvmm.control.protocol import (
    BadReplyError,
    ConnectionLostError,
    ControlTimeoutError,
    NoSuchSocketError,
    NotASocketError,
    SocketPermissionError,
    StaleSocketError,
)
from pyvmm.control.server import ControlServer
from tests.unit.control.conftest import FakeHandler

IO_TIMEOUT = 5.0
SHORT_TIMEOUT = 0.3

Behaviour = Callable[[socket.socket], object]


@pytest.fixture
def fake_server(path: str) -> Iterator[Callable[[Behaviour], None]]:
    """Serve one connection at `path` with a given behaviour."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    threads: list[threading.Thread] = []

    def serve(behaviour: Behaviour) -> None:
        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(IO_TIMEOUT)
                behaviour(conn)

        t = threading.Thread(target=run, daemon=True)
        threads.append(t)
        t.start()

    yield serve
    for t in threads:
        t.join(IO_TIMEOUT)
    listener.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def replying(reply: bytes) -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(reply)

    return behaviour


# send_command


def test_sends_one_json_line(fake_server: Callable[[Behaviour], None], path: str) -> None:
    got: list[bytes] = []

    def behaviour(conn: socket.socket) -> None:
        got.append(read_request(conn))
        conn.sendall(b'{"ok": true, "state": "running"}\n')

    fake_server(behaviour)
    assert send_command(path, {"cmd": "status"}) == {"ok": True, "state": "running"}
    assert got == [b'{"cmd":"status"}\n']


def test_no_such_socket(path: str) -> None:
    with pytest.raises(NoSuchSocketError) as info:
        send_command(path, {"cmd": "stop"})
    assert str(info.value) == f"{path}: no such socket (is the VM running?)"


def test_stale_socket(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    with pytest.raises(StaleSocketError) as info:
        send_command(path, {"cmd": "stop"})
    assert str(info.value) == f"{path}: no VM is listening (stale socket)"


def test_not_a_socket(path: str) -> None:
    Path(path).write_text("")
    with pytest.raises(NotASocketError, match=f"^{re.escape(path)}: not a socket$"):
        send_command(path, {"cmd": "stop"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(fake_server: Callable[[Behaviour], None], path: str) -> None:
    os.chmod(path, 0o000)
    with pytest.raises(SocketPermissionError, match=f"^{re.escape(path)}: permission denied$"):
        send_command(path, {"cmd": "stop"})
    os.chmod(path, 0o600)
    fake_server(replying(b'{"ok": true}\n'))  # release the fixture's accept
    send_command(path, {"cmd": "stop"})


def test_timeout_when_nobody_accepts(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)  # connect succeeds into the backlog; nothing ever answers
        with pytest.raises(
            ControlTimeoutError, match=f"^{re.escape(path)}: no reply from the VM within"
        ):
            send_command(path, {"cmd": "stop"}, timeout=SHORT_TIMEOUT)


@contextlib.contextmanager
def full_accept_queue(path: str) -> Iterator[socket.socket]:
    """A listener at `path` whose accept queue is full: one connection waits in it."""
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as queued:
        listener.bind(path)
        listener.listen(0)  # room for one waiting connection
        queued.connect(path)
        yield listener


def test_waits_while_the_accept_queue_is_full(path: str) -> None:
    with full_accept_queue(path) as listener:

        def busy_vm() -> None:
            time.sleep(0.2)  # let the client find the queue full
            listener.settimeout(IO_TIMEOUT)
            listener.accept()[0].close()  # the connection that filled the queue
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(IO_TIMEOUT)
                replying(b'{"ok": true}\n')(conn)

        vm = threading.Thread(target=busy_vm)
        vm.start()
        assert send_command(path, {"cmd": "stop"}, timeout=IO_TIMEOUT) == {"ok": True}
        vm.join(IO_TIMEOUT)


def test_timeout_when_the_accept_queue_stays_full(path: str) -> None:
    with full_accept_queue(path), pytest.raises(ControlTimeoutError) as info:
        send_command(path, {"cmd": "stop"}, timeout=SHORT_TIMEOUT)
    assert str(info.value) == f"{path}: timed out after {SHORT_TIMEOUT:g} s connecting to the VM"


def test_timeout_when_the_reply_is_never_finished(
    fake_server: Callable[[Behaviour], None], path: str
) -> None:
    done = threading.Event()

    def behaviour(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b'{"ok": ')
        done.wait(IO_TIMEOUT)

    fake_server(behaviour)
    with pytest.raises(ControlTimeoutError):
        send_command(path, {"cmd": "stop"}, timeout=SHORT_TIMEOUT)
    done.set()


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\n",
        b"\xff\xfe\n",
        b"[true]\n",
        b"{}\n",
        b'{"ok": "yes"}\n',
        b'{"ok": 1}\n',
        b'{"ok": false}\n',
        b'{"ok": false, "error": 3}\n',
    ],
)
def test_garbage_reply(fake_server: Callable[[Behaviour], None], path: str, reply: bytes) -> None:
    fake_server(replying(reply))
    with pytest.raises(BadReplyError, match=f"^{re.escape(path)}: malformed reply from the VM$"):
        send_command(path, {"cmd": "stop"})


def test_reply_without_newline(fake_server: Callable[[Behaviour], None], path: str) -> None:
    fake_server(replying(b'{"ok": true}'))
    with pytest.raises(BadReplyError, match="no newline"):
        send_command(path, {"cmd": "stop"})


def test_endless_reply(fake_server: Callable[[Behaviour], None], path: str) -> None:
    def behaviour(conn: socket.socket) -> None:
        read_request(conn)
        with contextlib.suppress(OSError):  # the client gives up reading
            conn.sendall(b"x" * (4 << 20))

    fake_server(behaviour)
    with pytest.raises(BadReplyError, match="longer than"):
        send_command(path, {"cmd": "stop"})


def test_closed_without_reply(fake_server: Callable[[Behaviour], None], path: str) -> None:
    fake_server(read_request)
    with pytest.raises(ConnectionLostError, match="closed the connection without replying"):
        send_command(path, {"cmd": "stop"})


def test_reply_sent_before_reading_the_request_is_returned(
    fake_server: Callable[[Behaviour], None], path: str
) -> None:
    # What a refused peer sees: the reply arrives and the connection closes at once.
    fake_server(lambda conn: conn.sendall(b'{"ok": false, "error": "permission denied"}\n'))
    assert send_command(path, {"cmd": "stop", "pad": "x" * (1 << 20)}) == {
        "ok": False,
        "error": "permission denied",
    }


# reply_error_message


def test_reply_error_message_names_the_socket_on_one_line(path: str) -> None:
    assert reply_error_message(path, {"ok": False, "error": "not suspended\nreally"}) == (
        f"{path}: not suspended\\nreally"
    )


def test_a_refusal_reads_as_an_error_about_the_socket(path: str, handler: FakeHandler) -> None:
    gate = handler.gate("suspend")
    with ControlServer(path, handler, max_connections=1), socket.socket(socket.AF_UNIX) as busy:
        busy.connect(path)
        busy.sendall(b'{"cmd": "suspend"}\n')
        assert gate.entered.wait(IO_TIMEOUT)
        reply = send_command(path, {"cmd": "stop"})
        gate.release.set()
    assert reply_error_message(path, reply) == f"{path}: too many connections"


# The CLI


@pytest.mark.parametrize("cmd", ["stop", "suspend", "resume"])
def test_cli_command_succeeds_silently(
    server: ControlServer, handler: FakeHandler, capsys: pytest.CaptureFixture[str], cmd: str
) -> None:
    assert cli.main([cmd, server.path]) == 0
    assert capsys.readouterr() == ("", "")
    assert handler.calls == [cmd]


def test_cli_error_reply(
    server: ControlServer, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    handler.failures["resume"] = RuntimeError("not suspended\nreally")
    assert cli.main(["resume", server.path]) == cli.EXIT_FAILURE
    assert capsys.readouterr() == ("", f"pyvmm: {server.path}: not suspended\\nreally\n")


def test_cli_no_such_socket(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stop", path]) == cli.EXIT_FAILURE
    assert capsys.readouterr() == ("", f"pyvmm: {path}: no such socket (is the VM running?)\n")


def test_cli_stale_socket(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    assert cli.main(["suspend", path]) == cli.EXIT_FAILURE
    assert capsys.readouterr() == ("", f"pyvmm: {path}: no VM is listening (stale socket)\n")


def test_cli_needs_a_socket(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["stop"])
    assert info.value.code == cli.EXIT_USAGE
    assert "SOCKET" in capsys.readouterr().err


def test_cli_run_socket_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    parser = cli.build_parser()
    assert parser.parse_args(["run", str(kernel)]).socket is None
    args = parser.parse_args(["run", str(kernel), "-s", str(tmp_path)])
    config = cli.config_from_args(args)
    assert config.socket == str(tmp_path / f"pyvmm-{os.getpid()}.sock")
    args = parser.parse_args(["run", str(kernel), "--socket", str(tmp_path / "vm.sock")])
    assert cli.config_from_args(args).socket == str(tmp_path / "vm.sock")


def test_cli_run_socket_in_use(
    server: ControlServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    assert cli.main(["run", str(kernel), "-s", server.path]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == (
        f"pyvmm: -s/--socket {server.path}: another VM is listening there\n"
    )
