/* The virtio-pci driver library (see lib/virtio.h). */
#include "lib/virtio.h"
#include "lib/clock.h"
#include "lib/cpu.h"
#include "lib/io.h"
#include "lib/util.h"

/* How often virtq_await_outcome reads the device status (an MMIO exit each time). */
#define OUTCOME_STATUS_POLL_MS 2

#define RESET_TIMEOUT_MS 1000
#define MSIX_CONTROL 2
#define MSIX_TABLE 4
#define MSIX_CONTROL_ENABLE 0x8000
#define MSIX_CONTROL_MASKALL 0x4000
#define MSIX_TABLE_SIZE_MASK 0x07ff
#define MSIX_BIR_MASK 0x7
#define MSIX_ENTRY_SIZE 16
#define MSIX_VECTOR_MASKED 1
/* With EVENT_IDX, a used_event this far ahead of what we consumed means "no interrupts". */
#define USED_EVENT_NEVER 0x7fff

static struct virtio_dev devices[VIRTIO_MAX_DEVICES];
static unsigned device_count;
static bool scanned;

static uint8_t mmio_read8(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint8_t *)(base + off);
}

static uint16_t mmio_read16(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint16_t *)(base + off);
}

static uint32_t mmio_read32(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint32_t *)(base + off);
}

static void mmio_write8(volatile uint8_t *base, uint32_t off, uint8_t value)
{
	*(volatile uint8_t *)(base + off) = value;
}

static void mmio_write16(volatile uint8_t *base, uint32_t off, uint16_t value)
{
	*(volatile uint16_t *)(base + off) = value;
}

static void mmio_write32(volatile uint8_t *base, uint32_t off, uint32_t value)
{
	*(volatile uint32_t *)(base + off) = value;
}

/* The address of [offset, offset + length) in a BAR, NULL if it is not inside a memory BAR. */
static volatile uint8_t *bar_region(struct virtio_dev *v, uint8_t bar, uint32_t offset,
				    uint32_t length)
{
	struct pci_bar *b;

	if (bar >= PCI_NUM_BARS)
		return NULL;
	b = &v->bar[bar];
	if (b->io || !b->addr || (uint64_t)offset + length > b->size ||
	    b->addr + b->size > PCI_MMIO_LIMIT)
		return NULL;
	return (volatile uint8_t *)(b->addr + offset);
}

/* Read the BARs and the capabilities of one virtio function; false (v->error) if unusable. */
static bool parse_device(struct virtio_dev *v)
{
	uint8_t cap = 0;
	uint16_t command;

	v->type = v->pci.device - VIRTIO_PCI_MODERN_BASE;
	for (unsigned n = 0; n < PCI_NUM_BARS; n++) {
		pci_bar_probe(&v->pci, n, &v->bar[n]);
		if (v->bar[n].size && !v->bar[n].io)
			pci_bar_assign(&v->pci, n, &v->bar[n]);
		if (v->bar[n].is64) {
			n++;
			v->bar[n] = (struct pci_bar){ 0 };
		}
	}
	for (unsigned steps = 0; steps < PCI_MAX_CAPS; steps++) {
		cap = pci_cap_next(&v->pci, cap, &v->error);
		if (!cap)
			break;
		uint8_t id = pci_read8(&v->pci, cap);

		if (id == PCI_CAP_ID_MSIX && !v->msix_cap) {
			uint16_t control = pci_read16(&v->pci, cap + MSIX_CONTROL);
			uint32_t table = pci_read32(&v->pci, cap + MSIX_TABLE);

			v->msix_entries = (control & MSIX_TABLE_SIZE_MASK) + 1;
			v->msix_table = (volatile uint32_t *)bar_region(
				v, table & MSIX_BIR_MASK, table & ~MSIX_BIR_MASK,
				v->msix_entries * MSIX_ENTRY_SIZE);
			if (v->msix_table)
				v->msix_cap = cap;
			continue;
		}
		if (id != PCI_CAP_ID_VENDOR)
			continue;
		uint32_t head = pci_read32(&v->pci, cap);	/* id, next, len, cfg_type */
		uint8_t len = (head >> 16) & 0xff, type = head >> 24;
		uint8_t bar = pci_read8(&v->pci, cap + VIRTIO_CAP_BAR);
		uint32_t offset = pci_read32(&v->pci, cap + VIRTIO_CAP_OFFSET);
		uint32_t length = pci_read32(&v->pci, cap + VIRTIO_CAP_LENGTH);
		volatile uint8_t *where;

		if (len < VIRTIO_CAP_SIZE)
			continue;
		where = bar_region(v, bar, offset, length);
		switch (type) {
		case VIRTIO_PCI_CAP_COMMON_CFG:
			if (!v->common && where && length >= VIRTIO_COMMON_SIZE)
				v->common = where;
			break;
		case VIRTIO_PCI_CAP_NOTIFY_CFG:
			if (!v->notify && where && len >= VIRTIO_NOTIFY_CAP_SIZE) {
				v->notify = where;
				v->notify_len = length;
				v->notify_mult = pci_read32(&v->pci, cap + VIRTIO_CAP_NOTIFY_MULT);
			}
			break;
		case VIRTIO_PCI_CAP_ISR_CFG:
			if (!v->isr && where && length >= 1)
				v->isr = where;
			break;
		case VIRTIO_PCI_CAP_DEVICE_CFG:
			if (!v->device && where) {
				v->device = where;
				v->device_len = length;
			}
			break;
		}
	}
	if (!v->common || !v->notify || !v->isr) {
		v->error = "no usable common, notify or ISR capability";
		return false;
	}
	command = pci_read16(&v->pci, PCI_COMMAND);
	if ((command & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)) !=
	    (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER))
		pci_write16(&v->pci, PCI_COMMAND,
			    command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	return true;
}

struct virtio_dev *virtio_devices(unsigned *count)
{
	if (!scanned) {
		struct pci_dev all[PCI_MAX_DEVICES];
		unsigned n = pci_scan(all, PCI_MAX_DEVICES);

		scanned = true;
		for (unsigned i = 0; i < n && device_count < VIRTIO_MAX_DEVICES; i++) {
			struct virtio_dev *v = &devices[device_count];

			if (all[i].vendor != VIRTIO_PCI_VENDOR ||
			    all[i].device < VIRTIO_PCI_MODERN_BASE || all[i].device > 0x107f)
				continue;
			memset(v, 0, sizeof(*v));
			v->pci = all[i];
			if (parse_device(v))
				device_count++;
		}
	}
	*count = device_count;
	return devices;
}

struct virtio_dev *virtio_find(uint16_t type, unsigned n)
{
	unsigned count;
	struct virtio_dev *all = virtio_devices(&count);

	for (unsigned i = 0; i < count; i++)
		if (all[i].type == type && n-- == 0)
			return &all[i];
	return NULL;
}

uint8_t virtio_get_status(struct virtio_dev *v)
{
	return mmio_read8(v->common, VIRTIO_COMMON_STATUS);
}

void virtio_set_status(struct virtio_dev *v, uint8_t status)
{
	mmio_write8(v->common, VIRTIO_COMMON_STATUS, status);
}

bool virtio_reset(struct virtio_dev *v)
{
	uint64_t deadline;

	virtio_set_status(v, 0);
	deadline = deadline_ms(RESET_TIMEOUT_MS);
	while (virtio_get_status(v) != 0) {
		if (expired(deadline)) {
			v->error = "device_status did not read 0 after reset";
			return false;
		}
		cpu_relax();
	}
	return true;
}

bool virtio_begin(struct virtio_dev *v)
{
	if (!virtio_reset(v))
		return false;
	virtio_set_status(v, VIRTIO_STATUS_ACKNOWLEDGE);
	virtio_set_status(v, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	mmio_write32(v->common, VIRTIO_COMMON_DFSELECT, 0);
	v->features = mmio_read32(v->common, VIRTIO_COMMON_DF);
	mmio_write32(v->common, VIRTIO_COMMON_DFSELECT, 1);
	v->features |= (uint64_t)mmio_read32(v->common, VIRTIO_COMMON_DF) << 32;
	v->driver_features = 0;
	return true;
}

bool virtio_negotiate(struct virtio_dev *v, uint64_t wanted)
{
	uint64_t accept = wanted & v->features;
	uint8_t status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;

	if (!(accept & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
		v->error = "the device does not offer VIRTIO_F_VERSION_1";
		virtio_set_status(v, status | VIRTIO_STATUS_FAILED);
		return false;
	}
	mmio_write32(v->common, VIRTIO_COMMON_GFSELECT, 0);
	mmio_write32(v->common, VIRTIO_COMMON_GF, (uint32_t)accept);
	mmio_write32(v->common, VIRTIO_COMMON_GFSELECT, 1);
	mmio_write32(v->common, VIRTIO_COMMON_GF, accept >> 32);
	virtio_set_status(v, status | VIRTIO_STATUS_FEATURES_OK);
	if (!(virtio_get_status(v) & VIRTIO_STATUS_FEATURES_OK)) {
		v->error = "FEATURES_OK did not stick";
		virtio_set_status(v, status | VIRTIO_STATUS_FAILED);
		return false;
	}
	v->driver_features = accept;
	return true;
}

void virtio_driver_ok(struct virtio_dev *v)
{
	virtio_set_status(v, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
				     VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

uint8_t virtio_config_read8(struct virtio_dev *v, uint32_t offset)
{
	return mmio_read8(v->device, offset);
}

uint32_t virtio_config_read32(struct virtio_dev *v, uint32_t offset)
{
	return mmio_read32(v->device, offset);
}

uint64_t virtio_config_read64(struct virtio_dev *v, uint32_t offset)
{
	uint8_t generation;
	uint64_t value;
	unsigned tries = 0;

	do {
		generation = mmio_read8(v->common, VIRTIO_COMMON_CFGGENERATION);
		value = mmio_read32(v->device, offset) |
			(uint64_t)mmio_read32(v->device, offset + 4) << 32;
	} while (mmio_read8(v->common, VIRTIO_COMMON_CFGGENERATION) != generation &&
		 ++tries < 10);
	return value;
}

bool virtio_msix_enable(struct virtio_dev *v, unsigned entry, uint8_t vector)
{
	volatile uint32_t *e;
	uint32_t apic_id;
	uint16_t control;

	if (!v->msix_cap || entry >= v->msix_entries) {
		v->error = "no MSI-X capability (or table entry)";
		return false;
	}
	apic_id = *(volatile uint32_t *)(LAPIC_BASE + LAPIC_ID) >> 24;
	control = pci_read16(&v->pci, v->msix_cap + MSIX_CONTROL);
	/* Enabled with the function masked while the entry is written, then unmasked. */
	pci_write16(&v->pci, v->msix_cap + MSIX_CONTROL,
		    control | MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL);
	e = v->msix_table + entry * (MSIX_ENTRY_SIZE / 4);
	e[0] = (uint32_t)LAPIC_BASE | apic_id << 12;
	e[1] = 0;
	e[2] = vector;
	e[3] = 0;	/* unmasked */
	pci_write16(&v->pci, v->msix_cap + MSIX_CONTROL,
		    (control | MSIX_CONTROL_ENABLE) & ~MSIX_CONTROL_MASKALL);
	return true;
}

void virtio_msix_disable(struct virtio_dev *v)
{
	uint16_t control;

	if (!v->msix_cap)
		return;
	control = pci_read16(&v->pci, v->msix_cap + MSIX_CONTROL);
	pci_write16(&v->pci, v->msix_cap + MSIX_CONTROL,
		    control & ~(MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL));
}

/* ---- Split virtqueues ---- */

bool virtq_setup(struct virtq *vq, struct virtio_dev *v, uint16_t index, struct virtq_area *area,
		 uint16_t max_size, uint16_t msix)
{
	return virtq_setup_rings(vq, v, index, area, &area->avail, &area->used, max_size, msix);
}

bool virtq_setup_rings(struct virtq *vq, struct virtio_dev *v, uint16_t index,
		       struct virtq_area *area, struct virtq_avail *avail, struct virtq_used *used,
		       uint16_t max_size, uint16_t msix)
{
	volatile uint8_t *c = v->common;
	uint16_t size, notify_off;
	uint64_t notify_at;

	memset(vq, 0, sizeof(*vq));
	memset(area, 0, sizeof(*area));
	vq->dev = v;
	vq->area = area;
	vq->avail = avail;
	vq->used = used;
	vq->index = index;
	mmio_write16(c, VIRTIO_COMMON_Q_SELECT, index);
	size = mmio_read16(c, VIRTIO_COMMON_Q_SIZE);
	if (!size) {
		v->error = "queue_size is 0 (no such queue)";
		return false;
	}
	if (max_size > VIRTQ_MAX_SIZE)
		max_size = VIRTQ_MAX_SIZE;
	if (size > max_size) {
		size = max_size;
		mmio_write16(c, VIRTIO_COMMON_Q_SIZE, size);
	}
	vq->size = size;
	notify_off = mmio_read16(c, VIRTIO_COMMON_Q_NOFF);
	notify_at = (uint64_t)notify_off * v->notify_mult;
	if (notify_at + 2 > v->notify_len) {
		v->error = "queue_notify_off * notify_off_multiplier is outside the notify region";
		return false;
	}
	vq->notify = (volatile uint16_t *)(v->notify + notify_at);
	mmio_write32(c, VIRTIO_COMMON_Q_DESCLO, (uint32_t)(uint64_t)area->desc);
	mmio_write32(c, VIRTIO_COMMON_Q_DESCHI, (uint64_t)area->desc >> 32);
	mmio_write32(c, VIRTIO_COMMON_Q_AVAILLO, (uint32_t)(uint64_t)avail);
	mmio_write32(c, VIRTIO_COMMON_Q_AVAILHI, (uint64_t)avail >> 32);
	mmio_write32(c, VIRTIO_COMMON_Q_USEDLO, (uint32_t)(uint64_t)used);
	mmio_write32(c, VIRTIO_COMMON_Q_USEDHI, (uint64_t)used >> 32);
	mmio_write16(c, VIRTIO_COMMON_Q_MSIX, msix);
	if (msix != VIRTIO_MSI_NO_VECTOR && mmio_read16(c, VIRTIO_COMMON_Q_MSIX) != msix) {
		v->error = "queue_msix_vector did not take the vector";
		return false;
	}
	vq->interrupts = msix != VIRTIO_MSI_NO_VECTOR;
	vq->event_idx = v->driver_features & VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
	if (vq->event_idx)
		avail->ring[size] = vq->interrupts ? 0 : USED_EVENT_NEVER;	/* used_event */
	else if (!vq->interrupts)
		avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	for (uint16_t i = 0; i < size; i++)
		area->desc[i].next = i + 1;
	vq->free_head = 0;
	vq->num_free = size;
	mmio_write16(c, VIRTIO_COMMON_Q_ENABLE, 1);
	return true;
}

static void put_desc(struct virtq_desc *d, const struct vbuf *b, uint16_t flags, uint16_t next)
{
	d->addr = b->addr;
	d->len = b->len;
	d->flags = flags | (b->write ? VIRTQ_DESC_F_WRITE : 0);
	d->next = next;
}

void virtq_publish(struct virtq *vq, uint16_t head)
{
	struct virtq_avail *avail = vq->avail;

	avail->ring[vq->avail_idx % vq->size] = head;
	barrier();	/* the entry before the index (x86 keeps stores in order) */
	vq->avail_idx++;
	WRITE_ONCE(avail->idx, vq->avail_idx);
}

int virtq_add(struct virtq *vq, const struct vbuf *bufs, unsigned n, void *token)
{
	uint16_t head = vq->free_head, i = head;

	if (n == 0 || n > vq->num_free)
		return -1;
	for (unsigned k = 0; k < n; k++) {
		struct virtq_desc *d = &vq->area->desc[i];
		uint16_t next = d->next;

		put_desc(d, &bufs[k], k + 1 < n ? VIRTQ_DESC_F_NEXT : 0, k + 1 < n ? next : 0);
		if (k + 1 == n)
			vq->free_head = next;
		i = next;
	}
	vq->num_free -= n;
	vq->chain_len[head] = n;
	vq->token[head] = token;
	virtq_publish(vq, head);
	return head;
}

int virtq_add_indirect(struct virtq *vq, const struct vbuf *bufs, unsigned n,
		       struct virtq_desc *table, void *token)
{
	uint16_t head = vq->free_head;
	struct virtq_desc *d;

	if (n == 0 || vq->num_free < 1)
		return -1;
	for (unsigned k = 0; k < n; k++)
		put_desc(&table[k], &bufs[k], k + 1 < n ? VIRTQ_DESC_F_NEXT : 0, k + 1);
	d = &vq->area->desc[head];
	vq->free_head = d->next;
	d->addr = (uint64_t)table;
	d->len = n * sizeof(*table);
	d->flags = VIRTQ_DESC_F_INDIRECT;
	vq->num_free--;
	vq->chain_len[head] = 1;
	vq->token[head] = token;
	virtq_publish(vq, head);
	return head;
}

void virtq_kick(struct virtq *vq)
{
	/* The avail index must be visible before we read the device's flags. */
	asm volatile("mfence" : : : "memory");
	if (vq->event_idx) {
		/* avail_event sits right after the used ring's entries. */
		uint16_t event = *(volatile uint16_t *)((uint8_t *)vq->used +
						       offsetof(struct virtq_used, ring) +
						       vq->size * sizeof(struct virtq_used_elem));
		uint16_t old = vq->kicked_idx, new = vq->avail_idx;

		vq->kicked_idx = new;
		if ((uint16_t)(new - event - 1) >= (uint16_t)(new - old))
			return;
	} else if (READ_ONCE(vq->used->flags) & VIRTQ_USED_F_NO_NOTIFY) {
		return;
	}
	virtq_notify(vq);
}

void virtq_notify(struct virtq *vq)
{
	*vq->notify = vq->index;
}

bool virtq_has_used(struct virtq *vq)
{
	return READ_ONCE(vq->used->idx) != vq->last_used;
}

bool virtq_poll(struct virtq *vq, void **token, uint32_t *len)
{
	struct virtq_used_elem e;
	uint16_t id, n, i;

	while (virtq_has_used(vq)) {
		barrier();	/* the index before the entry (x86 keeps loads in order) */
		e = vq->used->ring[vq->last_used % vq->size];
		vq->last_used++;
		if (vq->event_idx)	/* used_event: interrupt after the next one, or never */
			WRITE_ONCE(vq->avail->ring[vq->size],
				   vq->last_used + (vq->interrupts ? 0 : USED_EVENT_NEVER));
		if (e.id >= vq->size || !vq->chain_len[e.id]) {
			vq->bad_used = true;
			continue;
		}
		id = e.id;
		n = vq->chain_len[id];
		vq->chain_len[id] = 0;
		/* Return the chain to the free list: walk our own next links. */
		i = id;
		for (uint16_t k = 1; k < n; k++)
			i = vq->area->desc[i].next;
		vq->area->desc[i].next = vq->free_head;
		vq->free_head = id;
		vq->num_free += n;
		if (token)
			*token = vq->token[id];
		if (len)
			*len = e.len;
		return true;
	}
	return false;
}

const char *virtq_state(struct virtq *vq)
{
	static char text[160];
	uint16_t avail_event = *(volatile uint16_t *)((uint8_t *)vq->used +
						      offsetof(struct virtq_used, ring) +
						      vq->size * sizeof(struct virtq_used_elem));

	snprintf(text, sizeof(text), "[avail.idx %u kicked %u used.idx %u consumed %u used.flags "
		 "0x%x avail_event %u used_event %u free %u status 0x%02x]", vq->avail_idx,
		 vq->kicked_idx, READ_ONCE(vq->used->idx), vq->last_used,
		 READ_ONCE(vq->used->flags), avail_event, vq->avail->ring[vq->size],
		 vq->num_free, virtio_get_status(vq->dev));
	return text;
}

bool virtq_wait(struct virtq *vq, void **token, uint32_t *len, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);

	while (!virtq_poll(vq, token, len)) {
		if (expired(deadline))
			return false;
		cpu_relax();
	}
	return true;
}

const char *virtq_await_outcome(struct virtq *vq, struct virtio_dev *dev, uint64_t timeout_ms,
				uint8_t *dev_status)
{
	uint64_t deadline = deadline_ms(timeout_ms), next_status = 0;

	*dev_status = 0;
	for (;;) {
		if (virtq_has_used(vq))
			return "used";
		if (expired(next_status)) {
			*dev_status = virtio_get_status(dev);
			if (*dev_status & VIRTIO_STATUS_NEEDS_RESET)
				return "reset";
			next_status = deadline_ms(OUTCOME_STATUS_POLL_MS);
		}
		if (expired(deadline))
			return "none";
		cpu_relax();
	}
}
