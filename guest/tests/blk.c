/* blk: the first virtio-blk disk without VIRTIO_BLK_F_RO, whose first 1 MiB the host filled
 * with byte (s + i) & 0xff at byte i of sector s. Reads in several request shapes (3-descriptor
 * chain; 8 sectors in one descriptor; data and status sharing a descriptor; data split over 4
 * descriptors; indirect tables if offered), 8 requests in flight at once, writes of sectors
 * 2048-2303 with (s * 3 + i) & 0xff read back, FLUSH (if offered), GET_ID, and a read at
 * sector == capacity that must fail with IOERR. `PROBE blk ok <capacity> sectors serial <id>`.
 *
 * blk-ro: the first disk with VIRTIO_BLK_F_RO: a read works, a write of sector 0 fails with
 * IOERR and leaves the sector as it was. `PROBE blk-ro ok`. */
#include "lib/probe.h"
#include "lib/virtio_blk.h"
#include "tests/tests.h"

#define PATTERN_SECTORS 2048		/* the first 1 MiB */
#define WRITE_FIRST 2048
#define WRITE_SECTORS 256
#define IN_FLIGHT 8

static struct virtq_area area;
static struct vblk blk;
static uint8_t big[PATTERN_SECTORS * SECTOR_SIZE] __attribute__((aligned(4096)));
static uint8_t small[16 * SECTOR_SIZE + 64] __attribute__((aligned(4096)));
static struct vblk_req reqs[IN_FLIGHT];
static struct virtq_desc table[8] __attribute__((aligned(16)));

static uint8_t read_pattern(uint64_t s, unsigned i)
{
	return (s + i) & 0xff;
}

static uint8_t write_pattern(uint64_t s, unsigned i)
{
	return (s * 3 + i) & 0xff;
}

/* Does buf hold sectors [first, first + count) of the pattern? Reports the first mismatch. */
static bool verify(const uint8_t *buf, uint64_t first, unsigned count,
		   uint8_t (*pattern)(uint64_t, unsigned), const char *what)
{
	for (unsigned s = 0; s < count; s++)
		for (unsigned i = 0; i < SECTOR_SIZE; i++) {
			uint8_t want = pattern(first + s, i), got = buf[s * SECTOR_SIZE + i];

			if (!report(got == want, "%s: sector %lu byte %u is 0x%02x, expected 0x%02x",
				    what, first + s, i, got, want))
				return false;
		}
	return true;
}

/* Wait for one request we queued (and kicked) alone; check status OK and the used length. */
static bool finish_one(struct vblk_req *r, uint32_t data_len, const char *what)
{
	struct vblk_req *done = vblk_complete(&blk, VBLK_REQ_TIMEOUT_MS);

	if (!report(done, "%s: no completion within %u ms %s", what, VBLK_REQ_TIMEOUT_MS,
		    done ? "" : virtq_state(&blk.vq)))
		return false;
	if (!report(done == r, "%s: the device completed another request", what))
		return false;
	if (!report(r->status == VIRTIO_BLK_S_OK, "%s: status %u", what, r->status))
		return false;
	return report(r->len == data_len + 1,
		      "%s: used length %u, expected %u (data + status byte)", what, r->len,
		      data_len + 1);
}

static bool read_shapes(void)
{
	struct vbuf bufs[6];
	struct vblk_req *r = &reqs[0];
	int head;

	/* Header / one sector / status. */
	memset(small, 0, sizeof(small));
	vblk_submit(&blk, r, VIRTIO_BLK_T_IN, 5, small, SECTOR_SIZE, false);
	virtq_kick(&blk.vq);
	if (!finish_one(r, SECTOR_SIZE, "1-sector read") ||
	    !verify(small, 5, 1, read_pattern, "1-sector read"))
		return false;

	/* 8 sectors in one descriptor. */
	memset(small, 0, sizeof(small));
	vblk_submit(&blk, r, VIRTIO_BLK_T_IN, 100, small, 8 * SECTOR_SIZE, false);
	virtq_kick(&blk.vq);
	if (!finish_one(r, 8 * SECTOR_SIZE, "8-sector read") ||
	    !verify(small, 100, 8, read_pattern, "8-sector read"))
		return false;

	/* Header / data and status in one device-writable descriptor (any layout, virtio 1.x). */
	memset(small, 0xee, sizeof(small));
	r->hdr = (struct virtio_blk_req_hdr){ .type = VIRTIO_BLK_T_IN, .sector = 7 };
	bufs[0] = (struct vbuf){ (uint64_t)&r->hdr, sizeof(r->hdr), false };
	bufs[1] = (struct vbuf){ (uint64_t)small, SECTOR_SIZE + 1, true };
	head = virtq_add(&blk.vq, bufs, 2, r);
	virtq_kick(&blk.vq);
	if (!report(head >= 0 && vblk_complete(&blk, VBLK_REQ_TIMEOUT_MS) == r,
		    "data+status in one descriptor: no completion"))
		return false;
	if (!report(small[SECTOR_SIZE] == VIRTIO_BLK_S_OK,
		    "data+status in one descriptor: status byte (after the data) is 0x%02x",
		    small[SECTOR_SIZE]) ||
	    !verify(small, 7, 1, read_pattern, "data+status in one descriptor"))
		return false;

	/* Header / 4 single-sector descriptors / status: a 6-descriptor chain. */
	memset(small, 0, sizeof(small));
	r->hdr = (struct virtio_blk_req_hdr){ .type = VIRTIO_BLK_T_IN, .sector = 200 };
	r->status = VBLK_STATUS_UNSET;
	bufs[0] = (struct vbuf){ (uint64_t)&r->hdr, sizeof(r->hdr), false };
	for (int k = 0; k < 4; k++)	/* out of order in memory, on purpose */
		bufs[1 + k] = (struct vbuf){ (uint64_t)small + (3 - k) * SECTOR_SIZE, SECTOR_SIZE,
					     true };
	bufs[5] = (struct vbuf){ (uint64_t)&r->status, 1, true };
	virtq_add(&blk.vq, bufs, 6, r);
	virtq_kick(&blk.vq);
	if (!finish_one(r, 4 * SECTOR_SIZE, "4-descriptor data read"))
		return false;
	for (int k = 0; k < 4; k++)
		if (!verify(small + (3 - k) * SECTOR_SIZE, 200 + k, 1, read_pattern,
			    "4-descriptor data read"))
			return false;

	if (!blk.indirect)
		return true;
	/* Indirect: header / 8 sectors / status in a table. */
	memset(small, 0, sizeof(small));
	vblk_submit(&blk, r, VIRTIO_BLK_T_IN, 300, small, 8 * SECTOR_SIZE, true);
	virtq_kick(&blk.vq);
	if (!finish_one(r, 8 * SECTOR_SIZE, "indirect read") ||
	    !verify(small, 300, 8, read_pattern, "indirect read"))
		return false;
	/* Indirect, the data split over 4 descriptors in the table. */
	memset(small, 0, sizeof(small));
	r->hdr = (struct virtio_blk_req_hdr){ .type = VIRTIO_BLK_T_IN, .sector = 2044 };
	r->status = VBLK_STATUS_UNSET;
	for (int k = 0; k < 4; k++)
		bufs[1 + k] = (struct vbuf){ (uint64_t)small + k * SECTOR_SIZE, SECTOR_SIZE, true };
	virtq_add_indirect(&blk.vq, bufs, 6, table, r);
	virtq_kick(&blk.vq);
	return finish_one(r, 4 * SECTOR_SIZE, "indirect 6-entry read") &&
	       verify(small, 2044, 4, read_pattern, "indirect 6-entry read");
}

/* IN_FLIGHT requests of `sectors` each from `first`, all queued before one kick. */
static bool in_flight(uint32_t type, uint64_t first, unsigned sectors, uint8_t *buf,
		      const char *what)
{
	unsigned done = 0;

	for (unsigned k = 0; k < IN_FLIGHT; k++)
		if (!report(vblk_submit(&blk, &reqs[k], type, first + k * sectors,
					buf + (uint64_t)k * sectors * SECTOR_SIZE,
					sectors * SECTOR_SIZE, blk.indirect && (k & 1)) >= 0,
			    "%s: no room for request %u in a queue of %u", what, k, blk.vq.size))
			return false;
	virtq_kick(&blk.vq);
	for (; done < IN_FLIGHT; done++) {
		struct vblk_req *r = vblk_complete(&blk, VBLK_REQ_TIMEOUT_MS);

		if (!report(r, "%s: %u of %u requests completed within %u ms %s", what, done,
			    IN_FLIGHT, VBLK_REQ_TIMEOUT_MS, r ? "" : virtq_state(&blk.vq)))
			return false;
		if (!report(r->status == VIRTIO_BLK_S_OK, "%s: request %ld status %u", what,
			    r - reqs, r->status))
			return false;
	}
	return report(!blk.vq.bad_used, "%s: the device returned an id that was not in flight",
		      what);
}

static void get_id(char *serial)
{
	uint8_t id[VIRTIO_BLK_ID_BYTES + 1];
	int status;
	unsigned n = 0;

	memset(id, 0, sizeof(id));
	status = vblk_rw(&blk, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES);
	if (!report(status == VIRTIO_BLK_S_OK, "GET_ID: status %d", status))
		return;
	for (; n < VIRTIO_BLK_ID_BYTES && id[n]; n++) {
		if (!report(id[n] > 0x20 && id[n] < 0x7f, "GET_ID: byte %u is 0x%02x", n, id[n]))
			return;
		serial[n] = id[n];
	}
	for (unsigned k = n; k < VIRTIO_BLK_ID_BYTES; k++)
		if (!report(id[k] == 0, "GET_ID: byte %u after the NUL is 0x%02x", k, id[k]))
			return;
	if (!n)
		serial[n++] = '-';
	serial[n] = '\0';
}

void test_blk(void)
{
	struct virtio_dev *v = vblk_find(VBLK_FIRST_WRITABLE);
	char serial[VIRTIO_BLK_ID_BYTES + 1] = "";
	int status;

	if (!report(v, "no virtio-blk device without VIRTIO_BLK_F_RO"))
		return;
	if (!report_after(vblk_open(&blk, v, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC) |
						    VIRTIO_BIT(VIRTIO_BLK_F_FLUSH), &area),
			  "set-up of %02x:%02x.%x: %s", v->pci.bus, v->pci.dev, v->pci.fn, v->error))
		return;
	if (!report(blk.capacity >= WRITE_FIRST + WRITE_SECTORS,
		    "capacity %lu sectors, the test needs %u", blk.capacity,
		    WRITE_FIRST + WRITE_SECTORS))
		goto out;
	if (!read_shapes())
		goto out;

	memset(big, 0, sizeof(big));
	if (!in_flight(VIRTIO_BLK_T_IN, 0, PATTERN_SECTORS / IN_FLIGHT, big, "1 MiB in 8 reads") ||
	    !verify(big, 0, PATTERN_SECTORS, read_pattern, "1 MiB in 8 reads"))
		goto out;

	for (unsigned s = 0; s < WRITE_SECTORS; s++)
		for (unsigned i = 0; i < SECTOR_SIZE; i++)
			big[s * SECTOR_SIZE + i] = write_pattern(WRITE_FIRST + s, i);
	if (!in_flight(VIRTIO_BLK_T_OUT, WRITE_FIRST, WRITE_SECTORS / IN_FLIGHT, big, "8 writes"))
		goto out;
	if (v->driver_features & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH)) {
		status = vblk_rw(&blk, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
		if (!report(status == VIRTIO_BLK_S_OK, "FLUSH: status %d", status))
			goto out;
	}
	memset(big, 0, WRITE_SECTORS * SECTOR_SIZE);
	if (!in_flight(VIRTIO_BLK_T_IN, WRITE_FIRST, WRITE_SECTORS / IN_FLIGHT, big,
		       "reading the writes back") ||
	    !verify(big, WRITE_FIRST, WRITE_SECTORS, write_pattern, "reading the writes back"))
		goto out;

	get_id(serial);
	status = vblk_rw(&blk, VIRTIO_BLK_T_IN, blk.capacity, small, SECTOR_SIZE);
	report(status == VIRTIO_BLK_S_IOERR, "a read at sector %lu (== capacity): status %d, "
	       "expected IOERR (1)", blk.capacity, status);
	report_details("%lu sectors serial %s", blk.capacity, serial);
out:
	virtio_reset(v);
}

void test_blk_ro(void)
{
	struct virtio_dev *v = vblk_find(VBLK_FIRST_READ_ONLY);
	int status;

	if (!report(v, "no virtio-blk device with VIRTIO_BLK_F_RO"))
		return;
	if (!report_after(vblk_open(&blk, v, VIRTIO_BIT(VIRTIO_BLK_F_RO), &area),
			  "set-up of %02x:%02x.%x: %s", v->pci.bus, v->pci.dev, v->pci.fn, v->error))
		return;
	status = vblk_rw(&blk, VIRTIO_BLK_T_IN, 0, small, SECTOR_SIZE);
	if (!report(status == VIRTIO_BLK_S_OK, "read of sector 0: status %d", status))
		goto out;
	for (unsigned i = 0; i < SECTOR_SIZE; i++)
		small[SECTOR_SIZE + i] = ~small[i];
	status = vblk_rw(&blk, VIRTIO_BLK_T_OUT, 0, small + SECTOR_SIZE, SECTOR_SIZE);
	if (!report(status == VIRTIO_BLK_S_IOERR, "write of sector 0: status %d, expected IOERR",
		    status))
		goto out;
	status = vblk_rw(&blk, VIRTIO_BLK_T_IN, 0, small + 2 * SECTOR_SIZE, SECTOR_SIZE);
	report(status == VIRTIO_BLK_S_OK && !memcmp(small, small + 2 * SECTOR_SIZE, SECTOR_SIZE),
	       "sector 0 after the failed write: status %d, %s", status,
	       status == VIRTIO_BLK_S_OK ? "contents changed" : "read failed");
out:
	virtio_reset(v);
}
