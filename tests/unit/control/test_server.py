"""ControlServer over real Unix sockets, and the -s/--socket checks in config."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyvmm.config import ConfigError, VmConfig, check_socket_path
from pyvmm.control import server as server_module
from pyvmm.control.client import send_command
from pyvmm.control.protocol import MAX_REQUEST_BYTES
from pyvmm.control.server import (
    ControlServer,
    PeerCredentials,
    peer_allowed,
    peer_credentials,
)
from pyvmm.unix_listener import SocketBindError, SocketInUseError
from tests.unit.control.conftest import FakeHandler, connect

IO_TIMEOUT = 5.0
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY_UID = 65534


class LineReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes | None:
        """The next line, or None at end of stream."""
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def reply(self) -> dict[str, Any]:
        line = self.line()
        assert line is not None, "connection closed instead of a reply"
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply


def request(sock: socket.socket, data: bytes) -> dict[str, Any]:
    sock.sendall(data)
    return LineReader(sock).reply()


def wait_until_closed(sock: socket.socket) -> bytes:
    """Everything the server still sends, until it closes the connection."""
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


# Round trips


@pytest.mark.parametrize("cmd", ["stop", "suspend", "resume"])
def test_each_command(server: ControlServer, handler: FakeHandler, cmd: str) -> None:
    assert send_command(server.path, {"cmd": cmd}) == {"ok": True}
    assert handler.calls == [cmd]


def test_commands_are_handled_in_order_on_one_connection(
    server: ControlServer, handler: FakeHandler
) -> None:
    with connect(server.path) as sock:
        sock.sendall(b'{"cmd": "suspend"}\n{"cmd": "resume"}\n{"cmd":"stop"}\n')
        reader = LineReader(sock)
        assert [reader.reply() for _ in range(3)] == [{"ok": True}] * 3
    assert handler.calls == ["suspend", "resume", "stop"]


def test_handler_exception_becomes_an_error_reply(
    server: ControlServer, handler: FakeHandler
) -> None:
    handler.failures["suspend"] = RuntimeError("already suspended")
    handler.failures["resume"] = ValueError()
    with connect(server.path) as sock:
        reader = LineReader(sock)
        sock.sendall(b'{"cmd": "suspend"}\n')
        assert reader.reply() == {"ok": False, "error": "already suspended"}
        sock.sendall(b'{"cmd": "resume"}\n')
        assert reader.reply() == {"ok": False, "error": "ValueError"}
        sock.sendall(b'{"cmd": "stop"}\n')
        assert reader.reply() == {"ok": True}


def test_unknown_command(server: ControlServer, handler: FakeHandler) -> None:
    assert send_command(server.path, {"cmd": "x"}) == {
        "ok": False,
        "error": "unknown command 'x'",
    }
    long = send_command(server.path, {"cmd": "y" * 10000 + "\n"})
    assert long["ok"] is False
    assert len(long["error"]) < 100
    assert handler.calls == []


def test_extra_request_fields_are_ignored(server: ControlServer, handler: FakeHandler) -> None:
    assert send_command(server.path, {"cmd": "stop", "why": "test"}) == {"ok": True}
    assert handler.calls == ["stop"]


# Malformed and hostile requests


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"stop", "not JSON"),
        (b"{'cmd': 'stop'}", "not JSON"),
        (b"", "empty line"),
        (b"   \r", "empty line"),
        (b'["stop"]', "not a JSON object"),
        (b'"stop"', "not a JSON object"),
        (b"{}", "no 'cmd'"),
        (b'{"command": "stop"}', "no 'cmd'"),
        (b'{"cmd": 1}', "'cmd' is not a string"),
        (b'{"cmd": null}', "'cmd' is not a string"),
        (b'{"cmd": ["stop"]}', "'cmd' is not a string"),
        (b"\xff\xfe\x00\x01", "not UTF-8"),
        (b'{"cmd": "\xc3"}', "not UTF-8"),
        (b"[" * 60000, "not JSON"),
        (b'{"cmd": "stop"', "not JSON"),
        (b"1" * 5000, "not JSON"),
    ],
)
def test_malformed_request_gets_an_error_and_the_connection_stays_usable(
    server: ControlServer, handler: FakeHandler, data: bytes, error: str
) -> None:
    with connect(server.path) as sock:
        reader = LineReader(sock)
        sock.sendall(data + b"\n")
        assert reader.reply() == {"ok": False, "error": f"malformed request: {error}"}
        sock.sendall(b'{"cmd": "stop"}\n')
        assert reader.reply() == {"ok": True}
    assert handler.calls == ["stop"]


@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_oversized_request_gets_an_error_and_is_closed(
    server: ControlServer, handler: FakeHandler, newline: bytes
) -> None:
    with connect(server.path) as sock:
        # The server may close while we are still sending; its reply is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'{"cmd": "stop", "pad": "' + b"x" * (MAX_REQUEST_BYTES + 10) + newline)
        reader = LineReader(sock)
        assert reader.reply() == {
            "ok": False,
            "error": f"request longer than {MAX_REQUEST_BYTES} bytes",
        }
        assert reader.line() is None
    assert handler.calls == []
    assert send_command(server.path, {"cmd": "resume"}) == {"ok": True}


def test_request_of_exactly_the_limit_is_accepted(server: ControlServer) -> None:
    prefix = b'{"cmd": "stop", "pad": "'
    pad = MAX_REQUEST_BYTES - len(prefix) - len(b'"}')
    with connect(server.path) as sock:
        assert request(sock, prefix + b"x" * pad + b'"}\n') == {"ok": True}


def test_binary_garbage_gets_one_error_per_line(
    server: ControlServer, handler: FakeHandler
) -> None:
    garbage = os.urandom(20000) + b"\n"
    with connect(server.path) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        replies = wait_until_closed(sock).splitlines()
    assert len(replies) == garbage.count(b"\n")
    for line in replies:
        reply = json.loads(line)
        assert reply["ok"] is False
        assert reply["error"].startswith("malformed request")
    assert handler.calls == []
    assert send_command(server.path, {"cmd": "stop"}) == {"ok": True}


def test_client_that_hangs_up_mid_line_is_harmless(
    server: ControlServer, handler: FakeHandler
) -> None:
    with connect(server.path) as sock:
        sock.sendall(b'{"cmd": "st')
    with connect(server.path) as sock:
        sock.sendall(b'{"cmd": "suspend"}\n')
        sock.close()  # without reading the reply
    time.sleep(0.1)
    assert send_command(server.path, {"cmd": "stop"}) == {"ok": True}
    assert handler.calls[-1] == "stop"


def test_many_concurrent_clients(server: ControlServer, handler: FakeHandler) -> None:
    clients = 40
    replies: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            start.wait()
            replies.append(send_command(server.path, {"cmd": ("suspend", "resume")[i % 2]}))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT * 2)
    assert errors == []
    assert replies == [{"ok": True}] * clients
    assert sorted(handler.calls) == ["resume"] * (clients // 2) + ["suspend"] * (clients // 2)


def test_silent_client_does_not_block_another(server: ControlServer) -> None:
    with connect(server.path) as silent, connect(server.path) as partial:
        partial.sendall(b'{"cmd": ')
        started = time.monotonic()
        assert send_command(server.path, {"cmd": "suspend"}, timeout=2) == {"ok": True}
        assert time.monotonic() - started < 1
        assert silent.fileno() >= 0


def test_client_that_never_reads_does_not_block_others_or_close(
    server: ControlServer, handler: FakeHandler
) -> None:
    hog = connect(server.path)
    hog.settimeout(None)
    requests = b'{"cmd":"nope"}\n' * 100000  # replies far beyond the socket buffers

    def flood() -> None:
        with contextlib.suppress(OSError):  # the server gives up on us
            hog.sendall(requests)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    time.sleep(0.2)
    assert send_command(server.path, {"cmd": "resume"}, timeout=2) == {"ok": True}
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < server_module.CLOSE_GRACE + server_module.CLOSE_JOIN + 1
    hog.close()
    flooder.join(IO_TIMEOUT)
    assert handler.calls == ["resume"]


# Idle connections and the connection limit


def idle_connections(path: str, n: int) -> list[socket.socket]:
    return [connect(path) for _ in range(n)]


def is_closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock`, waiting a bounded time for it to do so."""
    try:
        return wait_until_closed(sock) == b""
    except TimeoutError:
        return False


def test_idle_connections_cannot_lock_out_a_fresh_command(
    server: ControlServer, handler: FakeHandler
) -> None:
    idle = idle_connections(server.path, server_module.MAX_CONNECTIONS + 8)
    try:
        assert send_command(server.path, {"cmd": "stop"}) == {"ok": True}
        assert handler.calls == ["stop"]
        # The longest idle made room; the newest are still served.
        assert is_closed_by_server(idle[0])
        assert request(idle[-1], b'{"cmd": "resume"}\n') == {"ok": True}
    finally:
        for sock in idle:
            sock.close()


def test_the_longest_idle_connection_makes_room(path: str, handler: FakeHandler) -> None:
    with ControlServer(path, handler, max_connections=2), connect(path) as a, connect(path) as b:
        # `a` connected first but has been idle for less time than `b`.
        assert request(b, b'{"cmd": "suspend"}\n') == {"ok": True}
        assert request(a, b'{"cmd": "resume"}\n') == {"ok": True}
        with connect(path) as c:
            assert request(c, b'{"cmd": "suspend"}\n') == {"ok": True}
            assert is_closed_by_server(b)
            assert request(a, b'{"cmd": "stop"}\n') == {"ok": True}
    assert handler.calls == ["suspend", "resume", "suspend", "stop"]


def test_a_busy_connection_is_not_evicted(path: str, handler: FakeHandler) -> None:
    gate = handler.gate("suspend")
    with (
        ControlServer(path, handler, max_connections=2),
        connect(path) as busy,
        connect(path) as idle,
    ):
        busy.sendall(b'{"cmd": "suspend"}\n')
        assert gate.entered.wait(IO_TIMEOUT)
        with connect(path) as fresh:
            assert is_closed_by_server(idle)
            gate.release.set()
            assert LineReader(busy).reply() == {"ok": True}
            assert request(fresh, b'{"cmd": "stop"}\n') == {"ok": True}
    assert handler.calls == ["suspend", "stop"]


def test_a_client_that_never_reads_its_replies_holds_no_slot(
    path: str, handler: FakeHandler
) -> None:
    with ControlServer(path, handler, max_connections=1), connect(path) as hog:
        hog.settimeout(None)

        def flood() -> None:
            with contextlib.suppress(OSError):  # the server drops us
                hog.sendall(b'{"cmd":"nope"}\n' * 100000)  # replies far beyond the buffers

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(0.2)  # let the replies fill the socket buffers
        assert send_command(path, {"cmd": "stop"}, timeout=2) == {"ok": True}
        flooder.join(IO_TIMEOUT)  # the hog was closed to make room
        assert not flooder.is_alive()
    assert handler.calls == ["stop"]


def test_a_new_connection_is_refused_only_when_every_slot_is_busy(
    path: str, handler: FakeHandler
) -> None:
    gate = handler.gate("suspend")
    with ControlServer(path, handler, max_connections=1), connect(path) as busy:
        busy.sendall(b'{"cmd": "suspend"}\n')
        assert gate.entered.wait(IO_TIMEOUT)
        with connect(path) as refused:
            assert LineReader(refused).reply() == {"ok": False, "error": "too many connections"}
            assert wait_until_closed(refused) == b""
        gate.release.set()
        reader = LineReader(busy)
        assert reader.reply() == {"ok": True}
        busy.sendall(b'{"cmd": "stop"}\n')
        assert reader.reply() == {"ok": True}
    assert handler.calls == ["suspend", "stop"]


def test_idle_connections_are_closed_after_the_idle_timeout(
    path: str, handler: FakeHandler
) -> None:
    with ControlServer(path, handler, idle_timeout=1.0):
        with connect(path) as used, connect(path) as silent, connect(path) as partial:
            assert request(used, b'{"cmd": "suspend"}\n') == {"ok": True}
            partial.sendall(b'{"cmd": "st')
            for sock in (used, silent, partial):
                assert is_closed_by_server(sock)
        assert send_command(path, {"cmd": "resume"}) == {"ok": True}
    assert handler.calls == ["suspend", "resume"]


def test_a_request_sent_byte_by_byte_cannot_outlast_the_idle_timeout(
    path: str, handler: FakeHandler
) -> None:
    slow = b'{"cmd": "stop", "pad": "' + b"x" * 100 + b'"}\n'
    closed = False
    with ControlServer(path, handler, idle_timeout=0.5), connect(path) as sock:
        for byte in slow:
            # The server closing a socket that still holds unread bytes resets it: the send or
            # the recv may see a reset rather than an orderly end.
            try:
                sock.sendall(bytes([byte]))
                readable, _, _ = select.select([sock], [], [], 0.05)
                closed = bool(readable) and sock.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
    assert closed
    assert handler.calls == []


# Peer credentials


def test_peer_allowed() -> None:
    assert peer_allowed(PeerCredentials(pid=10, uid=1000, gid=1000), server_uid=1000)
    assert peer_allowed(PeerCredentials(pid=10, uid=0, gid=0), server_uid=1000)
    assert peer_allowed(PeerCredentials(pid=10, uid=0, gid=5), server_uid=0)
    assert not peer_allowed(PeerCredentials(pid=10, uid=1001, gid=1000), server_uid=1000)
    assert not peer_allowed(PeerCredentials(pid=10, uid=1000, gid=0), server_uid=0)
    assert not peer_allowed(PeerCredentials(pid=10, uid=65534, gid=65534), server_uid=1000)


def test_peer_credentials_of_a_real_connection() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == PeerCredentials(os.getpid(), os.geteuid(), os.getegid())


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root to run a client as another user",
)
def test_other_user_is_refused(handler: FakeHandler) -> None:
    directory = tempfile.mkdtemp(prefix="pyvmm-ctl-")
    try:
        os.chmod(directory, 0o711)
        path = os.path.join(directory, "ctl.sock")
        with ControlServer(path, handler):
            os.chmod(path, 0o666)  # let the other user reach the peer-credential check
            client = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.settimeout(5)\n"
                "s.connect(sys.argv[1])\n"
                "try:\n"
                '    s.sendall(b\'{"cmd": "stop"}\\n\')\n'
                "except BrokenPipeError:\n"
                "    pass  # refused and closed already; the reply is still readable\n"
                "out = b''\n"
                "while not out.endswith(b'\\n') and (d := s.recv(4096)):\n"
                "    out += d\n"
                "sys.stdout.write(out.decode())\n"
            )
            result = subprocess.run(
                [SYSTEM_PYTHON, "-c", client, path],
                user=NOBODY_UID,
                capture_output=True,
                timeout=IO_TIMEOUT * 2,
                cwd="/",
            )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"ok": False, "error": "permission denied"}
        assert handler.calls == []
    finally:
        shutil.rmtree(directory)


# The socket file


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_socket_mode_is_0600_whatever_the_umask(
    path: str, handler: FakeHandler, umask: int
) -> None:
    old = os.umask(umask)
    try:
        srv = ControlServer(path, handler)
    finally:
        os.umask(old)
    with srv:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert send_command(path, {"cmd": "stop"}) == {"ok": True}


def test_close_unlinks_and_is_idempotent(path: str, handler: FakeHandler) -> None:
    srv = ControlServer(path, handler)
    assert os.path.exists(path)
    srv.close()
    assert not os.path.lexists(path)
    srv.close()


def test_close_leaves_a_socket_file_that_is_not_ours(path: str, handler: FakeHandler) -> None:
    srv = ControlServer(path, handler)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        srv.close()
        assert os.path.lexists(path)


def test_close_is_prompt_and_drops_idle_clients(path: str, handler: FakeHandler) -> None:
    srv = ControlServer(path, handler)
    with connect(path) as idle:
        assert request(idle, b'{"cmd": "suspend"}\n') == {"ok": True}
        started = time.monotonic()
        srv.close()
        assert time.monotonic() - started < 1
        assert wait_until_closed(idle) == b""
    with pytest.raises(FileNotFoundError):
        connect(path)


def test_stop_reply_arrives_even_when_the_vm_closes_the_server_at_once(
    path: str, handler: FakeHandler
) -> None:
    for _ in range(20):
        handler.stopped.clear()
        srv = ControlServer(path, handler)

        def vm_main(srv: ControlServer = srv) -> None:
            handler.stopped.wait(IO_TIMEOUT)
            srv.close()

        main = threading.Thread(target=vm_main)
        main.start()
        assert send_command(path, {"cmd": "stop"}) == {"ok": True}
        main.join(IO_TIMEOUT)
        assert not os.path.lexists(path)


def test_bind_replaces_a_stale_socket(path: str, handler: FakeHandler) -> None:
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    with ControlServer(path, handler):
        assert send_command(path, {"cmd": "stop"}) == {"ok": True}


def test_bind_refuses_a_live_socket(server: ControlServer, handler: FakeHandler) -> None:
    with pytest.raises(SocketInUseError, match="another VM is listening there"):
        ControlServer(server.path, handler)
    assert send_command(server.path, {"cmd": "stop"}) == {"ok": True}


def test_a_live_socket_with_a_full_accept_queue_is_not_taken(
    path: str, handler: FakeHandler
) -> None:
    with socket.socket(socket.AF_UNIX) as busy, socket.socket(socket.AF_UNIX) as queued:
        busy.bind(path)
        busy.listen(0)  # room for one waiting connection
        queued.connect(path)
        with pytest.raises(SocketInUseError, match="another VM is listening there"):
            ControlServer(path, handler)
        with pytest.raises(ConfigError, match="another VM is listening there"):
            check_socket_path(path, 1)
        assert os.path.lexists(path)


def test_bind_refuses_a_regular_file(path: str, handler: FakeHandler) -> None:
    Path(path).write_text("precious")
    with pytest.raises(SocketBindError, match="not a socket"):
        ControlServer(path, handler)
    assert Path(path).read_text() == "precious"


def test_bind_in_a_missing_directory(tmp_path: Path, handler: FakeHandler) -> None:
    path = str(tmp_path / "nowhere" / "ctl.sock")
    with pytest.raises(SocketBindError, match=f"^{re.escape(path)}: cannot create the socket"):
        ControlServer(path, handler)


# -s/--socket in config


def test_config_socket_directory_form(tmp_path: Path) -> None:
    assert check_socket_path(str(tmp_path), 1234) == str(tmp_path / "pyvmm-1234.sock")


def test_config_socket_file_form(path: str) -> None:
    assert check_socket_path(path, 1234) == path


def test_config_validate_resolves_the_socket(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    config = VmConfig(kernel=str(kernel), socket=str(tmp_path)).validate()
    assert config.socket == str(tmp_path / f"pyvmm-{os.getpid()}.sock")
    assert VmConfig(kernel=str(kernel)).validate().socket is None


def test_config_socket_parent_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere" / "ctl.sock")
    with pytest.raises(ConfigError, match=f"^-s/--socket {re.escape(path)}: no such directory"):
        check_socket_path(path, 1)


def test_config_socket_parent_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "ctl.sock")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if p == str(tmp_path) else real_access(p, mode)
    )
    with pytest.raises(
        ConfigError, match=f"^-s/--socket {re.escape(path)}: directory .* not writable"
    ):
        check_socket_path(path, 1)


def test_config_socket_not_a_socket(path: str) -> None:
    Path(path).write_text("precious")
    with pytest.raises(
        ConfigError, match=f"^-s/--socket {re.escape(path)}: exists and is not a socket$"
    ):
        check_socket_path(path, 1)
    assert Path(path).read_text() == "precious"


def test_config_socket_live(server: ControlServer) -> None:
    with pytest.raises(
        ConfigError, match=f"^-s/--socket {re.escape(server.path)}: another VM is listening there$"
    ):
        check_socket_path(server.path, 1)
    assert send_command(server.path, {"cmd": "stop"}) == {"ok": True}


def test_config_socket_stale_is_removed(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    assert check_socket_path(path, 1) == path
    assert not os.path.lexists(path)


def test_config_socket_path_too_long(tmp_path: Path) -> None:
    path = str(tmp_path / ("x" * 120))
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        check_socket_path(path, 1)


def test_config_socket_empty() -> None:
    with pytest.raises(ConfigError, match=r"^-s/--socket: empty path$"):
        check_socket_path("", 1)
