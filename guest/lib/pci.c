/* PCI configuration mechanism #1, bus 0 enumeration, BAR sizing and capability lists. */
#include "lib/pci.h"
#include "lib/io.h"
#include "lib/util.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define PCI_CONFIG_ENABLE 0x80000000u
#define PCI_SLOTS 32
#define PCI_FUNCTIONS 8
#define PCI_CAP_MIN 0x40
#define BAR_ALLOC_BASE 0xe0000000ULL
#define BAR_ALLOC_END 0xfec00000ULL

static inline void outw(uint16_t port, uint16_t value)
{
	asm volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t value)
{
	asm volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t value;

	asm volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t value;

	asm volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static void select_reg(const struct pci_dev *d, uint8_t reg)
{
	outl(PCI_CONFIG_ADDRESS, PCI_CONFIG_ENABLE | (uint32_t)d->bus << 16 | (uint32_t)d->dev << 11 |
		 (uint32_t)d->fn << 8 | (reg & 0xfc));
}

uint32_t pci_read32(const struct pci_dev *d, uint8_t reg)
{
	select_reg(d, reg);
	return inl(PCI_CONFIG_DATA);
}

uint16_t pci_read16(const struct pci_dev *d, uint8_t reg)
{
	select_reg(d, reg);
	return inw(PCI_CONFIG_DATA + (reg & 2));
}

uint8_t pci_read8(const struct pci_dev *d, uint8_t reg)
{
	select_reg(d, reg);
	return inb(PCI_CONFIG_DATA + (reg & 3));
}

void pci_write32(const struct pci_dev *d, uint8_t reg, uint32_t value)
{
	select_reg(d, reg);
	outl(PCI_CONFIG_DATA, value);
}

void pci_write16(const struct pci_dev *d, uint8_t reg, uint16_t value)
{
	select_reg(d, reg);
	outw(PCI_CONFIG_DATA + (reg & 2), value);
}

void pci_write8(const struct pci_dev *d, uint8_t reg, uint8_t value)
{
	select_reg(d, reg);
	outb(PCI_CONFIG_DATA + (reg & 3), value);
}

/* Fill in the identity of bus/dev/fn; false if nothing answers there. */
static bool probe_function(struct pci_dev *d)
{
	uint32_t id = pci_read32(d, PCI_VENDOR_ID), class;

	if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
		return false;
	class = pci_read32(d, PCI_REVISION);
	d->vendor = id & 0xffff;
	d->device = id >> 16;
	d->revision = class & 0xff;
	d->prog_if = (class >> 8) & 0xff;
	d->subclass = (class >> 16) & 0xff;
	d->class = class >> 24;
	d->header_type = pci_read8(d, PCI_HEADER_TYPE);
	return true;
}

unsigned pci_scan(struct pci_dev *out, unsigned max)
{
	unsigned n = 0;

	for (uint8_t dev = 0; dev < PCI_SLOTS; dev++) {
		for (uint8_t fn = 0; fn < PCI_FUNCTIONS && n < max; fn++) {
			struct pci_dev d = { .bus = 0, .dev = dev, .fn = fn };

			if (!probe_function(&d)) {
				if (fn == 0)
					break;
				continue;
			}
			out[n++] = d;
			if (fn == 0 && !(d.header_type & PCI_HEADER_MULTIFUNCTION))
				break;
		}
	}
	return n;
}

void pci_bar_probe(const struct pci_dev *d, unsigned n, struct pci_bar *bar)
{
	uint8_t reg = PCI_BAR0 + 4 * n;
	uint16_t command = pci_read16(d, PCI_COMMAND);
	uint32_t lo = pci_read32(d, reg), hi = 0, lo_mask, hi_mask = 0;

	memset(bar, 0, sizeof(*bar));
	bar->io = lo & PCI_BAR_IO;
	bar->is64 = !bar->io && (lo & PCI_BAR_TYPE_MASK) == PCI_BAR_TYPE_64 && n + 1 < PCI_NUM_BARS;
	bar->prefetch = !bar->io && (lo & PCI_BAR_PREFETCH);
	if (bar->is64)
		hi = pci_read32(d, reg + 4);

	pci_write16(d, PCI_COMMAND, command & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
	pci_write32(d, reg, 0xffffffff);
	lo_mask = pci_read32(d, reg);
	pci_write32(d, reg, lo);
	if (bar->is64) {
		pci_write32(d, reg + 4, 0xffffffff);
		hi_mask = pci_read32(d, reg + 4);
		pci_write32(d, reg + 4, hi);
	} else if (!bar->io) {
		hi_mask = 0xffffffff;	/* a 32-bit BAR decodes nothing above 4 GiB */
	}
	pci_write16(d, PCI_COMMAND, command);

	if (bar->io) {
		lo_mask = (lo_mask & ~3u) | 0xffff0000u;
		bar->addr = lo & ~3u;
		bar->size = lo_mask & ~3u ? (uint32_t)(~(lo_mask & ~3u) + 1) : 0;
		return;
	}
	uint64_t mask = (uint64_t)hi_mask << 32 | (lo_mask & ~0xfu);

	bar->addr = (uint64_t)hi << 32 | (lo & ~0xfu);
	bar->size = (lo_mask & ~0xfu) || (bar->is64 && hi_mask) ? ~mask + 1 : 0;
}

bool pci_bar_assign(const struct pci_dev *d, unsigned n, struct pci_bar *bar)
{
	static uint64_t next = BAR_ALLOC_BASE;
	uint8_t reg = PCI_BAR0 + 4 * n;
	uint64_t addr;
	uint32_t lo;

	if (bar->io || !bar->size || bar->addr)
		return bar->addr != 0;
	addr = (next + bar->size - 1) & ~(bar->size - 1);
	if (addr + bar->size > BAR_ALLOC_END)
		return false;
	next = addr + bar->size;
	lo = pci_read32(d, reg) & 0xf;
	pci_write32(d, reg, (uint32_t)addr | lo);
	if (bar->is64)
		pci_write32(d, reg + 4, addr >> 32);
	bar->addr = addr;
	return true;
}

uint8_t pci_cap_next(const struct pci_dev *d, uint8_t after, const char **error)
{
	static const char *no_error;
	uint8_t ptr;

	if (!error)
		error = &no_error;
	if (!after) {
		if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
			return 0;
		ptr = pci_read8(d, PCI_CAP_PTR);
	} else {
		ptr = pci_read8(d, after + 1);
	}
	if (!ptr)
		return 0;
	if ((ptr & 3) || ptr < PCI_CAP_MIN) {
		*error = "capability pointer not dword aligned or below 0x40";
		return 0;
	}
	return ptr;	/* loops: callers bound their walks (PCI_MAX_CAPS steps) */
}

uint8_t pci_find_cap(const struct pci_dev *d, uint8_t id)
{
	uint8_t cap = 0;

	for (unsigned steps = 0; steps < PCI_MAX_CAPS; steps++) {
		cap = pci_cap_next(d, cap, NULL);
		if (!cap)
			return 0;
		if (pci_read8(d, cap) == id)
			return cap;
	}
	return 0;
}
