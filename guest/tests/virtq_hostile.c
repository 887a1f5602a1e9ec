/* virtq-hostile: invalid requests on the last virtio-blk disk, one at a time: (1) a data
 * descriptor outside RAM, (2) a descriptor loop, (3) a data descriptor of 0xffffffff bytes,
 * (4) an indirect table holding an indirect descriptor (if INDIRECT_DESC is offered), (5) an
 * avail ring entry naming a head >= the queue size. After each, within ~1 s the device must
 * either return the request (any length; a reachable status byte must not say OK) or set
 * DEVICE_NEEDS_RESET; then it is reset and set up again, and a valid read must succeed.
 * `PROBE virtq-hostile ok <case>:<used|reset>...`; otherwise which case failed and how.
 * (QEMU 7.2 fails case 1: it completes the request with status OK, its DMA to an address with
 * nothing behind it silently dropped.) */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_blk.h"
#include "tests/tests.h"

#define CASE_TIMEOUT_MS 1000
#define OUTSIDE_RAM 0x7ffffffff000ULL
#define HUGE_LEN 0xffffffffu
#define STATUS_UNTOUCHED 0xaa	/* neither OK (0) nor anything a device writes by default */

static struct virtq_area area;
static struct vblk blk;
static struct virtio_blk_req_hdr hdr;
static uint8_t status, nested_status;
static uint8_t buf[SECTOR_SIZE] __attribute__((aligned(4096)));
static struct virtq_desc table1[2] __attribute__((aligned(16)));
static struct virtq_desc table2[2] __attribute__((aligned(16)));

static const char *const case_names[] = {
	NULL, "descriptor outside RAM", "descriptor loop", "0xffffffff-byte descriptor",
	"nested indirect table", "head >= queue size",
};

static struct virtq_desc desc(uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	return (struct virtq_desc){ addr, len, flags, next };
}

/* The end of the highest RAM below 4 GiB: a 4 GiB descriptor starting just below it runs
 * off the end of RAM rather than over the probe, should a device write it anyway. */
static uint64_t low_ram_end(void)
{
	uint64_t top = 0;

	for (uint32_t i = 0; i < boot.e820_count; i++) {
		uint64_t end = boot.e820[i].addr + boot.e820[i].size;

		if (boot.e820[i].type == E820_RAM && boot.e820[i].addr < 4 * GiB && end > top)
			top = end < 4 * GiB ? end : 4 * GiB;
	}
	return top;
}

/* Lay out case n in the queue and make it available; which status byte it can reach. */
static uint8_t *build_case(int n)
{
	struct virtq_desc *d = blk.vq.area->desc;
	uint64_t hdr_addr = (uint64_t)&hdr, status_addr = (uint64_t)&status;

	hdr = (struct virtio_blk_req_hdr){ .type = VIRTIO_BLK_T_IN, .sector = 0 };
	status = nested_status = STATUS_UNTOUCHED;
	switch (n) {
	case 1:
		d[0] = desc(hdr_addr, sizeof(hdr), VIRTQ_DESC_F_NEXT, 1);
		d[1] = desc(OUTSIDE_RAM, SECTOR_SIZE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
		d[2] = desc(status_addr, 1, VIRTQ_DESC_F_WRITE, 0);
		break;
	case 2:
		d[0] = desc(hdr_addr, sizeof(hdr), VIRTQ_DESC_F_NEXT, 1);
		d[1] = desc((uint64_t)buf, SECTOR_SIZE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0);
		break;
	case 3:
		d[0] = desc(hdr_addr, sizeof(hdr), VIRTQ_DESC_F_NEXT, 1);
		d[1] = desc(low_ram_end() - 64 * KiB, HUGE_LEN,
			    VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
		d[2] = desc(status_addr, 1, VIRTQ_DESC_F_WRITE, 0);
		break;
	case 4:
		table2[0] = desc((uint64_t)buf, SECTOR_SIZE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
				 1);
		table2[1] = desc((uint64_t)&nested_status, 1, VIRTQ_DESC_F_WRITE, 0);
		table1[0] = desc(hdr_addr, sizeof(hdr), VIRTQ_DESC_F_NEXT, 1);
		table1[1] = desc((uint64_t)table2, sizeof(table2), VIRTQ_DESC_F_INDIRECT, 0);
		d[0] = desc((uint64_t)table1, sizeof(table1), VIRTQ_DESC_F_INDIRECT, 0);
		break;
	}
	virtq_publish(&blk.vq, n == 5 ? blk.vq.size : 0);
	virtq_kick(&blk.vq);
	return n == 1 || n == 3 ? &status : n == 4 ? &nested_status : NULL;
}

/* Run case n; NULL if the device behaved and recovered, else why not. `how` gets the outcome. */
static const char *run_case(int n, const char **how)
{
	static char why[160];
	uint8_t *reachable = build_case(n), dev_status;
	int rc;

	*how = virtq_await_outcome(&blk.vq, blk.dev, CASE_TIMEOUT_MS, &dev_status);
	if ((*how)[0] == 'n') {
		snprintf(why, sizeof(why), "case %d (%s): neither a used entry nor "
			 "DEVICE_NEEDS_RESET within %u ms (device status 0x%02x)", n,
			 case_names[n], CASE_TIMEOUT_MS, dev_status);
		return why;
	}
	if ((*how)[0] == 'u' && reachable && READ_ONCE(*reachable) == VIRTIO_BLK_S_OK) {
		snprintf(why, sizeof(why), "case %d (%s): returned with status OK", n,
			 case_names[n]);
		return why;
	}
	if (!vblk_open(&blk, blk.dev, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC), &area)) {
		snprintf(why, sizeof(why), "case %d (%s): set-up after reset failed: %s", n,
			 case_names[n], blk.dev->error);
		return why;
	}
	rc = vblk_rw(&blk, VIRTIO_BLK_T_IN, 0, buf, SECTOR_SIZE);
	if (rc != VIRTIO_BLK_S_OK) {
		snprintf(why, sizeof(why), "case %d (%s): then a valid read after reset: %s %d", n,
			 case_names[n], rc == VBLK_TIMEOUT ? "timeout" : "status", rc);
		return why;
	}
	return NULL;
}

void test_virtq_hostile(void)
{
	struct virtio_dev *v = vblk_find(VBLK_LAST);
	char outcome[80] = "";
	size_t used = 0;

	if (!report(v, "no virtio-blk device"))
		return;
	if (!report_after(vblk_open(&blk, v, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC), &area),
			  "set-up of %02x:%02x.%x: %s", v->pci.bus, v->pci.dev, v->pci.fn, v->error))
		return;
	for (int n = 1; n <= 5; n++) {
		const char *how, *why;

		if (n == 4 && !blk.indirect) {
			used += snprintf(outcome + used, sizeof(outcome) - used, " 4:n/a");
			continue;
		}
		why = run_case(n, &how);
		used += snprintf(outcome + used, sizeof(outcome) - used, " %d:%s", n, how);
		if (!report(!why, "%s", why)) {
			/* Try to leave the device usable for the remaining cases. */
			vblk_open(&blk, v, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC), &area);
		}
	}
	report_details("%s", outcome + 1);
	virtio_reset(v);
}
