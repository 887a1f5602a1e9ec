/* PCI bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc): config-space access,
 * enumeration, BARs (reading, sizing, assigning) and capability lists. Each config access from
 * CPL3 costs two exits (~130 us on PVM), so callers read what they need once. */
#ifndef PROBE_PCI_H
#define PROBE_PCI_H

#include <stdbool.h>
#include <stdint.h>

enum pci_cfg_reg {
	PCI_VENDOR_ID = 0x00,
	PCI_DEVICE_ID = 0x02,
	PCI_COMMAND = 0x04,
	PCI_STATUS = 0x06,
	PCI_REVISION = 0x08,
	PCI_PROG_IF = 0x09,
	PCI_SUBCLASS = 0x0a,
	PCI_CLASS = 0x0b,
	PCI_HEADER_TYPE = 0x0e,
	PCI_BAR0 = 0x10,
	PCI_SUBSYS_VENDOR = 0x2c,
	PCI_SUBSYS_ID = 0x2e,
	PCI_CAP_PTR = 0x34,
};

#define PCI_COMMAND_IO 0x0001
#define PCI_COMMAND_MEMORY 0x0002
#define PCI_COMMAND_MASTER 0x0004
#define PCI_COMMAND_INTX_DISABLE 0x0400
#define PCI_STATUS_CAP_LIST 0x0010
#define PCI_HEADER_MULTIFUNCTION 0x80
#define PCI_BAR_IO 0x1
#define PCI_BAR_TYPE_MASK 0x6
#define PCI_BAR_TYPE_64 0x4
#define PCI_BAR_PREFETCH 0x8
#define PCI_CAP_ID_MSIX 0x11
#define PCI_CAP_ID_VENDOR 0x09
#define PCI_MAX_CAPS 48
#define PCI_NUM_BARS 6
#define PCI_MAX_DEVICES 64
/* What the probe maps (lib/setup.c): BARs must lie below this. */
#define PCI_MMIO_LIMIT (64ULL << 30)

struct pci_dev {
	uint8_t bus, dev, fn;
	uint16_t vendor, device;
	uint8_t class, subclass, prog_if, revision, header_type;
};

struct pci_bar {
	uint64_t addr;	/* 0 if unassigned */
	uint64_t size;	/* 0 if the BAR is not implemented */
	bool io, is64, prefetch;
};

uint32_t pci_read32(const struct pci_dev *d, uint8_t reg);
uint16_t pci_read16(const struct pci_dev *d, uint8_t reg);
uint8_t pci_read8(const struct pci_dev *d, uint8_t reg);
void pci_write32(const struct pci_dev *d, uint8_t reg, uint32_t value);
void pci_write16(const struct pci_dev *d, uint8_t reg, uint16_t value);
void pci_write8(const struct pci_dev *d, uint8_t reg, uint8_t value);

/* Every function on bus 0 (functions 1-7 only of multifunction devices), in slot order. */
unsigned pci_scan(struct pci_dev *out, unsigned max);

/* BAR n: type and address from the register, size by writing all ones (memory/IO decoding
 * off meanwhile, everything restored). For a 64-bit BAR, n+1 is its upper half. */
void pci_bar_probe(const struct pci_dev *d, unsigned n, struct pci_bar *bar);
/* Give an unassigned memory BAR an address (from 0xe0000000 up, naturally aligned). */
bool pci_bar_assign(const struct pci_dev *d, unsigned n, struct pci_bar *bar);

/* Walk the capability list: returns the offset of the next capability after `after` (0 to
 * start), 0 at the end. Stops on a pointer that is not dword aligned or below 0x40 and sets
 * *error to why, if error is given. Callers bound their walks to PCI_MAX_CAPS steps. */
uint8_t pci_cap_next(const struct pci_dev *d, uint8_t after, const char **error);
/* First capability with this ID (0 if none). */
uint8_t pci_find_cap(const struct pci_dev *d, uint8_t id);

#endif
