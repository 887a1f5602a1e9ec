/* virtio-blk on top of lib/virtio.h: finding a disk, setting it up with one polled queue,
 * building requests (header, data, status; as a chain or through an indirect table). */
#ifndef PROBE_VIRTIO_BLK_H
#define PROBE_VIRTIO_BLK_H

#include "lib/virtio.h"

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define VIRTIO_BLK_CFG_CAPACITY 0	/* le64, in 512-byte sectors */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512
#define VBLK_STATUS_UNSET 0xff		/* what status holds until the device writes it */
#define VBLK_TIMEOUT (-1)		/* vblk_rw: no completion in time */
#define VBLK_REQ_TIMEOUT_MS 5000

struct virtio_blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* The driver-side memory of one request: it must stay put until the request completes. */
struct vblk_req {
	struct virtq_desc table[4] __attribute__((aligned(16)));	/* for indirect requests */
	struct virtio_blk_req_hdr hdr;
	uint8_t status;
	bool done;
	uint32_t len;		/* the used length the device reported */
};

struct vblk {
	struct virtio_dev *dev;
	struct virtq vq;
	uint64_t capacity;	/* sectors */
	bool indirect;		/* VIRTIO_F_INDIRECT_DESC negotiated */
};

/* Which blk device: the first without VIRTIO_BLK_F_RO, the first with it, or the last one. */
enum vblk_pick { VBLK_FIRST_WRITABLE, VBLK_FIRST_READ_ONLY, VBLK_LAST };
struct virtio_dev *vblk_find(enum vblk_pick pick);
/* The nth (from 0) blk device with (read_only) or without VIRTIO_BLK_F_RO, or NULL. */
struct virtio_dev *vblk_find_nth(bool read_only, unsigned nth);

/* Negotiate VERSION_1 plus `features` (as offered), set up queue 0 in `area`, DRIVER_OK. */
bool vblk_open(struct vblk *b, struct virtio_dev *v, uint64_t features, struct virtq_area *area);
/* The same with the queue's used-buffer interrupts on: MSI-X table entry msix_entry (enabled,
 * pointing at this CPU's `vector`); the config change interrupt stays off. */
bool vblk_open_msix(struct vblk *b, struct virtio_dev *v, uint64_t features,
		    struct virtq_area *area, uint16_t msix_entry, uint8_t vector);

/* Queue one request (no kick): header, then data (len 0: none; device-writable unless type is
 * OUT) in one descriptor, then status. Through r->table if indirect. Returns the head or -1. */
int vblk_submit(struct vblk *b, struct vblk_req *r, uint32_t type, uint64_t sector, void *data,
		uint32_t len, bool indirect);
/* Wait for the next completion: marks its request done (len set) and returns it, or NULL. */
struct vblk_req *vblk_complete(struct vblk *b, uint64_t timeout_ms);
/* One request, synchronously: the status byte, or VBLK_TIMEOUT. */
int vblk_rw(struct vblk *b, uint32_t type, uint64_t sector, void *data, uint32_t len);

#endif
