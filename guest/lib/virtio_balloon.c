/* virtio-balloon driver (see lib/virtio_balloon.h). */
#include "lib/virtio_balloon.h"
#include "lib/io.h"

#define NO_VECTOR VIRTIO_MSI_NO_VECTOR	/* the queues are polled */

static char why[200];

static void set_error(struct vballoon *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static bool fail(struct vballoon *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A call failed (bad arguments, a full queue): the reason, unless the device failed before. */
static void set_error(struct vballoon *b, const char *fmt, ...)
{
	va_list ap;

	if (b->failed)
		return;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	b->error = why;
}

/* The device misbehaved: the first reason sticks. Returns false. */
static bool fail(struct vballoon *b, const char *fmt, ...)
{
	va_list ap;

	if (b->failed)
		return false;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	b->error = why;
	b->failed = true;
	return false;
}

struct virtio_dev *vballoon_find(void)
{
	return virtio_find(VIRTIO_ID_BALLOON, 0);
}

bool vballoon_open(struct vballoon *b, struct virtio_dev *v, uint64_t features)
{
	uint16_t next = VBALLOON_FIRST_OPTIONAL_Q;

	b->dev = v;
	b->error = NULL;
	b->failed = false;
	b->stats_held = false;
	if (!virtio_begin(v) || !virtio_negotiate(v, VIRTIO_BIT(VIRTIO_F_VERSION_1) | features)) {
		set_error(b, "%s", v->error);
		return false;
	}
	if (!v->device || v->device_len < VBALLOON_CFG_SIZE) {
		set_error(b, "no device configuration (num_pages, actual)");
		return false;
	}
	b->has_stats = v->driver_features & VIRTIO_BIT(VIRTIO_BALLOON_F_STATS_VQ);
	b->has_reporting = v->driver_features & VIRTIO_BIT(VIRTIO_BALLOON_F_REPORTING);
	b->stats_index = b->has_stats ? next++ : 0;
	b->report_index = b->has_reporting ? next++ : 0;
	if (!virtq_setup(&b->inflate, v, VBALLOON_INFLATEQ, &b->inflate_area, VIRTQ_MAX_SIZE,
			 NO_VECTOR) ||
	    !virtq_setup(&b->deflate, v, VBALLOON_DEFLATEQ, &b->deflate_area, VIRTQ_MAX_SIZE,
			 NO_VECTOR) ||
	    (b->has_stats && !virtq_setup(&b->statsq, v, b->stats_index, &b->stats_area,
					  VIRTQ_MAX_SIZE, NO_VECTOR)) ||
	    (b->has_reporting && !virtq_setup(&b->reportq, v, b->report_index, &b->report_area,
					      VIRTQ_MAX_SIZE, NO_VECTOR))) {
		set_error(b, "%s", v->error);
		return false;
	}
	for (unsigned tag = 0; tag < VBALLOON_S_NR; tag++)
		b->stats[tag] = (struct virtio_balloon_stat){ .tag = tag, .val = 0 };
	virtio_driver_ok(v);
	return true;
}

void vballoon_stop(struct vballoon *b)
{
	if (b->dev)
		virtio_reset(b->dev);
}

uint32_t vballoon_num_pages(struct vballoon *b)
{
	return virtio_config_read32(b->dev, VBALLOON_CFG_NUM_PAGES);
}

void vballoon_set_actual(struct vballoon *b, uint32_t pages)
{
	*(volatile uint32_t *)(b->dev->device + VBALLOON_CFG_ACTUAL) = pages;
}

/* One buffer of n PFNs on vq ("inflate" or "deflate"), waited for. */
static bool tell(struct vballoon *b, struct virtq *vq, const char *what, const uint32_t *pfns,
		 unsigned n, uint64_t timeout_ms)
{
	struct vbuf buf = { (uint64_t)b->pfns, n * sizeof(uint32_t), false };
	void *token;
	uint32_t len;

	if (b->failed)
		return false;
	if (n == 0 || n > VBALLOON_PFNS_MAX) {
		set_error(b, "%u PFNs for one %s buffer (1 to %u)", n, what, VBALLOON_PFNS_MAX);
		return false;
	}
	memcpy(b->pfns, pfns, n * sizeof(uint32_t));
	if (virtq_add(vq, &buf, 1, b->pfns) < 0) {
		set_error(b, "no free descriptor on the %s queue", what);
		return false;
	}
	virtq_kick(vq);
	if (!virtq_wait(vq, &token, &len, timeout_ms))
		return fail(b, "the %s buffer (%u PFNs from 0x%x) did not come back within %lu "
			    "ms %s", what, n, pfns[0], timeout_ms, virtq_state(vq));
	if (vq->bad_used || token != b->pfns)
		return fail(b, "the device returned a %s buffer that was not outstanding", what);
	if (len)
		return fail(b, "the %s buffer came back with used length %u, not 0 (the device "
			    "only reads it)", what, len);
	return true;
}

bool vballoon_inflate(struct vballoon *b, const uint32_t *pfns, unsigned n, uint64_t timeout_ms)
{
	return tell(b, &b->inflate, "inflate", pfns, n, timeout_ms);
}

bool vballoon_deflate(struct vballoon *b, const uint32_t *pfns, unsigned n, uint64_t timeout_ms)
{
	return tell(b, &b->deflate, "deflate", pfns, n, timeout_ms);
}

bool vballoon_post_stats(struct vballoon *b)
{
	struct vbuf buf = { (uint64_t)b->stats, sizeof(b->stats), false };

	if (!b->has_stats || b->stats_held) {
		set_error(b, b->has_stats ? "the device holds the stats buffer already"
					  : "VIRTIO_BALLOON_F_STATS_VQ was not negotiated");
		return false;
	}
	if (virtq_add(&b->statsq, &buf, 1, b->stats) < 0) {
		set_error(b, "no free descriptor on the stats queue");
		return false;
	}
	b->stats_held = true;
	virtq_kick(&b->statsq);
	return true;
}

bool vballoon_stats_wanted(struct vballoon *b)
{
	void *token;

	if (!b->has_stats || !virtq_poll(&b->statsq, &token, NULL)) {
		if (b->has_stats && b->statsq.bad_used)
			fail(b, "the device returned a stats buffer that was not outstanding");
		return false;
	}
	if (b->statsq.bad_used || token != b->stats)
		return fail(b, "the device returned a stats buffer that was not outstanding");
	b->stats_held = false;
	return true;
}

bool vballoon_report(struct vballoon *b, uint64_t addr, uint64_t bytes, uint32_t chunk,
		     uint64_t timeout_ms)
{
	struct vbuf bufs[VBALLOON_REPORT_MAX];
	unsigned n = 0;
	void *token;

	if (b->failed)
		return false;
	if (!b->has_reporting) {
		set_error(b, "VIRTIO_BALLOON_F_REPORTING was not negotiated");
		return false;
	}
	for (uint64_t off = 0; off < bytes; off += chunk) {
		if (n == VBALLOON_REPORT_MAX || !chunk) {
			set_error(b, "0x%lx bytes in chunks of 0x%x: over %u descriptors", bytes,
				  chunk, VBALLOON_REPORT_MAX);
			return false;
		}
		bufs[n++] = (struct vbuf){ addr + off, bytes - off < chunk ? bytes - off : chunk,
					   true };
	}
	if (!n || virtq_add(&b->reportq, bufs, n, bufs) < 0) {
		set_error(b, "no room for a %u-descriptor report", n);
		return false;
	}
	virtq_kick(&b->reportq);
	if (!virtq_wait(&b->reportq, &token, NULL, timeout_ms))
		return fail(b, "the report of 0x%lx bytes at 0x%lx did not come back within %lu "
			    "ms %s", bytes, addr, timeout_ms, virtq_state(&b->reportq));
	if (b->reportq.bad_used || token != bufs)
		return fail(b, "the device returned a report that was not outstanding");
	return true;
}
