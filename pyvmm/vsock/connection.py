"""One vsock stream between a guest port and a host Unix socket: its state, and the credit that
bounds what each side may send (virtio 1.2, 5.10.6.3).

Guest to host: the guest may have at most `BUF_ALLOC` bytes in flight (sent and not yet passed
on to the host socket, which the device counts in `fwd_cnt`). What the host socket does not
take at once waits in `to_host`, never more than that: a guest that sends past its credit has
broken the protocol and the stream is reset. Host to guest: the device reads from the host
socket no more than the guest's credit (`peer_credit`), so a guest that reads slowly stops the
host's writer through its socket buffer, and nothing is ever dropped or buffered here.
"""

from __future__ import annotations

import enum
import socket

from pyvmm.vsock.packet import Shutdown

# What the device offers each stream: the most guest bytes it holds for a slow host reader.
BUF_ALLOC = 128 * 1024
# The device tells the guest it made room once this much was passed on since it last said.
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4
U32_MASK = 0xFFFFFFFF


class State(enum.Enum):
    CONNECTING = "connecting"  # a host client's REQUEST is with the guest
    ESTABLISHED = "established"
    CLOSING = "closing"  # the guest shut both ways: passing on what is left, then RST


class Connection:
    """A stream: the guest's (cid, port) and the host's port, and the host socket."""

    def __init__(self, sock: socket.socket, host_port: int, guest_port: int, state: State) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.host_port = host_port
        self.guest_port = guest_port
        self.state = state
        # Guest to host.
        self.to_host = bytearray()
        self.received = 0  # bytes the guest sent (mod 2^32)
        self.fwd_cnt = 0  # of those, passed on to the host socket (mod 2^32)
        self.fwd_cnt_told = 0  # what the guest last heard of fwd_cnt
        self.guest_shutdown = Shutdown(0)
        # Host to guest.
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.sent = 0  # bytes sent to the guest (mod 2^32)
        self.host_eof = False  # the host will send no more: the guest has been told

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        """What a packet from the guest says of its receive buffer."""
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    @property
    def peer_credit(self) -> int:
        """How many more bytes the guest can take."""
        in_flight = (self.sent - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    @property
    def in_flight_from_guest(self) -> int:
        return (self.received - self.fwd_cnt) & U32_MASK

    def accepts(self, length: int) -> bool:
        """Whether `length` more bytes from the guest are within the credit it was given."""
        return self.in_flight_from_guest + length <= BUF_ALLOC

    def forwarded(self, length: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + length) & U32_MASK

    def owes_credit_update(self) -> bool:
        """Whether the guest should hear of the room made since it last did: once it is a
        quarter of its credit. A guest out of credit has BUF_ALLOC bytes with the device, so
        passing on a quarter of them always tells it; every packet to it tells it too."""
        return (self.fwd_cnt - self.fwd_cnt_told) & U32_MASK >= CREDIT_UPDATE_THRESHOLD

    def wants_host_data(self) -> bool:
        """Whether to read from the host socket now."""
        return (
            self.state is State.ESTABLISHED
            and not self.host_eof
            and not self.guest_shutdown & Shutdown.RCV
            and self.peer_credit > 0
        )

    def close(self) -> None:
        self.sock.close()
