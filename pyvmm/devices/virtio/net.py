"""virtio-net: a network interface backed by a host TAP device (virtio 1.2 section 5.1).

Queue 0 receives (frames from the TAP into the driver's buffers), queue 1 transmits. Every frame
moves with one readv or writev straight between the TAP and guest memory: the virtio-net header
in front of a frame is the TAP's own vnet header (12 bytes, IFF_VNET_HDR), so checksum and
segmentation offloads pass through untouched, and the offloads the driver accepts for received
frames are handed to the TAP (TUNSETOFFLOAD). With VIRTIO_NET_F_MRG_RXBUF a received frame may
span several buffers: the device takes as many as recent frames needed, reads once into them and
a spare buffer behind them, gives back the ones the frame did not need, and copies what ran into
the spare (a frame larger than recent ones) into more of them.

When the driver has no receive buffers posted, the device stops watching the TAP (the worker
rests it) until the driver adds some: the host kernel queues, then drops, frames meanwhile, as a
full NIC would. The device never spins, and never drops a frame it read for want of room: it
holds it until the room comes.

The layouts are declared as <linux/virtio_net.h> declares them (tests/unit/devices/virtio/
test_headers.py checks them against it).
"""

from __future__ import annotations

import enum
import errno as errno_module
import os
from typing import Any

from pyvmm.cdecl import declare, struct_for
from pyvmm.devices.virtio.device import (
    DeviceError,
    DeviceInterrupt,
    DeviceType,
    EventHandler,
    VirtioDevice,
    receivable_chain,
)
from pyvmm.devices.virtio.iov import write_at
from pyvmm.devices.virtio.queue import BadAvailIndex, DescriptorChain, InvalidChain, SplitQueue
from pyvmm.memory import GuestMemory, NativeRegions
from pyvmm.native import virtq
from pyvmm.net.tap import Offload, Tap

ffi: Any = declare(
    "virtio_net",
    """
    struct virtio_net_config {
        uint8_t  mac[6];
        uint16_t status;
        uint16_t max_virtqueue_pairs;
        uint16_t mtu;
        uint32_t speed;
        uint8_t  duplex;
        uint8_t  rss_max_key_size;
        uint16_t rss_max_indirection_table_length;
        uint32_t supported_hash_types;
    };
    struct virtio_net_hdr_v1 {
        uint8_t  flags;
        uint8_t  gso_type;
        uint16_t hdr_len;
        uint16_t gso_size;
        uint16_t csum_start;
        uint16_t csum_offset;
        uint16_t num_buffers;
    };
    """,
    packed=True,
)

RX, TX = 0, 1
QUEUE_SIZE = 256
HEADER_SIZE = ffi.sizeof("struct virtio_net_hdr_v1")
NUM_BUFFERS = struct_for(ffi, "struct virtio_net_hdr_v1", "num_buffers")
NUM_BUFFERS_AT = ffi.offsetof("struct virtio_net_hdr_v1", "num_buffers")
# The largest frame the TAP can hand over: a 64 KiB GSO packet (IP's limit) with its Ethernet
# and VLAN headers.
MAX_FRAME = 65535 + 14 + 4
# readv/writev take at most IOV_MAX (1024) buffers.
IOV_MAX = 1024
TX_MIN_LEN = HEADER_SIZE + 1  # a frame is its header and at least a byte
LINK_UP = 1


class NetFeature(enum.IntFlag):
    """virtio-net feature bits (virtio 1.2, 5.1.3)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16


# Which TAP offload each receive-side feature turns on.
GUEST_OFFLOADS = {
    NetFeature.GUEST_CSUM: Offload.CSUM,
    NetFeature.GUEST_TSO4: Offload.TSO4,
    NetFeature.GUEST_TSO6: Offload.TSO6,
    NetFeature.GUEST_ECN: Offload.TSO_ECN,
    NetFeature.GUEST_UFO: Offload.UFO,
}


class Net(VirtioDevice):
    """One NIC on one TAP."""

    device_type = DeviceType.NET

    def __init__(self, tap: Tap, name: str, mac: bytes | None) -> None:
        """`mac`: the guest's address (None: the driver picks one)."""
        self.tap = tap
        self.name = name
        self.mac = mac
        self._ufo = tap.supports_offload(Offload.CSUM | Offload.UFO)
        config: Any = ffi.new("struct virtio_net_config *")
        if mac is not None:
            config.mac = list(mac)
        config.status = LINK_UP
        config.max_virtqueue_pairs = 1
        self._config = bytes(ffi.buffer(config))
        self._mergeable = False
        # Where a frame goes past the buffers taken for it (then copied into more of them).
        self._overflow = memoryview(bytearray(MAX_FRAME + HEADER_SIZE))
        self._spill: Any = virtq.ffi.from_buffer(self._overflow)
        self._pending: bytes | None = None  # a frame waiting for the driver to add room
        # The compiled loops' arguments and counters, made once.
        self._budget: Any = virtq.ffi.new("uint32_t *")
        self._read: Any = virtq.ffi.new("uint64_t *")
        self._stats: Any = virtq.ffi.new("struct pyvmm_net_stats *")

    @property
    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE]

    @property
    def device_features(self) -> int:
        features = (
            NetFeature.CSUM
            | NetFeature.GUEST_CSUM
            | NetFeature.GUEST_TSO4
            | NetFeature.GUEST_TSO6
            | NetFeature.GUEST_ECN
            | NetFeature.HOST_TSO4
            | NetFeature.HOST_TSO6
            | NetFeature.HOST_ECN
            | NetFeature.MRG_RXBUF
            | NetFeature.STATUS
        )
        if self._ufo:
            features |= NetFeature.GUEST_UFO | NetFeature.HOST_UFO
        if self.mac is not None:
            features |= NetFeature.MAC
        return int(features)

    def config_read(self, offset: int, data: memoryview) -> None:
        chunk = self._config[offset : offset + len(data)]
        data[:] = chunk + b"\x00" * (len(data) - len(chunk))

    def activate(
        self,
        mem: GuestMemory,
        interrupt: DeviceInterrupt,
        queues: dict[int, SplitQueue],
        features: int,
    ) -> None:
        super().activate(mem, interrupt, queues, features)
        offload = Offload(0)
        for feature, bit in GUEST_OFFLOADS.items():
            if features & feature:
                offload |= bit
        self.tap.set_vnet_hdr_size(HEADER_SIZE)
        self.tap.set_offload(offload)
        self._mergeable = bool(features & NetFeature.MRG_RXBUF)
        self._pending = None

    def event_sources(self) -> dict[int, EventHandler]:
        return {self.tap.fd: self._tap_readable}

    def has_work(self, index: int, queue: SplitQueue) -> bool:
        # Receive buffers wait for frames, not for the worker.
        return index == TX and queue.has_pending()

    def keep_fds(self) -> list[int]:
        return [self.tap.fd]

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        if index == TX:
            self._transmit(queue)
        elif index == RX:
            self._receive(queue)  # new buffers: frames the TAP holds can come in now

    def _tap_readable(self) -> bool:
        rx = self.queues.get(RX)
        if rx is None:
            return False
        rx.budget = rx.size
        keep_watching = self._receive(rx)
        if rx.needs_interrupt():
            self.interrupt.signal_used(RX)
        return keep_watching

    # ---- transmit ----

    def _transmit(self, queue: SplitQueue) -> None:
        """Send what the driver queued: the compiled loop does one writev per frame; here are
        only the chains it hands back (invalid, or not a frame) and the drops it counted."""
        while queue.budget > 0:
            memory = self.mem.native  # held for the loop: it keeps the regions mapped
            got = self._run_tx(queue, memory)
            self._log_tx_drops()
            if got == virtq.POP_NONE:
                return
            chain = self._walked(queue, memory.views, "tx")
            if chain is None:
                continue
            if chain.writable_len or chain.readable_len <= HEADER_SIZE:
                self.guest_log.info(
                    "bad frame", "tx chain %d: %d readable bytes, %d writable", chain.head,
                    chain.readable_len, chain.writable_len,
                )  # fmt: skip
            else:
                self.guest_log.info(
                    "bad frame", "tx chain %d has over %d buffers", chain.head, IOV_MAX
                )
            queue.add_used(chain.head, 0)

    def _run_tx(self, queue: SplitQueue, memory: NativeRegions) -> int:
        """The compiled transmit loop on `queue`, within its budget; what it returned."""
        budget = self._start_loop(queue)
        got: int = virtq.lib.pyvmm_net_tx(
            queue.native, memory.c, self.tap.fd, self._budget, TX_MIN_LEN, queue.walked.chain,
            self._stats,
        )  # fmt: skip
        return self._end_loop(queue, budget, got)

    def _run_rx(self, queue: SplitQueue, memory: NativeRegions) -> int:
        """The compiled receive loop on `queue`, within its budget; what it returned."""
        budget = self._start_loop(queue)
        got: int = virtq.lib.pyvmm_net_rx(
            queue.native, memory.c, self.tap.fd, self._budget, HEADER_SIZE, NUM_BUFFERS_AT,
            self._spill, len(self._overflow), queue.walked.chain, self._stats, self._read,
        )  # fmt: skip
        return self._end_loop(queue, budget, got)

    def _start_loop(self, queue: SplitQueue) -> int:
        budget = min(queue.budget, queue.size)
        self._budget[0] = budget
        return budget

    def _end_loop(self, queue: SplitQueue, budget: int, got: int) -> int:
        """Charge the chains a loop took to the round's budget (the worker may have cut it
        meanwhile, to stop: that is kept); raise what the loop ran into."""
        queue.budget = max(0, queue.budget - (budget - self._budget[0]))
        if got == virtq.POP_BAD_AVAIL:
            raise BadAvailIndex(queue.walked.chain.error_index, queue.next_avail, queue.size)
        if got <= virtq.RX_ERRNO_BASE:
            errno = virtq.RX_ERRNO_BASE - got
            raise OSError(errno, f"reading the TAP {self.tap.name}: {os.strerror(errno)}")
        return got

    def _walked(
        self, queue: SplitQueue, views: list[memoryview], direction: str
    ) -> DescriptorChain | None:
        """The chain a loop handed back; None (after returning it empty) if it is invalid."""
        try:
            return queue.walked_chain(views)
        except InvalidChain as e:
            if e.head is None:
                raise DeviceError(f"{e}: nothing to return to the driver") from e
            self.guest_log.info("bad chain", "%s chain %d: %s", direction, e.head, e)
            queue.add_used(e.head, 0)
            return None

    def _log_tx_drops(self) -> None:
        stats = self._stats
        if not stats.dropped:
            return
        if stats.last_errno == errno_module.EAGAIN:
            self.guest_log.info("tx dropped", "the TAP %s is full; %d frames dropped",
                                self.tap.name, stats.dropped)  # fmt: skip
        else:
            # The TAP refused the frame (bad header, too long, link down): a NIC drops it too.
            self.guest_log.info("tx dropped", "the TAP %s refused %d frames: %s", self.tap.name,
                                stats.dropped, os.strerror(stats.last_errno))  # fmt: skip
        stats.dropped = 0

    # ---- receive ----

    def _receive(self, queue: SplitQueue) -> bool:
        """Move frames from the TAP into receive buffers until the TAP is empty (True: keep
        watching it), the round's budget is spent (True), or the driver's buffers run out
        (False: rest until it adds some). The compiled loop moves each frame that fits the
        chain it reads into; here are the rest: invalid chains, and frames larger than their
        chain (merged into more buffers, or dropped when the driver did not ask for merging)."""
        asked = False  # whether the driver was asked to notify of new buffers this call
        while queue.budget > 0:
            if self._pending is not None:
                queue.budget -= 1
                if not self._deliver_pending(queue):
                    return False
                continue
            memory = self.mem.native  # held for the loop: it keeps the regions mapped
            got = self._run_rx(queue, memory)
            if got == virtq.RX_EMPTY:
                return True
            if got == virtq.POP_NONE:
                if queue.budget <= 0:
                    return True
                if asked:
                    return False
                queue.enable_notification()  # then look again: buffers added before it was seen
                asked = True
                continue
            length = self._read[0]
            chain = self._walked(queue, memory.views, "rx")
            if chain is None:
                continue
            if not length:
                self.guest_log.info(
                    "bad chain", "rx chain %d: %d readable bytes, %d writable in %d buffers",
                    chain.head, chain.readable_len, chain.writable_len, len(chain.writable),
                )  # fmt: skip
                queue.add_used(chain.head, 0)
                continue
            if not self._merge(queue, chain, length):
                return False
        return True

    def _merge(self, queue: SplitQueue, chain: DescriptorChain, length: int) -> bool:
        """A frame of `length` bytes ran past `chain` (its head is in the chain, the rest in
        the spill buffer): spread it over more buffers. False when the driver has too few: it
        is held until it adds some (never dropped)."""
        room = chain.writable_len
        tail = bytes(self._overflow[: length - room])
        if not self._mergeable:
            # The driver's buffer is smaller than what it negotiated allows: a NIC drops.
            queue.undo_pop(1)
            self.guest_log.info("rx dropped", "a %d-byte frame did not fit a %d-byte "
                                "receive buffer", length, room)  # fmt: skip
            return True
        views = list(chain.writable)
        more = self._take_buffers(queue, length - room)
        if sum(c.writable_len for c in more) < length - room:
            queue.undo_pop(1 + len(more))
            self._pending = b"".join(bytes(v) for v in views) + tail
            queue.enable_notification()
            return False
        write_at([view for c in more for view in c.writable], 0, tail)
        self._complete(queue, [chain, *more], views, length)
        return True

    def _deliver_pending(self, queue: SplitQueue) -> bool:
        """Copy the frame held back for want of room into buffers, if there are enough now."""
        assert self._pending is not None
        frame = self._pending
        chains = self._take_buffers(queue, len(frame))
        if sum(chain.writable_len for chain in chains) < len(frame):
            queue.undo_pop(len(chains))
            queue.enable_notification()
            return False
        views = [view for chain in chains for view in chain.writable]
        write_at(views, 0, frame)
        self._pending = None
        self._complete(queue, chains, views, len(frame))
        return True

    def _take_buffers(self, queue: SplitQueue, room: int) -> list[DescriptorChain]:
        """Chains for `room` bytes, as many as there are (one, unless buffers merge); none
        after asking the driver to notify when it adds some."""
        chains = self._gather(queue, room)
        if not chains:
            queue.enable_notification()
            chains = self._gather(queue, room)  # what the driver added before it saw the request
        return chains

    def _gather(self, queue: SplitQueue, room: int) -> list[DescriptorChain]:
        chains: list[DescriptorChain] = []
        have = buffers = 0
        while have < room:
            chain = receivable_chain(queue, HEADER_SIZE, self.guest_log)
            if chain is None:
                break
            if buffers + len(chain.writable) >= IOV_MAX:  # one iovec stays for the overflow
                queue.undo_pop(1)
                break
            chains.append(chain)
            have += chain.writable_len
            buffers += len(chain.writable)
            if not self._mergeable:
                break
        return chains

    def _complete(
        self,
        queue: SplitQueue,
        chains: list[DescriptorChain],
        views: list[memoryview],
        length: int,
    ) -> None:
        """Publish a frame of `length` bytes (header included) read into `chains`' buffers:
        num_buffers says how many it filled; the rest go back to the driver's pool."""
        used: list[tuple[int, int]] = []
        left = length
        for chain in chains:
            if left <= 0 and used:
                break
            part = min(left, chain.writable_len)
            used.append((chain.head, part))
            left -= part
        queue.undo_pop(len(chains) - len(used))
        write_at(views, NUM_BUFFERS_AT, NUM_BUFFERS.pack(len(used)))
        for head, part in used:
            queue.add_used(head, part)

    def close(self) -> None:
        self.tap.close()
