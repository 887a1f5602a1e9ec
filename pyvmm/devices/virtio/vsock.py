"""virtio-vsock: stream sockets between the guest and host programs (virtio 1.2 section 5.10),
the host side as Unix sockets (pyvmm.vsock.muxer).

Queue 0 takes packets to the guest, queue 1 brings the guest's, queue 2 takes events: the one
event is TRANSPORT_RESET, sent when the VM resumes after a suspend (every stream is gone then,
as after a snapshot's restore; the guest's driver drops its sockets and listens anew).

The guest's packets are handled as they come; packets for the guest (answers, and data read from
host sockets within the guest's credit) go out as receive buffers allow. Without receive buffers
the device stops watching the host sockets until the driver adds some: host programs' data waits
in their sockets, nothing piles up here.
"""

from __future__ import annotations

import contextlib
import os
import socket

from pyvmm.devices.virtio.device import (
    DeviceType,
    EventHandler,
    VirtioDevice,
    available_chains,
    receivable_chain,
)
from pyvmm.devices.virtio.iov import read_at, views_at, write_at
from pyvmm.devices.virtio.queue import DescriptorChain, SplitQueue
from pyvmm.ratelimit import GuestLog
from pyvmm.vsock.dialer import DialRequests
from pyvmm.vsock.muxer import MAX_STREAM_FDS, Muxer
from pyvmm.vsock.packet import CONFIG, EVENT, EVENT_TRANSPORT_RESET, HEADER_SIZE, Header

RX, TX, EVENTS = 0, 1, 2
QUEUE_SIZE = 256


class Vsock(VirtioDevice):
    """The guest's vsock device, with context ID `cid`."""

    device_type = DeviceType.VSOCK

    def __init__(
        self,
        cid: int,
        listener: socket.socket | None,
        dialer: DialRequests | None,
        name: str = "vsock",
    ) -> None:
        """`listener`: where host programs connect (None: none can); `dialer`: how the guest
        reaches host listeners (None: it cannot)."""
        self.name = name
        self.cid = cid
        self.muxer = Muxer(cid, listener, dialer, self.guest_log)
        self._dialer = dialer
        self._config = CONFIG.pack(cid)
        # Signalled when a round stopped with packets left for the guest: the worker comes back.
        self._more = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._reset_event_due = False

    @property
    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]

    @property
    def device_features(self) -> int:
        return 0  # streams only: no VIRTIO_VSOCK_F_SEQPACKET

    def config_read(self, offset: int, data: memoryview) -> None:
        chunk = self._config[offset : offset + len(data)]
        data[:] = chunk + b"\x00" * (len(data) - len(chunk))

    def event_sources(self) -> dict[int, EventHandler]:
        return {self.muxer.fileno(): self._host_events, self._more: self._come_back}

    @property
    def new_fds(self) -> int:
        return MAX_STREAM_FDS

    def keep_fds(self) -> list[int]:
        return [*self.muxer.keep_fds(), self._more]

    def has_work(self, index: int, queue: SplitQueue) -> bool:
        return index == TX and queue.has_pending()

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        if index == TX:
            self._from_guest(queue)
            self._to_guest()
        elif index == RX:
            self._to_guest()
        elif index == EVENTS:
            self._send_reset_event()

    def unpark(self) -> None:
        """The VM resumes after a suspend: every stream is dropped and the driver told."""
        self.muxer.reset()
        self._reset_event_due = True

    def reset(self) -> None:
        self.muxer.reset()
        self._reset_event_due = False

    def close(self) -> None:
        """Idempotent: the device process closes its device when told to and on its way out."""
        if self._more < 0:
            return
        self.muxer.close()
        if self._dialer is not None:
            self._dialer.close()
        os.close(self._more)
        self._more = -1

    # ---- the guest's packets ----

    def _from_guest(self, queue: SplitQueue) -> None:
        for chain in available_chains(queue, self.guest_log):
            self._packet(chain)
            queue.add_used(chain.head, 0)
            if self.muxer.has_control():
                # A credit update goes at once, not after the round: a guest that ran out of
                # credit sends again while the rest of its packets are passed on.
                self._to_guest()

    def _packet(self, chain: DescriptorChain) -> None:
        if chain.writable_len or chain.readable_len < HEADER_SIZE:
            self.guest_log.info("bad packet", "tx chain %d: %d readable bytes, %d writable",
                                chain.head, chain.readable_len, chain.writable_len)  # fmt: skip
            return
        hdr = Header.unpack(read_at(chain.readable, 0, HEADER_SIZE))
        if hdr.len > chain.readable_len - HEADER_SIZE:
            self.guest_log.info("bad packet", "tx chain %d: a %d-byte payload in %d bytes",
                                chain.head, hdr.len, chain.readable_len - HEADER_SIZE)  # fmt: skip
            return
        self.muxer.from_guest(hdr, views_at(chain.readable, HEADER_SIZE, hdr.len))

    # ---- packets for the guest ----

    def _host_events(self) -> bool:
        self.muxer.handle_events()
        return self._to_guest()

    def _come_back(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._more)
        return self._to_guest()

    def _to_guest(self) -> bool:
        """Fill receive buffers with what there is for the guest, a queue's worth at most.
        False when buffers ran out first: rest until the driver adds some."""
        rx = self.queues.get(RX)
        if rx is None:
            return False
        budget = rx.size
        out_of_buffers = False
        while self.muxer.has_packets():
            if budget == 0:
                os.eventfd_write(self._more, 1)  # the rest in the worker's next round
                break
            chain = self._receive_buffer(rx)
            if chain is None:
                out_of_buffers = True
                break
            length = self.muxer.to_guest(chain.writable, chain.writable_len)
            if length == 0:
                rx.undo_pop(1)
                break
            rx.add_used(chain.head, length)
            budget -= 1
        if rx.needs_interrupt():
            self.interrupt.signal_used(RX)
        return not out_of_buffers

    def _receive_buffer(self, rx: SplitQueue) -> DescriptorChain | None:
        """The next receive buffer fit for a packet, after asking the driver to notify when it
        adds some if there is none (and looking once more: added before it saw the request)."""
        chain = receivable_chain(rx, HEADER_SIZE, self.guest_log)
        if chain is None:
            rx.enable_notification()
            chain = receivable_chain(rx, HEADER_SIZE, self.guest_log)
        return chain

    def _send_reset_event(self) -> None:
        events = self.queues.get(EVENTS)
        if self._reset_event_due and events is not None:
            self._reset_event_due = not post_transport_reset(events, self.guest_log)
            if events.needs_interrupt():
                self.interrupt.signal_used(EVENTS)


def post_transport_reset(events: SplitQueue, guest_log: GuestLog) -> bool:
    """Put a TRANSPORT_RESET event in the driver's next event buffer (unfit ones go back empty);
    whether there was one to put it in."""
    for chain in available_chains(events, guest_log):
        if chain.writable_len < EVENT.size:
            guest_log.info("bad chain", "event chain %d: %d writable bytes",
                           chain.head, chain.writable_len)  # fmt: skip
            events.add_used(chain.head, 0)
            continue
        write_at(chain.writable, 0, EVENT.pack(EVENT_TRANSPORT_RESET))
        events.add_used(chain.head, EVENT.size)
        return True
    return False
