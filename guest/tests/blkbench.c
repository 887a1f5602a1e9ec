/* blkbench: throughput of the writable virtio-blk disks, no verification.
 * probe.bench=seq|seqw|rand1|rand32 (default seq), probe.bytes=N (default 256 MiB) per disk,
 * probe.disks=D (default 1): the first D writable disks, all busy at once; probe.wait=poll|irq
 * (default poll): spin on the used rings, or halt until a used-buffer interrupt (MSI-X, as a
 * real driver waits; the CPU is then free for the VMM's device threads or processes):
 *   seq    64 KiB reads, up to 8 in flight per disk, over the first N bytes
 *   seqw   64 KiB writes, up to 8 in flight, N bytes, wrapping around the disk; each block
 *          starts with its request number, so the disk changes on every pass
 *   rand1  N/4096 random 4 KiB reads (xorshift over the whole disk), one at a time per disk
 *   rand32 the same with 32 in flight per disk
 * Prints `PROBE blkbench start used 0x<first disk's used ring>` before the first request and
 * `PROBE blkbench ok <mode> <disks> disks <requests> requests <bytes> bytes` (totals over the
 * disks) after the last completion; the host times in between. The disks are polled in turn
 * (one kick per disk per batch). Indirect descriptors (one ring slot per request) and
 * EVENT_IDX (unless probe.eventidx=0) are used when offered. */
#include "lib/clock.h"
#include "lib/cpu.h"
#include "lib/probe.h"
#include "lib/virtio_blk.h"
#include "tests/tests.h"

#define DEFAULT_BYTES (256 * MiB)
#define SEQ_BLOCK (64 * KiB)
#define RAND_BLOCK (4 * KiB)
#define MAX_IN_FLIGHT 32
#define MAX_DISKS 4
#define WATCHDOG_MS 10		/* the longest an irq wait halts without a used-buffer interrupt */

struct disk {
	struct virtio_dev *dev;
	struct vblk blk;
	struct vblk_req reqs[MAX_IN_FLIGHT];
	unsigned free_slots[MAX_IN_FLIGHT], nfree;
	uint64_t requests, submitted, completed, rng_state;
};

static struct virtq_area areas[MAX_DISKS];
static struct disk disks[MAX_DISKS];
/* Per disk: 64 KiB per sequential slot, or 4 KiB per random slot (32 of them in 128 KiB). */
static uint8_t buffers[MAX_DISKS][MAX_IN_FLIGHT / 4][SEQ_BLOCK] __attribute__((aligned(4096)));

static uint64_t xorshift64(uint64_t *state)
{
	*state ^= *state << 13;
	*state ^= *state >> 7;
	*state ^= *state << 17;
	return *state;
}

static bool word_is(const char *value, size_t len, const char *word)
{
	return strlen(word) == len && !memcmp(value, word, len);
}

/* Queue as many requests as the free slots allow, then kick. */
static void refill(struct disk *d, unsigned index, bool seq, bool write, uint64_t block)
{
	uint64_t sectors = block / SECTOR_SIZE;

	while (d->submitted < d->requests && d->nfree) {
		unsigned slot = d->free_slots[d->nfree - 1];
		uint64_t sector = seq ? d->submitted * sectors % (d->blk.capacity / sectors * sectors)
				      : xorshift64(&d->rng_state) % (d->blk.capacity / sectors) * sectors;
		uint8_t *buf = buffers[index][seq ? slot : slot / (SEQ_BLOCK / RAND_BLOCK)] +
			       (seq ? 0 : slot % (SEQ_BLOCK / RAND_BLOCK) * RAND_BLOCK);

		if (write)
			memcpy(buf, &d->submitted, sizeof(d->submitted));
		if (vblk_submit(&d->blk, &d->reqs[slot], write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN,
				sector, buf, block, d->blk.indirect) < 0)
			break;
		d->nfree--;
		d->submitted++;
	}
	virtq_kick(&d->blk.vq);
}

/* Take every completion there is; false (reported) on a failed request. */
static bool reap(struct disk *d, unsigned index, unsigned *taken)
{
	while (d->completed < d->submitted && virtq_has_used(&d->blk.vq)) {
		struct vblk_req *r = vblk_complete(&d->blk, 0);

		if (!report(r && r->status == VIRTIO_BLK_S_OK, "disk %u request %lu: status %u",
			    index, d->completed, r ? r->status : 0))
			return false;
		d->free_slots[d->nfree++] = r - d->reqs;
		d->completed++;
		++*taken;
	}
	return true;
}

void test_blkbench(void)
{
	const char *mode = "seq", *value;
	uint64_t bytes = DEFAULT_BYTES, event_idx = 1, ndisks = 1, block, requests = 0;
	unsigned depth, opened = 0;
	bool irq = false;
	size_t len;

	if (cmdline_find("probe.bench", &value, &len)) {
		if (word_is(value, len, "rand1"))
			mode = "rand1";
		else if (word_is(value, len, "rand32"))
			mode = "rand32";
		else if (word_is(value, len, "seqw"))
			mode = "seqw";
		else if (!report(word_is(value, len, "seq"), "probe.bench: expected seq, seqw, "
				 "rand1 or rand32"))
			return;
	}
	if (cmdline_find("probe.bytes", &value, &len) &&
	    !report(parse_u64(value, len, &bytes) && bytes, "probe.bytes is not a number > 0"))
		return;
	if (cmdline_find("probe.eventidx", &value, &len) &&
	    !report(parse_u64(value, len, &event_idx), "probe.eventidx is not a number"))
		return;
	if (cmdline_find("probe.wait", &value, &len)) {
		irq = word_is(value, len, "irq");
		if (!report(irq || word_is(value, len, "poll"), "probe.wait: expected poll or irq"))
			return;
	}
	if (cmdline_find("probe.disks", &value, &len) &&
	    !report(parse_u64(value, len, &ndisks) && ndisks >= 1 && ndisks <= MAX_DISKS,
		    "probe.disks is not a number from 1 to %u", MAX_DISKS))
		return;

	bool seq = mode[0] == 's', write = seq && mode[3] == 'w';

	block = seq ? SEQ_BLOCK : RAND_BLOCK;
	depth = seq ? 8 : mode[4] == '3' ? 32 : 1;
	/* All found before any is opened: finding one resets the devices it looks at. */
	for (unsigned i = 0; i < ndisks; i++)
		if (!report((disks[i].dev = vblk_find_nth(false, i)) != NULL,
			    "no virtio-blk device without VIRTIO_BLK_F_RO number %u", i))
			return;
	for (; opened < ndisks; opened++) {
		struct disk *d = &disks[opened];
		struct virtio_dev *v = d->dev;
		uint64_t disk_bytes = bytes;

		if (!report_after(vblk_open_msix(&d->blk, v, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC) |
							    (event_idx ? VIRTIO_BIT(VIRTIO_F_EVENT_IDX) : 0),
						 &areas[opened], irq ? 0 : VIRTIO_MSI_NO_VECTOR, MSI_VECTOR),
				  "set-up of %02x:%02x.%x: %s", v->pci.bus, v->pci.dev, v->pci.fn, v->error))
			goto out;
		if (!report(d->blk.capacity >= block / SECTOR_SIZE,
			    "capacity %lu sectors is below one block", d->blk.capacity))
			goto out;
		if (seq && !write && disk_bytes > d->blk.capacity * SECTOR_SIZE)
			disk_bytes = d->blk.capacity * SECTOR_SIZE;
		d->requests = (disk_bytes + block - 1) / block;
		d->rng_state = 0x9e3779b97f4a7c15ULL + opened;
		for (d->nfree = 0; d->nfree < depth; d->nfree++)
			d->free_slots[d->nfree] = depth - 1 - d->nfree;
		requests += d->requests;
	}
	/* Where the first disk's used ring is, so a test can watch it from the host (guest
	 * addresses are physical here). */
	uint32_t interrupts = READ_ONCE(msi_count);

	if (irq)
		lapic_timer_periodic(WATCHDOG_MS);
	console_printf("PROBE blkbench start used 0x%lx\n", (unsigned long)disks[0].blk.vq.used);
	for (uint64_t done = 0; done < requests;) {
		uint64_t deadline = deadline_ms(VBLK_REQ_TIMEOUT_MS);
		unsigned taken = 0;

		for (unsigned i = 0; i < ndisks; i++)
			refill(&disks[i], i, seq, write, block);
		while (!taken) {
			uint32_t seen = READ_ONCE(msi_count);

			for (unsigned i = 0; i < ndisks; i++)
				if (!reap(&disks[i], i, &taken))
					goto out;
			if (taken)
				break;
			if (expired(deadline)) {
				report(false, "no completion within %u ms after %lu of %lu requests "
				       "%s", VBLK_REQ_TIMEOUT_MS, done, requests,
				       virtq_state(&disks[0].blk.vq));
				goto out;
			}
			if (irq)
				irq_wait(seen);
			else
				cpu_relax();
		}
		done += taken;
	}
	interrupts = READ_ONCE(msi_count) - interrupts;
	if (irq && !report(interrupts, "probe.wait=irq: no used-buffer interrupt came (the "
			   "watchdog timer ended every wait)"))
		goto out;
	report_details("%s %lu disks %lu requests %lu bytes", mode, ndisks, requests,
		       requests * block);
out:
	lapic_timer_periodic(0);
	for (unsigned i = 0; i <= opened && i < ndisks; i++) {
		virtio_reset(disks[i].dev);
		virtio_msix_disable(disks[i].dev);
	}
}
