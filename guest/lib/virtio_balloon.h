/* virtio-balloon on top of lib/virtio.h (virtio 1.2, 5.5): the host says in the configuration
 * how many 4 KiB pages it wants (num_pages); the driver hands page frame numbers over on the
 * inflate queue, takes them back on the deflate queue, and writes how many the balloon holds
 * (actual).
 *
 * Queues: inflateq (0) and deflateq (1) carry device-readable arrays of le32 PFNs, at most
 * VBALLOON_PFNS_MAX a buffer (as Linux sends them), one buffer at a time, each waited for.
 * Then, numbered consecutively over the negotiated ones (as Linux numbers them; FREE_PAGE_HINT,
 * which would come between, is never negotiated here): statsq (VIRTIO_BALLOON_F_STATS_VQ) holds
 * the one device-readable stats buffer, which the device returns when it wants fresh values;
 * reporting_vq (VIRTIO_BALLOON_F_REPORTING) takes chains of device-writable descriptors, each a
 * free range the device may give back to the host (it reads zero afterwards). Every queue is
 * polled, every wait bounded.
 *
 * Functions that fail leave the reason in b->error; the first device misbehaviour (a buffer
 * not back in time, an entry that was not outstanding, a used length on a buffer the device
 * only reads) is sticky (b->failed). */
#ifndef PROBE_VIRTIO_BALLOON_H
#define PROBE_VIRTIO_BALLOON_H

#include "lib/util.h"
#include "lib/virtio.h"

#define VIRTIO_ID_BALLOON 5

/* Feature bits. */
#define VIRTIO_BALLOON_F_MUST_TELL_HOST 0
#define VIRTIO_BALLOON_F_STATS_VQ 1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM 2
#define VIRTIO_BALLOON_F_FREE_PAGE_HINT 3
#define VIRTIO_BALLOON_F_PAGE_POISON 4
#define VIRTIO_BALLOON_F_REPORTING 5

/* Queues; the optional ones are numbered from VBALLOON_FIRST_OPTIONAL_Q over those present. */
#define VBALLOON_INFLATEQ 0
#define VBALLOON_DEFLATEQ 1
#define VBALLOON_FIRST_OPTIONAL_Q 2

/* The configuration (le32 each). */
#define VBALLOON_CFG_NUM_PAGES 0	/* the device's target, in 4 KiB pages */
#define VBALLOON_CFG_ACTUAL 4		/* the driver's: pages in the balloon */
#define VBALLOON_CFG_SIZE 8

#define VBALLOON_PAGE_SHIFT 12
#define VBALLOON_PAGE_SIZE (1u << VBALLOON_PAGE_SHIFT)
#define VBALLOON_PFNS_MAX 256		/* PFNs in one inflate or deflate buffer */
#define VBALLOON_REPORT_MAX 32		/* descriptors in one report (Linux's capacity) */

/* Stats tags (struct virtio_balloon_stat.tag). */
enum vballoon_stat_tag {
	VBALLOON_S_SWAP_IN = 0,
	VBALLOON_S_SWAP_OUT = 1,
	VBALLOON_S_MAJFLT = 2,
	VBALLOON_S_MINFLT = 3,
	VBALLOON_S_MEMFREE = 4,
	VBALLOON_S_MEMTOT = 5,
	VBALLOON_S_AVAIL = 6,
	VBALLOON_S_CACHES = 7,
	VBALLOON_S_HTLB_PGALLOC = 8,
	VBALLOON_S_HTLB_PGFAIL = 9,
	VBALLOON_S_NR = 10,
};

/* One stat: 10 bytes, packed, little-endian. */
struct virtio_balloon_stat {
	uint16_t tag;
	uint64_t val;
} __attribute__((packed));

_Static_assert(sizeof(struct virtio_balloon_stat) == 10, "virtio_balloon_stat layout");

/* One open device: its queues and the driver-side buffers (a static in the test, in .bss). */
struct vballoon {
	struct virtq_area inflate_area, deflate_area, stats_area, report_area;
	uint32_t pfns[VBALLOON_PFNS_MAX] __attribute__((aligned(64)));
	/* The stats buffer, tags 0 to VBALLOON_S_NR - 1 in order: stats[tag].val is the value
	 * to send. Change it only while the device does not hold it (vballoon_stats_wanted). */
	struct virtio_balloon_stat stats[VBALLOON_S_NR] __attribute__((aligned(64)));
	struct virtio_dev *dev;
	struct virtq inflate, deflate, statsq, reportq;
	bool has_stats, has_reporting;	/* STATS_VQ, REPORTING negotiated */
	uint16_t stats_index, report_index;	/* their queue numbers */
	bool stats_held;		/* the device holds the stats buffer */
	const char *error;		/* why the last call failed */
	bool failed;			/* the device misbehaved (error says how) */
};

/* The first virtio-balloon device, or NULL. */
struct virtio_dev *vballoon_find(void);
/* Reset and set up the device: VERSION_1 and whatever of `features` it offers (the caller
 * checks what it needs in v->driver_features), the queues polled, DRIVER_OK. The stats buffer
 * is not posted yet (vballoon_post_stats). false (b->error) on failure. */
bool vballoon_open(struct vballoon *b, struct virtio_dev *v, uint64_t features);
/* Reset the device. */
void vballoon_stop(struct vballoon *b);

/* The device's target (num_pages): one MMIO read. */
uint32_t vballoon_num_pages(struct vballoon *b);
/* Write actual: one MMIO write. */
void vballoon_set_actual(struct vballoon *b, uint32_t pages);

/* Give n (1 to VBALLOON_PFNS_MAX) PFNs to the device in one buffer and wait up to timeout_ms
 * for it to come back (used length 0). false (b->error) on failure. */
bool vballoon_inflate(struct vballoon *b, const uint32_t *pfns, unsigned n, uint64_t timeout_ms);
/* The same on the deflate queue: the pages are the guest's again once it returns. */
bool vballoon_deflate(struct vballoon *b, const uint32_t *pfns, unsigned n, uint64_t timeout_ms);

/* Make the stats buffer available to the device (at start, and after each request). */
bool vballoon_post_stats(struct vballoon *b);
/* Has the device returned the stats buffer, asking for fresh values? Then the caller updates
 * b->stats and posts it again. Never waits; false with b->failed set if the device returned
 * something that was not outstanding. */
bool vballoon_stats_wanted(struct vballoon *b);

/* Report [addr, addr + bytes) as free: one chain of device-writable descriptors of `chunk`
 * bytes each (the last may be shorter), at most VBALLOON_REPORT_MAX, and wait up to
 * timeout_ms for it to come back. */
bool vballoon_report(struct vballoon *b, uint64_t addr, uint64_t bytes, uint32_t chunk,
		     uint64_t timeout_ms);

#endif
