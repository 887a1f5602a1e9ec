/* A small modern (virtio 1.x) virtio-pci driver: device discovery from the vendor capabilities,
 * the initialization sequence (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
 * DRIVER_OK), split virtqueues polled by the driver, MSI-X optional.
 *
 * Costs shape it: on PVM every MMIO access from CPL3 is an exit (~66 us), ring memory is free.
 * Set-up does a few dozen MMIO accesses; a request costs exactly one, the notify write (none
 * when the device says VIRTQ_USED_F_NO_NOTIFY). Completions are found by polling the used
 * ring, bounded by a TSC deadline (lib/clock.h). */
#ifndef PROBE_VIRTIO_H
#define PROBE_VIRTIO_H

#include <stdbool.h>
#include <stdint.h>

#include "lib/pci.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_MODERN_BASE 0x1040	/* device ID = 0x1040 + virtio device type */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_MAX_DEVICES 16

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Feature bits shared by all devices. */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BIT(n) (UINT64_C(1) << (n))

/* virtio_pci_cap cfg_type values. */
enum virtio_cap_type {
	VIRTIO_PCI_CAP_COMMON_CFG = 1,
	VIRTIO_PCI_CAP_NOTIFY_CFG = 2,
	VIRTIO_PCI_CAP_ISR_CFG = 3,
	VIRTIO_PCI_CAP_DEVICE_CFG = 4,
	VIRTIO_PCI_CAP_PCI_CFG = 5,
};

/* Offsets within a vendor capability (struct virtio_pci_cap, virtio_pci_notify_cap). */
#define VIRTIO_CAP_LEN 2
#define VIRTIO_CAP_CFG_TYPE 3
#define VIRTIO_CAP_BAR 4
#define VIRTIO_CAP_OFFSET 8
#define VIRTIO_CAP_LENGTH 12
#define VIRTIO_CAP_NOTIFY_MULT 16
#define VIRTIO_CAP_SIZE 16
#define VIRTIO_NOTIFY_CAP_SIZE 20

/* The common configuration structure (offsets). */
enum virtio_common_reg {
	VIRTIO_COMMON_DFSELECT = 0x00,
	VIRTIO_COMMON_DF = 0x04,
	VIRTIO_COMMON_GFSELECT = 0x08,
	VIRTIO_COMMON_GF = 0x0c,
	VIRTIO_COMMON_MSIX = 0x10,
	VIRTIO_COMMON_NUMQ = 0x12,
	VIRTIO_COMMON_STATUS = 0x14,
	VIRTIO_COMMON_CFGGENERATION = 0x15,
	VIRTIO_COMMON_Q_SELECT = 0x16,
	VIRTIO_COMMON_Q_SIZE = 0x18,
	VIRTIO_COMMON_Q_MSIX = 0x1a,
	VIRTIO_COMMON_Q_ENABLE = 0x1c,
	VIRTIO_COMMON_Q_NOFF = 0x1e,
	VIRTIO_COMMON_Q_DESCLO = 0x20,
	VIRTIO_COMMON_Q_DESCHI = 0x24,
	VIRTIO_COMMON_Q_AVAILLO = 0x28,
	VIRTIO_COMMON_Q_AVAILHI = 0x2c,
	VIRTIO_COMMON_Q_USEDLO = 0x30,
	VIRTIO_COMMON_Q_USEDHI = 0x34,
	VIRTIO_COMMON_SIZE = 0x38,
};

#define VIRTIO_MSI_NO_VECTOR 0xffff

/* A modern virtio-pci function, as found by virtio_devices(). */
struct virtio_dev {
	struct pci_dev pci;
	uint16_t type;			/* virtio device type */
	struct pci_bar bar[PCI_NUM_BARS];
	volatile uint8_t *common, *isr, *device, *notify;
	uint32_t device_len, notify_len, notify_mult;
	uint8_t msix_cap;		/* config offset of the MSI-X capability, 0 if none */
	uint16_t msix_entries;
	volatile uint32_t *msix_table;
	uint64_t features;		/* what the device offers (after virtio_begin) */
	uint64_t driver_features;	/* what we accepted */
	const char *error;		/* why the last call failed */
};

/* All modern virtio-pci devices on bus 0, in slot order (scanned once, cached). Devices whose
 * capabilities are unusable are left out (their count in *broken, if given). Enables memory
 * decoding and bus mastering, assigning unassigned BARs. */
struct virtio_dev *virtio_devices(unsigned *count);
/* The n-th (from 0) device of a type, or NULL. */
struct virtio_dev *virtio_find(uint16_t type, unsigned n);

uint8_t virtio_get_status(struct virtio_dev *v);
void virtio_set_status(struct virtio_dev *v, uint8_t status);
/* Write 0 to device_status and wait (bounded) until it reads back 0. */
bool virtio_reset(struct virtio_dev *v);
/* Reset, ACKNOWLEDGE, DRIVER; read the 64 device feature bits into v->features. */
bool virtio_begin(struct virtio_dev *v);
/* Accept `wanted & v->features` (VERSION_1 must be among them), set FEATURES_OK, check that
 * it stuck. On failure sets FAILED. */
bool virtio_negotiate(struct virtio_dev *v, uint64_t wanted);
void virtio_driver_ok(struct virtio_dev *v);

/* Device configuration space reads, retried until config_generation is stable. */
uint32_t virtio_config_read32(struct virtio_dev *v, uint32_t offset);
uint64_t virtio_config_read64(struct virtio_dev *v, uint32_t offset);
uint8_t virtio_config_read8(struct virtio_dev *v, uint32_t offset);

/* MSI-X: enable the function's MSI-X with table entry `entry` sending `vector` to this CPU's
 * local APIC; disable turns MSI-X off again. */
bool virtio_msix_enable(struct virtio_dev *v, unsigned entry, uint8_t vector);
void virtio_msix_disable(struct virtio_dev *v);

/* ---- Split virtqueues ---- */

#define VIRTQ_MAX_SIZE 256
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VIRTQ_MAX_SIZE + 1];	/* + used_event, at ring[size] */
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[VIRTQ_MAX_SIZE];
	uint16_t avail_event;			/* really at &ring[size] */
};

/* The memory of one queue: three 4 KiB-aligned parts (a static in the test, in .bss). */
struct virtq_area {
	struct virtq_desc desc[VIRTQ_MAX_SIZE] __attribute__((aligned(4096)));
	struct virtq_avail avail __attribute__((aligned(4096)));
	struct virtq_used used __attribute__((aligned(4096)));
} __attribute__((aligned(4096)));

struct virtq {
	struct virtio_dev *dev;
	struct virtq_area *area;
	struct virtq_avail *avail;	/* &area->avail unless placed by virtq_setup_rings */
	struct virtq_used *used;	/* &area->used likewise */
	volatile uint16_t *notify;
	uint16_t index, size;
	uint16_t free_head, num_free;
	uint16_t avail_idx;		/* next avail->idx */
	uint16_t last_used;		/* used entries consumed */
	uint16_t chain_len[VIRTQ_MAX_SIZE];	/* descriptors in the chain at a head; 0: free */
	void *token[VIRTQ_MAX_SIZE];
	bool bad_used;			/* the device returned an id that was not outstanding */
	bool event_idx;			/* VIRTIO_F_EVENT_IDX negotiated */
	bool interrupts;		/* has an MSI-X vector: ask for used-buffer interrupts */
	uint16_t kicked_idx;		/* avail->idx at the last kick (EVENT_IDX) */
};

/* A driver buffer for virtq_add: device-readable, or device-writable with `write`. */
struct vbuf {
	uint64_t addr;
	uint32_t len;
	bool write;
};

/* Select queue `index`, size it min(device's, max_size) (a power of two), place it in area,
 * give it MSI-X vector msix (VIRTIO_MSI_NO_VECTOR: none, and ask for no interrupts), enable.
 * Uses VIRTIO_F_EVENT_IDX (used_event/avail_event) if it was negotiated, else the flags. */
bool virtq_setup(struct virtq *vq, struct virtio_dev *v, uint16_t index, struct virtq_area *area,
		 uint16_t max_size, uint16_t msix);
/* The same with the avail and used rings at the given addresses instead of area's (anywhere,
 * even overlapping each other: for hostile tests); the descriptors stay in area. */
bool virtq_setup_rings(struct virtq *vq, struct virtio_dev *v, uint16_t index,
		       struct virtq_area *area, struct virtq_avail *avail, struct virtq_used *used,
		       uint16_t max_size, uint16_t msix);
/* Chain n buffers (device-readable ones first) and make the chain available; the token comes
 * back from virtq_poll. -1 if there are not enough free descriptors. */
int virtq_add(struct virtq *vq, const struct vbuf *bufs, unsigned n, void *token);
/* The same through an indirect table (n entries at `table`, 16-byte aligned): one descriptor. */
int virtq_add_indirect(struct virtq *vq, const struct vbuf *bufs, unsigned n,
		       struct virtq_desc *table, void *token);
/* Put a descriptor index on the avail ring as it is (for hand-made, even invalid, chains). */
void virtq_publish(struct virtq *vq, uint16_t head);
/* Notify the device of new available buffers (one MMIO write, skipped if it asks). */
void virtq_kick(struct virtq *vq);
/* Notify the device whatever its suppression flags say (one MMIO write). */
void virtq_notify(struct virtq *vq);
/* Has the device returned something not yet consumed? */
bool virtq_has_used(struct virtq *vq);
/* Take one used entry: its token and length; frees the chain. false if none. */
bool virtq_poll(struct virtq *vq, void **token, uint32_t *len);
/* The ring indices as text (for failure messages): avail, kicked, used, consumed, events.
 * It reads the device status, an MMIO exit: compute it only once something has failed. */
/* How a device answered what a test expects it to refuse: "used" (an entry on vq's used ring),
 * "reset" (DEVICE_NEEDS_RESET in dev's status, read every few ms) or "none" after timeout_ms.
 * *dev_status gets the last status read. */
const char *virtq_await_outcome(struct virtq *vq, struct virtio_dev *dev, uint64_t timeout_ms,
				uint8_t *dev_status);
const char *virtq_state(struct virtq *vq);
/* virtq_poll, waiting at most timeout_ms. */
bool virtq_wait(struct virtq *vq, void **token, uint32_t *len, uint64_t timeout_ms);

#endif
