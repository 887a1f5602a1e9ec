/* blk-discard-bomb: DISCARD and WRITE_ZEROES requests whose segment data adds up to nearly
 * 4 GiB, on the first writable virtio-blk disk offering both (VIRTIO_BLK_F_DISCARD and
 * VIRTIO_BLK_F_WRITE_ZEROES, negotiated). Each request is the 16-byte header, 250 device-
 * readable descriptors of 16 MiB all over one RAM range (3.9 GiB of "segments"), and the
 * status byte: 252 descriptors, through an indirect table if INDIRECT_DESC is offered, else
 * chained; either way no more than the queue size. The segments are far more than
 * max_discard_seg allows, so each request must complete within ~2 s with status IOERR or
 * UNSUPP, 4 of each type in a row, and then a read of sector 0 must succeed.
 * `PROBE blk-discard-bomb ok <indirect|chained> 250x16MiB@<range> discard <status>/<us>us...
 * write-zeroes <status>/<us>us...` (each request's status and time).
 *
 * The range is the highest 16 MiB-aligned block of RAM clear of the probe's image; the guest
 * only zeroes its first 4 KiB (so a device that parsed segments from there would see
 * harmless zero-sector ranges). A VMM that copies the segments into host memory before
 * counting them grows by gigabytes per request; the host test watches its peak RSS. */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_blk.h"
#include "tests/tests.h"

#define SEGMENTS 250
#define SEGMENT_BYTES (16 * MiB)
#define DESCS (SEGMENTS + 2)		/* header, segments, status */
#define REQUESTS_EACH 4
#define PROMPT_MS 10000		/* a hang bound, not a speed test: a fixed VMM takes ~1 ms */
#define GIVE_UP_MS 60000		/* stop waiting: the device is stuck, not just slow */
#define STATUS_POLL_MS 10

static struct virtq_area area;
static struct vblk blk;
static struct virtio_blk_req_hdr hdr;
static uint8_t status;
static uint8_t buf[SECTOR_SIZE] __attribute__((aligned(4096)));
static struct virtq_desc table[DESCS] __attribute__((aligned(16)));
static struct vbuf bufs[DESCS];
static char details[400];
static size_t details_len;

#define DETAIL(...) (details_len += snprintf(details + details_len, \
					      sizeof(details) - details_len, __VA_ARGS__))

/* The first writable disk offering DISCARD and WRITE_ZEROES, or NULL. */
static struct virtio_dev *find_disk(void)
{
	const uint64_t needed = VIRTIO_BIT(VIRTIO_BLK_F_DISCARD) |
				VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES);
	struct virtio_dev *v;

	for (unsigned n = 0; (v = virtio_find(VIRTIO_ID_BLOCK, n)); n++) {
		uint64_t features;

		if (!virtio_begin(v))
			continue;
		features = v->features;
		virtio_reset(v);
		if (!(features & VIRTIO_BIT(VIRTIO_BLK_F_RO)) && (features & needed) == needed)
			return v;
	}
	return NULL;
}

/* The highest SEGMENT_BYTES-aligned block of RAM that misses the probe's image; 0 if none. */
static uint64_t pick_range(void)
{
	uint64_t best = 0, image_start = (uint64_t)_start, image_end = (uint64_t)_end;

	for (uint32_t i = 0; i < boot.e820_count; i++) {
		uint64_t lo = boot.e820[i].addr, hi = lo + boot.e820[i].size;

		if (boot.e820[i].type != E820_RAM || hi < SEGMENT_BYTES)
			continue;
		for (uint64_t block = (hi - SEGMENT_BYTES) & ~(SEGMENT_BYTES - 1);
		     block >= lo && block > best; block -= SEGMENT_BYTES) {
			if (block + SEGMENT_BYTES <= image_start || block >= image_end) {
				best = block;
				break;
			}
		}
	}
	return best;
}

/* One bomb of `type`; false (reported) unless it completed promptly with IOERR or UNSUPP. */
static bool bomb(uint32_t type, const char *name, unsigned n, uint64_t range)
{
	uint64_t start, deadline, next_status = 0, us;
	uint8_t dev_status = 0;
	void *token = NULL;
	int head;

	hdr = (struct virtio_blk_req_hdr){ .type = type, .sector = 0 };
	status = VBLK_STATUS_UNSET;
	bufs[0] = (struct vbuf){ (uint64_t)&hdr, sizeof(hdr), false };
	for (unsigned i = 1; i <= SEGMENTS; i++)
		bufs[i] = (struct vbuf){ range, SEGMENT_BYTES, false };
	bufs[DESCS - 1] = (struct vbuf){ (uint64_t)&status, 1, true };
	if (blk.indirect)
		head = virtq_add_indirect(&blk.vq, bufs, DESCS, table, &hdr);
	else
		head = virtq_add(&blk.vq, bufs, DESCS, &hdr);
	if (!report(head >= 0, "%s %u: no room in the queue", name, n))
		return false;
	start = rdtsc();
	virtq_kick(&blk.vq);
	deadline = deadline_ms(GIVE_UP_MS);
	while (!virtq_poll(&blk.vq, &token, NULL)) {
		if (expired(next_status)) {
			dev_status = virtio_get_status(blk.dev);
			if (!report(!(dev_status & VIRTIO_STATUS_NEEDS_RESET),
				    "%s %u: DEVICE_NEEDS_RESET after %lu ms instead of an error "
				    "status", name, n, ms_since(start)))
				return false;
			next_status = deadline_ms(STATUS_POLL_MS);
		}
		if (!report(!expired(deadline), "%s %u: no completion within %u ms (device status "
			    "0x%02x)", name, n, GIVE_UP_MS, dev_status))
			return false;
		cpu_relax();
	}
	us = (rdtsc() - start) * 1000 / tsc_per_ms();
	DETAIL(" %u/%luus", READ_ONCE(status), us);
	if (!report(token == &hdr, "%s %u: the device completed something else", name, n) ||
	    !report(status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP,
		    "%s %u: status %u, expected IOERR (1) or UNSUPP (2)", name, n, status))
		return false;
	return report(us <= PROMPT_MS * 1000, "%s %u: took %lu ms (status %u), more than %u ms",
		      name, n, us / 1000, status, PROMPT_MS);
}

void test_blk_discard_bomb(void)
{
	const uint64_t features = VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC) |
				  VIRTIO_BIT(VIRTIO_BLK_F_DISCARD) |
				  VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES);
	struct virtio_dev *v = find_disk();
	uint64_t range = pick_range();
	int rc;

	if (!report(v, "no writable virtio-blk disk offering DISCARD and WRITE_ZEROES") ||
	    !report(range, "no %lu MiB block of RAM clear of the probe", SEGMENT_BYTES / MiB))
		return;
	if (!report_after(vblk_open(&blk, v, features, &area), "set-up of %02x:%02x.%x: %s",
			  v->pci.bus, v->pci.dev, v->pci.fn, v->error))
		return;
	memset((void *)range, 0, 4 * KiB);
	details_len = 0;
	DETAIL("%s %ux%luMiB@0x%lx", blk.indirect ? "indirect" : "chained", SEGMENTS,
	       SEGMENT_BYTES / MiB, range);
	DETAIL(" discard");
	for (unsigned n = 1; n <= REQUESTS_EACH; n++)
		if (!bomb(VIRTIO_BLK_T_DISCARD, "discard", n, range))
			goto out;
	DETAIL(" write-zeroes");
	for (unsigned n = 1; n <= REQUESTS_EACH; n++)
		if (!bomb(VIRTIO_BLK_T_WRITE_ZEROES, "write-zeroes", n, range))
			goto out;
	rc = vblk_rw(&blk, VIRTIO_BLK_T_IN, 0, buf, SECTOR_SIZE);
	if (report(rc == VIRTIO_BLK_S_OK, "then a read of sector 0: %s %d",
		   rc == VBLK_TIMEOUT ? "timeout" : "status", rc))
		report_details("%s", details);
out:
	virtio_reset(v);
}
