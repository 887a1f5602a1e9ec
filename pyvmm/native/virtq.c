/*
 * Split virtqueues, device side: walking descriptor chains and moving network frames between a
 * TAP and guest buffers (see virtq.py beside this file, pyvmm/devices/virtio/queue.py and net.py).
 *
 * This is the one place pyvmm reads a driver's descriptors. Everything the guest wrote is
 * untrusted and may change while it is read: each descriptor is loaded once into a local copy,
 * every buffer is checked to lie wholly inside one region of the table GuestMemory built, and
 * the work of one chain is bounded by the queue size. Anything malformed ends the walk with an
 * error code that queue.py turns into the matching exception.
 *
 * Built by `python -m pyvmm.native` with gcc -nostdlib (no C library): the two system calls the
 * net loops make (readv, writev) are issued directly.
 */

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

/* Keep in step with CDEF in virtq.py (a unit test compares pyvmm_virtq_layout with it). */
struct pyvmm_region {
    u64 guest_addr;
    u64 size;
    u64 host_addr;
    u32 readonly;
    u32 reserved;
};

struct pyvmm_memory {
    const struct pyvmm_region *regions;
    u32 count;
    u32 reserved;
};

struct pyvmm_vq {
    const volatile u8 *desc;    /* size descriptors */
    volatile u16 *avail;        /* flags, idx, ring[size], used_event */
    volatile u8 *used;          /* flags, idx, ring[size] of {id, len}, avail_event */
    u32 size;
    u16 next_avail;
    u16 next_used;
    u64 unsignalled;            /* used elements published since the last interrupt decision */
};

struct pyvmm_iovec {            /* struct iovec of 64-bit Linux */
    u64 base;
    u64 len;
};

struct pyvmm_chain {
    u64 capacity;               /* entries of iov, region and offset: twice the queue size */
    u64 head;
    u64 readable;               /* iov[0, readable) are device-readable */
    u64 writable;               /* iov[readable, readable + writable) are device-writable */
    u64 readable_len;
    u64 writable_len;
    u64 error;                  /* PYVMM_CHAIN_*; the fields below say more */
    u64 error_index;
    u64 error_addr;
    u64 error_len;
    struct pyvmm_iovec *iov;
    u64 *region;                /* the region each buffer lies in */
    u64 *offset;                /* and where in it */
};

struct pyvmm_net_stats {
    u64 frames;                 /* frames moved */
    u64 dropped;                /* frames the TAP refused (transmit) */
    int last_errno;             /* why the last one was refused */
    int reserved;
};

enum {
    PYVMM_CHAIN_OK = 0,
    PYVMM_CHAIN_BAD_HEAD,               /* error_index: the head */
    PYVMM_CHAIN_OUT_OF_RANGE,           /* error_index: next; error_len: the table's entries */
    PYVMM_CHAIN_TOO_LONG,               /* error_len: the table's entries */
    PYVMM_CHAIN_TOO_LARGE,
    PYVMM_CHAIN_NESTED_INDIRECT,
    PYVMM_CHAIN_INDIRECT_WITH_NEXT,
    PYVMM_CHAIN_INDIRECT_INVALID,       /* error_len: the table's length */
    PYVMM_CHAIN_READABLE_AFTER_WRITABLE,
    PYVMM_CHAIN_OUTSIDE_RAM,            /* error_addr, error_len: the buffer */
    PYVMM_CHAIN_READ_ONLY,              /* error_addr, error_len: the buffer */
};

/* What pop and the loops return. */
enum {
    PYVMM_POP_NONE = 0,         /* no chain available (or the budget is spent) */
    PYVMM_POP_CHAIN = 1,        /* a chain (c->error says whether it is valid) */
    PYVMM_POP_BAD_AVAIL = -1,   /* avail.idx is more than the queue size ahead: c->error_index */
};

#define DESC_SIZE 16
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define MAX_CHAIN_BYTES 0xffffffffULL
#define AVAIL_IDX 1
#define AVAIL_RING 2
#define USED_IDX_AT 2
#define USED_RING_AT 4
#define USED_ELEM_SIZE 8

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

static void load_desc(const volatile u8 *table, u32 index, struct desc *d)
{
    const volatile u8 *p = table + (u64)index * DESC_SIZE;
    d->addr = *(const volatile u64 *)p;
    d->len = *(const volatile u32 *)(p + 8);
    d->flags = *(const volatile u16 *)(p + 12);
    d->next = *(const volatile u16 *)(p + 14);
}

/* The region holding [addr, addr + len) wholly, or -1. */
static long find_region(const struct pyvmm_memory *m, u64 addr, u64 len)
{
    for (u32 i = 0; i < m->count; i++) {
        const struct pyvmm_region *r = &m->regions[i];
        if (addr >= r->guest_addr && addr - r->guest_addr <= r->size &&
            len <= r->size - (addr - r->guest_addr))
            return i;
    }
    return -1;
}

static int fail(struct pyvmm_chain *c, u32 error, u32 index, u64 addr, u64 len)
{
    c->error = error;
    c->error_index = index;
    c->error_addr = addr;
    c->error_len = len;
    return PYVMM_POP_CHAIN;
}

static int walk(const struct pyvmm_vq *q, const struct pyvmm_memory *m, u32 head,
                struct pyvmm_chain *c)
{
    const volatile u8 *table = q->desc;
    u32 limit = q->size;        /* entries in the current table; the most a chain visits in it */
    u32 budget = limit;
    int in_indirect = 0;
    u64 total = 0;
    u32 n = 0;
    struct desc d;
    u32 index = head;

    c->head = head;
    c->readable = c->writable = 0;
    c->readable_len = c->writable_len = 0;
    c->error = PYVMM_CHAIN_OK;
    for (;;) {
        if (budget == 0)
            return fail(c, PYVMM_CHAIN_TOO_LONG, 0, 0, limit);
        budget--;
        load_desc(table, index, &d);
        if (d.flags & F_INDIRECT) {
            if (in_indirect)
                return fail(c, PYVMM_CHAIN_NESTED_INDIRECT, 0, 0, 0);
            if (d.flags & F_NEXT)
                return fail(c, PYVMM_CHAIN_INDIRECT_WITH_NEXT, 0, 0, 0);
            u32 entries = d.len / DESC_SIZE;
            /* No chain may be longer than the queue size (virtio 1.2, 2.7.5.3.1), indirect
             * tables included: that bounds the work of walking any one chain. */
            if (d.len % DESC_SIZE || entries == 0 || entries > q->size)
                return fail(c, PYVMM_CHAIN_INDIRECT_INVALID, 0, 0, d.len);
            long r = find_region(m, d.addr, d.len);
            if (r < 0)
                return fail(c, PYVMM_CHAIN_OUTSIDE_RAM, 0, d.addr, d.len);
            table = (const volatile u8 *)(m->regions[r].host_addr +
                                          (d.addr - m->regions[r].guest_addr));
            in_indirect = 1;
            limit = budget = entries;
            index = 0;
            continue;
        }
        if (d.len) {
            total += d.len;
            if (total > MAX_CHAIN_BYTES)
                return fail(c, PYVMM_CHAIN_TOO_LARGE, 0, 0, 0);
            long r = find_region(m, d.addr, d.len);
            if (r < 0)
                return fail(c, PYVMM_CHAIN_OUTSIDE_RAM, 0, d.addr, d.len);
            const struct pyvmm_region *region = &m->regions[r];
            if (d.flags & F_WRITE) {
                if (region->readonly)
                    return fail(c, PYVMM_CHAIN_READ_ONLY, 0, d.addr, d.len);
                c->writable++;
                c->writable_len += d.len;
            } else if (c->writable) {
                return fail(c, PYVMM_CHAIN_READABLE_AFTER_WRITABLE, 0, 0, 0);
            } else {
                c->readable++;
                c->readable_len += d.len;
            }
            /* At most 2 * size - 1 buffers: size - 1 before an indirect one, size in it. */
            if (n >= c->capacity)
                return fail(c, PYVMM_CHAIN_TOO_LONG, 0, 0, limit);
            u64 offset = d.addr - region->guest_addr;
            c->iov[n].base = region->host_addr + offset;
            c->iov[n].len = d.len;
            c->region[n] = (u64)r;
            c->offset[n] = offset;
            n++;
        }
        if (!(d.flags & F_NEXT))
            return PYVMM_POP_CHAIN;
        if (d.next >= limit)
            return fail(c, PYVMM_CHAIN_OUT_OF_RANGE, d.next, 0, limit);
        index = d.next;
    }
}

/* A released queue (queue.py's release: its rings are NULL) has nothing available and takes
 * no used elements. */
int pyvmm_vq_pop(struct pyvmm_vq *q, const struct pyvmm_memory *m, struct pyvmm_chain *c)
{
    if (!q->avail)
        return PYVMM_POP_NONE;
    u16 avail_idx = q->avail[AVAIL_IDX];
    u16 ahead = (u16)(avail_idx - q->next_avail);
    if (ahead == 0)
        return PYVMM_POP_NONE;
    if (ahead > q->size) {
        c->error_index = avail_idx;
        return PYVMM_POP_BAD_AVAIL;
    }
    /* The driver wrote the ring entry and the chain before avail.idx (virtio 1.2, 2.7.13.3.1):
     * read them only after the index. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    u16 head = q->avail[AVAIL_RING + (q->next_avail & (q->size - 1))];
    q->next_avail++;
    if (head >= q->size) {
        c->head = head;
        return fail(c, PYVMM_CHAIN_BAD_HEAD, head, 0, q->size);
    }
    return walk(q, m, head, c);
}

void pyvmm_vq_add_used(struct pyvmm_vq *q, u32 head, u32 len)
{
    if (!q->used)
        return;
    volatile u8 *elem = q->used + USED_RING_AT + (u64)(q->next_used & (q->size - 1)) * USED_ELEM_SIZE;
    *(volatile u32 *)elem = head;
    *(volatile u32 *)(elem + 4) = len;
    /* The element, and the data written into the chain's buffers, are visible before the index
     * that publishes them (virtio 1.2, 2.7.8.2). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q->next_used++;
    *(volatile u16 *)(q->used + USED_IDX_AT) = q->next_used;
    q->unsignalled++;
}

/* ---- system calls, without a C library ---- */

#if defined(__x86_64__)
#define NR_READV 19
#define NR_WRITEV 20
static long syscall3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
#define NR_READV 65
#define NR_WRITEV 66
static long syscall3(long n, long a, long b, long c)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
}
#else
#error "pyvmm's virtq helper knows the system calls of x86_64 and aarch64 only"
#endif

/* Write `len` bytes at offset `at` of the concatenation of the chain's buffers [first,
 * first + count) (a header may be split over several). */
static void write_bytes(const struct pyvmm_chain *c, u32 first, u32 count, u64 at, const u8 *src,
                        u32 len)
{
    for (u32 i = first; i < first + count && len; i++) {
        u64 size = c->iov[i].len;
        if (at >= size) {
            at -= size;
            continue;
        }
        while (at < size && len) {
            *(volatile u8 *)(c->iov[i].base + at++) = *src++;
            len--;
        }
        at = 0;
    }
}

#define EINTR 4
#define IOV_MAX 1024

static long sys_iov(long nr, int fd, const struct pyvmm_iovec *iov, u32 count)
{
    long ret;
    do
        ret = syscall3(nr, fd, (long)iov, count);
    while (ret == -EINTR);
    return ret;
}

/*
 * Transmit: each available chain's readable buffers go to `fd` as one frame (one writev), and
 * the chain back to the driver. A frame is at least `min_len` bytes (its virtio-net header and
 * more) and has no writable buffer. Stops when no chain is available or `*budget` is spent
 * (PYVMM_POP_NONE), at a chain the caller must look at (PYVMM_POP_CHAIN: invalid, or not a
 * frame; not yet used), or at PYVMM_POP_BAD_AVAIL. A frame the TAP refuses is dropped and
 * counted, as a NIC drops it.
 */
int pyvmm_net_tx(struct pyvmm_vq *q, const struct pyvmm_memory *m, int fd, u32 *budget,
                 u32 min_len, struct pyvmm_chain *c, struct pyvmm_net_stats *stats)
{
    while (*budget) {
        (*budget)--;
        int got = pyvmm_vq_pop(q, m, c);
        if (got != PYVMM_POP_CHAIN)
            return got;
        if (c->error || c->writable || c->readable_len < min_len || c->readable > IOV_MAX)
            return PYVMM_POP_CHAIN;
        long ret = sys_iov(NR_WRITEV, fd, c->iov, c->readable);
        if (ret < 0) {
            stats->dropped++;
            stats->last_errno = (int)-ret;
        } else {
            stats->frames++;
        }
        pyvmm_vq_add_used(q, c->head, 0);
    }
    return PYVMM_POP_NONE;
}

/*
 * Receive, for a driver that posts whole-frame buffers and the common case: one chain per frame
 * (no MRG_RXBUF), or MRG_RXBUF with a chain that holds all of the frame. Reads one frame from
 * `fd` into the next chain's writable buffers and `spill` behind them, publishes it when it fit
 * (with num_buffers, at `num_buffers_at` in the header, set to 1) and goes on. Returns:
 *   PYVMM_POP_NONE      no chain available, or *budget spent; `*read` 0
 *   PYVMM_POP_CHAIN     a chain the caller must look at: invalid (c->error), unfit to receive
 *                       into, or one the frame overran (`*read` > 0: the frame's length, its
 *                       start in the chain and the rest in `spill`; not yet used)
 *   -2                  the TAP is empty (`*read` 0; the chain was given back to the ring)
 *   PYVMM_POP_BAD_AVAIL
 * or a negative errno from readv as -(1000 + errno) (the chain given back).
 */
int pyvmm_net_rx(struct pyvmm_vq *q, const struct pyvmm_memory *m, int fd, u32 *budget,
                 u32 min_len, u32 num_buffers_at, u8 *spill, u64 spill_len,
                 struct pyvmm_chain *c, struct pyvmm_net_stats *stats, u64 *read)
{
    *read = 0;
    while (*budget) {
        (*budget)--;
        int got = pyvmm_vq_pop(q, m, c);
        if (got != PYVMM_POP_CHAIN)
            return got;
        if (c->error || c->readable || c->writable_len < min_len || c->writable >= IOV_MAX)
            return PYVMM_POP_CHAIN;
        u32 n = c->writable;
        /* iov has room for one more: capacity is twice the queue size, a chain at most one
         * less; the spill goes behind the chain's buffers. */
        struct pyvmm_iovec saved = c->iov[n];
        c->iov[n].base = (u64)spill;
        c->iov[n].len = spill_len;
        long ret = sys_iov(NR_READV, fd, c->iov, n + 1);
        c->iov[n] = saved;
        if (ret < 0) {
            q->next_avail--;        /* the chain goes back: the next pop takes it again */
            if (ret == -11)         /* EAGAIN */
                return -2;
            return (int)(-1000 + ret);
        }
        if ((u64)ret > c->writable_len) {
            *read = (u64)ret;
            return PYVMM_POP_CHAIN;
        }
        u16 one = 1;
        write_bytes(c, 0, n, num_buffers_at, (const u8 *)&one, sizeof(one));
        stats->frames++;
        pyvmm_vq_add_used(q, c->head, (u32)ret);
    }
    return PYVMM_POP_NONE;
}

/* Sizes and offsets of the structs above, in a fixed order, for the unit test that checks them
 * against virtq.py's declarations. */
#define OFF(type, field) ((u64)__builtin_offsetof(type, field))
u32 pyvmm_virtq_layout(u64 *out, u32 max)
{
    const u64 values[] = {
        sizeof(struct pyvmm_region), OFF(struct pyvmm_region, host_addr),
        OFF(struct pyvmm_region, readonly),
        sizeof(struct pyvmm_memory), OFF(struct pyvmm_memory, count),
        sizeof(struct pyvmm_vq), OFF(struct pyvmm_vq, size), OFF(struct pyvmm_vq, next_avail),
        OFF(struct pyvmm_vq, next_used), OFF(struct pyvmm_vq, unsignalled),
        sizeof(struct pyvmm_iovec),
        sizeof(struct pyvmm_chain), OFF(struct pyvmm_chain, error),
        OFF(struct pyvmm_chain, error_addr), OFF(struct pyvmm_chain, iov),
        OFF(struct pyvmm_chain, offset),
        sizeof(struct pyvmm_net_stats), OFF(struct pyvmm_net_stats, last_errno),
        /* The virtio ring layout this file assumes (virtio 1.2, 2.7): in bytes. */
        DESC_SIZE, AVAIL_IDX * 2, AVAIL_RING * 2, USED_IDX_AT, USED_RING_AT, USED_ELEM_SIZE,
    };
    u32 count = sizeof(values) / sizeof(values[0]);
    for (u32 i = 0; i < count && i < max; i++)
        out[i] = values[i];
    return count;
}
