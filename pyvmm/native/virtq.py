"""The compiled side of split virtqueues (virtq.c): the one walker of descriptor chains, the used
ring's writer, and the loops that move network frames between a TAP and guest buffers.

Python keeps the queues' logic (pyvmm/devices/virtio/queue.py and net.py); this is where the
per-chain work is done, so that a frame costs a system call and little else. Guest addresses
are translated through the table `GuestMemory` builds of its regions (`struct pyvmm_memory`),
so what the walker may touch is what GuestMemory says the guest has. Called through cffi's ABI
mode, like fences.py; `python -m pyvmm.native` builds it.
"""

from __future__ import annotations

from typing import Any

from pyvmm.cdecl import declare, struct_for
from pyvmm.native.helpers import Helper

CDEF = """
struct pyvmm_region {
    uint64_t guest_addr;
    uint64_t size;
    uint64_t host_addr;
    uint32_t readonly;
    uint32_t reserved;
};
struct pyvmm_memory {
    const struct pyvmm_region *regions;
    uint32_t count;
    uint32_t reserved;
};
struct pyvmm_vq {
    const uint8_t *desc;
    uint16_t *avail;
    uint8_t *used;
    uint32_t size;
    uint16_t next_avail;
    uint16_t next_used;
    uint64_t unsignalled;
};
struct pyvmm_iovec {
    uint64_t base;
    uint64_t len;
};
struct pyvmm_chain {
    uint64_t capacity;
    uint64_t head;
    uint64_t readable;
    uint64_t writable;
    uint64_t readable_len;
    uint64_t writable_len;
    uint64_t error;
    uint64_t error_index;
    uint64_t error_addr;
    uint64_t error_len;
    struct pyvmm_iovec *iov;
    uint64_t *region;
    uint64_t *offset;
};
struct pyvmm_net_stats {
    uint64_t frames;
    uint64_t dropped;
    int last_errno;
    int reserved;
};
int pyvmm_vq_pop(struct pyvmm_vq *q, const struct pyvmm_memory *m, struct pyvmm_chain *c);
void pyvmm_vq_add_used(struct pyvmm_vq *q, uint32_t head, uint32_t len);
int pyvmm_net_tx(struct pyvmm_vq *q, const struct pyvmm_memory *m, int fd, uint32_t *budget,
                 uint32_t min_len, struct pyvmm_chain *c, struct pyvmm_net_stats *stats);
int pyvmm_net_rx(struct pyvmm_vq *q, const struct pyvmm_memory *m, int fd, uint32_t *budget,
                 uint32_t min_len, uint32_t num_buffers_at, uint8_t *spill, uint64_t spill_len,
                 struct pyvmm_chain *c, struct pyvmm_net_stats *stats, uint64_t *read);
uint32_t pyvmm_virtq_layout(uint64_t *out, uint32_t max);
"""

ffi: Any = declare("virtq", CDEF)
lib: Any = Helper("virtq").open(ffi)

# What pyvmm_vq_pop and the net loops return.
POP_NONE = 0
POP_CHAIN = 1
POP_BAD_AVAIL = -1
RX_EMPTY = -2
RX_ERRNO_BASE = -1000  # a readv error: RX_ERRNO_BASE - errno

# struct pyvmm_chain's error codes.
CHAIN_OK = 0
CHAIN_BAD_HEAD = 1
CHAIN_OUT_OF_RANGE = 2
CHAIN_TOO_LONG = 3
CHAIN_TOO_LARGE = 4
CHAIN_NESTED_INDIRECT = 5
CHAIN_INDIRECT_WITH_NEXT = 6
CHAIN_INDIRECT_INVALID = 7
CHAIN_READABLE_AFTER_WRITABLE = 8
CHAIN_OUTSIDE_RAM = 9
CHAIN_READ_ONLY = 10


def layout() -> list[int]:
    """The C side's sizes and offsets, in virtq.c's order (see `expected_layout`)."""
    out = ffi.new("uint64_t[64]")
    count = lib.pyvmm_virtq_layout(out, 64)
    return [int(out[i]) for i in range(count)]


def expected_layout() -> list[int]:
    """The same sizes and offsets as this module's declarations give them."""
    o = ffi.offsetof
    s = ffi.sizeof
    return [
        s("struct pyvmm_region"), o("struct pyvmm_region", "host_addr"),
        o("struct pyvmm_region", "readonly"),
        s("struct pyvmm_memory"), o("struct pyvmm_memory", "count"),
        s("struct pyvmm_vq"), o("struct pyvmm_vq", "size"), o("struct pyvmm_vq", "next_avail"),
        o("struct pyvmm_vq", "next_used"), o("struct pyvmm_vq", "unsignalled"),
        s("struct pyvmm_iovec"),
        s("struct pyvmm_chain"), o("struct pyvmm_chain", "error"),
        o("struct pyvmm_chain", "error_addr"), o("struct pyvmm_chain", "iov"),
        o("struct pyvmm_chain", "offset"),
        s("struct pyvmm_net_stats"), o("struct pyvmm_net_stats", "last_errno"),
    ]  # fmt: skip


# What a walk says of its chain, decoded in one call from `ChainBuffer.summary`.
CHAIN_SUMMARY = struct_for(
    ffi,
    "struct pyvmm_chain",
    "head",
    "readable",
    "writable",
    "readable_len",
    "writable_len",
    "error",
)
CHAIN_SUMMARY_AT: int = ffi.offsetof("struct pyvmm_chain", "head")
_IOV_WORDS = ffi.sizeof("struct pyvmm_iovec") // ffi.sizeof("uint64_t")
IOV_LEN = ffi.offsetof("struct pyvmm_iovec", "len") // ffi.sizeof("uint64_t")


class ChainBuffer:
    """Where one walk puts a chain: its buffers as iovecs (host addresses), and for each the
    region of guest memory it lies in and where, for views of it. The memoryviews read them
    faster than cffi's objects do: `summary` the chain's fields (CHAIN_SUMMARY, at
    CHAIN_SUMMARY_AT), buffer i's
    length at `iov_words[IOV_WORDS * i + IOV_LEN]`, its region and offset at `regions[i]` and
    `offsets[i]`."""

    IOV_WORDS = _IOV_WORDS

    def __init__(self, queue_size: int) -> None:
        # A chain has at most 2 * size - 1 buffers (size - 1 before an indirect table of size);
        # one slot more stays free for the receive loop's spill buffer.
        capacity = 2 * queue_size
        self.iov: Any = ffi.new("struct pyvmm_iovec[]", capacity + 1)
        self.region: Any = ffi.new("uint64_t[]", capacity)
        self.offset: Any = ffi.new("uint64_t[]", capacity)
        self.chain: Any = ffi.new("struct pyvmm_chain *")
        self.chain.capacity = capacity
        self.chain.iov = self.iov
        self.chain.region = self.region
        self.chain.offset = self.offset
        self.summary = memoryview(ffi.buffer(self.chain))
        self.iov_words = memoryview(ffi.buffer(self.iov)).cast("Q")
        self.regions = memoryview(ffi.buffer(self.region)).cast("Q")
        self.offsets = memoryview(ffi.buffer(self.offset)).cast("Q")
