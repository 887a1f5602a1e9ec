/* blkbench: throughput of the first writable virtio-blk disk, no verification.
 * probe.bench=seq|seqw|rand1|rand32 (default seq), probe.bytes=N (default 256 MiB):
 *   seq    64 KiB reads, up to 8 in flight, over the first N bytes
 *   seqw   64 KiB writes, up to 8 in flight, N bytes, wrapping around the disk; each block
 *          starts with its request number, so the disk changes on every pass
 *   rand1  N/4096 random 4 KiB reads (xorshift over the whole disk), one at a time
 *   rand32 the same with 32 in flight
 * Prints `PROBE blkbench start` before the first request and `PROBE blkbench ok <mode>
 * <requests> requests <bytes> bytes` after the last completion; the host times in between.
 * Indirect descriptors (one ring slot per request) and EVENT_IDX (unless probe.eventidx=0)
 * are used when offered. */
#include "lib/probe.h"
#include "lib/virtio_blk.h"
#include "tests/tests.h"

#define DEFAULT_BYTES (256 * MiB)
#define SEQ_BLOCK (64 * KiB)
#define RAND_BLOCK (4 * KiB)
#define MAX_IN_FLIGHT 32

static struct virtq_area area;
static struct vblk blk;
static struct vblk_req reqs[MAX_IN_FLIGHT];
static uint8_t buffers[MAX_IN_FLIGHT / 4][SEQ_BLOCK] __attribute__((aligned(4096)));

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t xorshift64(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static bool word_is(const char *value, size_t len, const char *word)
{
	return strlen(word) == len && !memcmp(value, word, len);
}

void test_blkbench(void)
{
	struct virtio_dev *v = vblk_find(VBLK_FIRST_WRITABLE);
	const char *mode = "seq", *value;
	uint64_t bytes = DEFAULT_BYTES, event_idx = 1, requests, submitted = 0, completed = 0, block, sectors;
	unsigned depth, free_slots[MAX_IN_FLIGHT], nfree;
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
	if (!report(v, "no virtio-blk device without VIRTIO_BLK_F_RO"))
		return;
	if (!report(vblk_open(&blk, v, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC) |
					      (event_idx ? VIRTIO_BIT(VIRTIO_F_EVENT_IDX) : 0), &area),
		    "set-up of %02x:%02x.%x: %s", v->pci.bus, v->pci.dev, v->pci.fn, v->error))
		return;

	bool seq = mode[0] == 's', write = seq && mode[3] == 'w';

	block = seq ? SEQ_BLOCK : RAND_BLOCK;
	sectors = block / SECTOR_SIZE;
	depth = seq ? 8 : mode[4] == '3' ? 32 : 1;
	if (seq && !write && bytes > blk.capacity * SECTOR_SIZE)
		bytes = blk.capacity * SECTOR_SIZE;
	requests = (bytes + block - 1) / block;
	if (!report(blk.capacity >= sectors, "capacity %lu sectors is below one block",
		    blk.capacity))
		goto out;

	for (nfree = 0; nfree < depth; nfree++)
		free_slots[nfree] = depth - 1 - nfree;
	/* Where the used ring is, so a test can watch it from the host (guest addresses are
	 * physical here). */
	console_printf("PROBE blkbench start used 0x%lx\n", (unsigned long)blk.vq.used);
	while (completed < requests) {
		while (submitted < requests && nfree) {
			unsigned slot = free_slots[nfree - 1];
			uint64_t sector = seq ? submitted * sectors % (blk.capacity / sectors * sectors)
					      : xorshift64() % (blk.capacity / sectors) * sectors;
			uint8_t *buf = buffers[seq ? slot : slot / (SEQ_BLOCK / RAND_BLOCK)] +
				       (seq ? 0 : slot % (SEQ_BLOCK / RAND_BLOCK) * RAND_BLOCK);

			if (write)
				memcpy(buf, &submitted, sizeof(submitted));
			if (vblk_submit(&blk, &reqs[slot], write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN,
					sector, buf, block, blk.indirect) < 0)
				break;
			nfree--;
			submitted++;
		}
		virtq_kick(&blk.vq);
		struct vblk_req *r = vblk_complete(&blk, VBLK_REQ_TIMEOUT_MS);

		if (!report(r, "request %lu of %lu: no completion within %u ms %s", completed,
			    requests, VBLK_REQ_TIMEOUT_MS, r ? "" : virtq_state(&blk.vq)))
			goto out;
		if (!report(r->status == VIRTIO_BLK_S_OK, "request %lu: status %u", completed,
			    r->status))
			goto out;
		free_slots[nfree++] = r - reqs;
		completed++;
		/* Take whatever else is done before refilling (one kick per batch). */
		while (completed < submitted && virtq_has_used(&blk.vq)) {
			r = vblk_complete(&blk, 0);
			if (!report(r && r->status == VIRTIO_BLK_S_OK, "request %lu: status %u",
				    completed, r ? r->status : 0))
				goto out;
			free_slots[nfree++] = r - reqs;
			completed++;
		}
	}
	report_details("%s %lu requests %lu bytes", mode, requests, requests * block);
out:
	virtio_reset(v);
}
