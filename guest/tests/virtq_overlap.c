/* virtq-overlap: queue 0 of the last virtio-blk disk with its used ring overlapping its avail
 * ring. The avail ring (2-byte aligned) starts 2 bytes into a 4-byte word and the used ring
 * (4-byte aligned) 2 bytes after it, so used.flags is avail.idx and used.idx is avail.ring[0]:
 * every NO_NOTIFY the device writes moves avail.idx. VIRTIO_F_EVENT_IDX is not negotiated.
 * After DRIVER_OK one valid read is published and notified. Within ~1 s the device must set
 * DEVICE_NEEDS_RESET (outcome "reset"); a used entry (outcome "used": it accepted the rings)
 * or neither fails. Either way the device is then reset: the write of 0 must return and
 * device_status read 0 (its time is reported), and after a normal set-up a read of sector 0
 * must succeed. `PROBE virtq-overlap ok reset <us> us` (the reset's duration).
 *
 * A VMM that runs such a queue can spin on it forever; the reset write then never returns.
 * The line `PROBE virtq-overlap resetting after <outcome>` comes before it, so a run that
 * stops there shows where the guest is stuck. */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_blk.h"
#include "tests/tests.h"

#define OUTCOME_TIMEOUT_MS 1000
#define AVAIL_OFFSET 2		/* avail ring at area.avail + 2: 2-aligned, not 4-aligned */
#define USED_AFTER_AVAIL 2	/* used ring at avail + 2 (4-aligned): its flags on avail.idx */

static struct virtq_area area;
static struct vblk blk;
static struct vblk_req req;
static uint8_t buf[SECTOR_SIZE] __attribute__((aligned(4096)));

static uint64_t tsc_to_us(uint64_t ticks)
{
	return ticks * 1000 / tsc_per_ms();
}

/* Negotiate VERSION_1 only, queue 0 with the overlapping rings, DRIVER_OK. */
static bool open_overlapped(struct virtio_dev *v)
{
	uint8_t *page = (uint8_t *)&area.avail;
	struct virtq_avail *avail = (struct virtq_avail *)(page + AVAIL_OFFSET);
	struct virtq_used *used = (struct virtq_used *)(page + AVAIL_OFFSET + USED_AFTER_AVAIL);

	memset(&blk, 0, sizeof(blk));
	blk.dev = v;
	if (!virtio_begin(v) || !virtio_negotiate(v, VIRTIO_BIT(VIRTIO_F_VERSION_1)) ||
	    !virtq_setup_rings(&blk.vq, v, 0, &area, avail, used, VIRTQ_MAX_SIZE,
			       VIRTIO_MSI_NO_VECTOR))
		return false;
	virtio_driver_ok(v);
	return true;
}

void test_virtq_overlap(void)
{
	struct virtio_dev *v = vblk_find(VBLK_LAST);
	const char *outcome;
	uint64_t start, reset_us;
	uint8_t dev_status;
	bool reset_ok;
	int rc;

	if (!report(v, "no virtio-blk device"))
		return;
	if (!report_after(open_overlapped(v), "set-up with overlapping rings of %02x:%02x.%x: %s",
			  v->pci.bus, v->pci.dev, v->pci.fn, v->error))
		return;
	if (!report(vblk_submit(&blk, &req, VIRTIO_BLK_T_IN, 0, buf, SECTOR_SIZE, false) == 0,
		    "the request did not get head 0"))
		return;
	virtq_notify(&blk.vq);
	/* The request's head is 0 and used.idx is avail.ring[0], which we set to that head: it
	 * only changes if the device writes a used entry. */
	outcome = virtq_await_outcome(&blk.vq, blk.dev, OUTCOME_TIMEOUT_MS, &dev_status);
	if (outcome[0] == 'u')
		report(false, "device accepted overlapping rings (used.idx %u, status 0x%02x)",
		       READ_ONCE(blk.vq.used->idx), virtio_get_status(v));
	else if (outcome[0] == 'n')
		report(false, "neither DEVICE_NEEDS_RESET nor a used entry within %u ms (device "
		       "status 0x%02x)", OUTCOME_TIMEOUT_MS, dev_status);

	console_printf("PROBE virtq-overlap resetting after %s\n", outcome);
	start = rdtsc();
	reset_ok = virtio_reset(v);
	reset_us = tsc_to_us(rdtsc() - start);
	if (!report(reset_ok, "reset: %s (after %lu us)", v->error, reset_us))
		return;

	if (!report_after(vblk_open(&blk, v, 0, &area), "set-up after reset failed: %s", v->error))
		return;
	rc = vblk_rw(&blk, VIRTIO_BLK_T_IN, 0, buf, SECTOR_SIZE);
	report(rc == VIRTIO_BLK_S_OK, "then a valid read of sector 0: %s %d",
	       rc == VBLK_TIMEOUT ? "timeout" : "status", rc);
	report_details("%s %lu us", outcome, reset_us);
	virtio_reset(v);
}
