/* virtio-blk helpers (see lib/virtio_blk.h). */
#include "lib/virtio_blk.h"
#include "lib/io.h"
#include "lib/util.h"

struct virtio_dev *vblk_find_nth(bool read_only, unsigned nth)
{
	struct virtio_dev *v;

	for (unsigned n = 0; (v = virtio_find(VIRTIO_ID_BLOCK, n)); n++) {
		bool ro;

		if (!virtio_begin(v))
			continue;
		ro = v->features & VIRTIO_BIT(VIRTIO_BLK_F_RO);
		virtio_reset(v);
		if (ro == read_only && nth-- == 0)
			return v;
	}
	return NULL;
}

struct virtio_dev *vblk_find(enum vblk_pick pick)
{
	struct virtio_dev *found = NULL, *v;

	if (pick != VBLK_LAST)
		return vblk_find_nth(pick == VBLK_FIRST_READ_ONLY, 0);
	for (unsigned n = 0; (v = virtio_find(VIRTIO_ID_BLOCK, n)); n++)
		found = v;
	return found;
}

bool vblk_open(struct vblk *b, struct virtio_dev *v, uint64_t features, struct virtq_area *area)
{
	return vblk_open_msix(b, v, features, area, VIRTIO_MSI_NO_VECTOR, 0);
}

bool vblk_open_msix(struct vblk *b, struct virtio_dev *v, uint64_t features,
		    struct virtq_area *area, uint16_t msix_entry, uint8_t vector)
{
	memset(b, 0, sizeof(*b));
	b->dev = v;
	if (!virtio_begin(v) || !virtio_negotiate(v, VIRTIO_BIT(VIRTIO_F_VERSION_1) | features))
		return false;
	b->indirect = v->driver_features & VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
	if (!v->device || v->device_len < 8) {
		v->error = "no device configuration (capacity)";
		return false;
	}
	b->capacity = virtio_config_read64(v, VIRTIO_BLK_CFG_CAPACITY);
	if (msix_entry != VIRTIO_MSI_NO_VECTOR) {
		if (!virtio_msix_enable(v, msix_entry, vector))
			return false;
		*(volatile uint16_t *)(v->common + VIRTIO_COMMON_MSIX) = VIRTIO_MSI_NO_VECTOR;
	}
	if (!virtq_setup(&b->vq, v, 0, area, VIRTQ_MAX_SIZE, msix_entry))
		return false;
	virtio_driver_ok(v);
	return true;
}

int vblk_submit(struct vblk *b, struct vblk_req *r, uint32_t type, uint64_t sector, void *data,
		uint32_t len, bool indirect)
{
	struct vbuf bufs[3];
	unsigned n = 0;

	r->hdr = (struct virtio_blk_req_hdr){ .type = type, .sector = sector };
	r->status = VBLK_STATUS_UNSET;
	r->done = false;
	r->len = 0;
	bufs[n++] = (struct vbuf){ (uint64_t)&r->hdr, sizeof(r->hdr), false };
	if (len)
		bufs[n++] = (struct vbuf){ (uint64_t)data, len, type != VIRTIO_BLK_T_OUT };
	bufs[n++] = (struct vbuf){ (uint64_t)&r->status, 1, true };
	if (indirect)
		return virtq_add_indirect(&b->vq, bufs, n, r->table, r);
	return virtq_add(&b->vq, bufs, n, r);
}

struct vblk_req *vblk_complete(struct vblk *b, uint64_t timeout_ms)
{
	void *token;
	uint32_t len;
	struct vblk_req *r;

	if (!virtq_wait(&b->vq, &token, &len, timeout_ms))
		return NULL;
	r = token;
	r->done = true;
	r->len = len;
	return r;
}

int vblk_rw(struct vblk *b, uint32_t type, uint64_t sector, void *data, uint32_t len)
{
	static struct vblk_req req;

	if (vblk_submit(b, &req, type, sector, data, len, false) < 0)
		return VBLK_TIMEOUT;
	virtq_kick(&b->vq);
	if (vblk_complete(b, VBLK_REQ_TIMEOUT_MS) != &req)
		return VBLK_TIMEOUT;
	return READ_ONCE(req.status);
}
