/* pci: bus 0 enumeration through configuration mechanism #1. The host bridge is 00:00.0 (class
 * 06/00); every virtio function is a modern virtio-pci device: its BARs are sized by writing
 * all ones (restored), its capability list is well formed and holds the common, notify, ISR
 * and device-config vendor capabilities inside memory BARs (the one with the common config a
 * 64-bit one) and an MSI-X capability whose table and PBA fit their BARs; the ID registers are
 * read-only. Prints one line per function, then `PROBE pci ok <n> devices`. */
#include "lib/probe.h"
#include "lib/pci.h"
#include "lib/virtio.h"
#include "tests/tests.h"

#define MIN_BAR_SIZE 4096
#define MSIX_CONTROL 2
#define MSIX_TABLE 4
#define MSIX_PBA 8

static bool power_of_two(uint64_t x)
{
	return x && !(x & (x - 1));
}

/* A region [offset, offset+length) of BAR `bar` must lie in a well-formed memory BAR. */
static bool check_region(const struct pci_dev *d, const struct pci_bar *bars, uint8_t bar,
			 uint64_t offset, uint64_t length, const char *what)
{
	const struct pci_bar *b = &bars[bar];

	if (!report(bar < PCI_NUM_BARS && b->size && !b->io,
		    "%02x:%02x.%x: %s is in BAR %u, which is not an implemented memory BAR", d->bus,
		    d->dev, d->fn, what, bar))
		return false;
	return report(offset + length <= b->size,
		      "%02x:%02x.%x: %s at offset 0x%lx length 0x%lx is outside BAR %u (size 0x%lx)",
		      d->bus, d->dev, d->fn, what, offset, length, bar, b->size);
}

static void check_readonly(const struct pci_dev *d)
{
	uint32_t id = pci_read32(d, PCI_VENDOR_ID), class = pci_read32(d, PCI_REVISION);

	pci_write16(d, PCI_VENDOR_ID, ~id & 0xffff);
	pci_write32(d, PCI_VENDOR_ID, 0x12345678);
	pci_write32(d, PCI_REVISION, ~class);
	report(pci_read32(d, PCI_VENDOR_ID) == id && pci_read32(d, PCI_REVISION) == class,
	       "%02x:%02x.%x: writing vendor/device ID or class/revision changed them", d->bus,
	       d->dev, d->fn);
}

static void check_virtio(const struct pci_dev *d)
{
	struct pci_bar bars[PCI_NUM_BARS];
	bool seen[6] = { false }, msix = false;
	uint8_t common_bar = PCI_NUM_BARS, visited[256] = { 0 };
	uint8_t cap = 0;
	unsigned caps = 0;
	const char *error = NULL;
	uint16_t status = pci_read16(d, PCI_STATUS);

	report(d->device >= VIRTIO_PCI_MODERN_BASE && d->device <= 0x107f && d->revision >= 1,
	       "%02x:%02x.%x: device 0x%04x revision %u is not a modern-only virtio device",
	       d->bus, d->dev, d->fn, d->device, d->revision);

	for (unsigned n = 0; n < PCI_NUM_BARS; n++) {
		struct pci_bar *b = &bars[n];

		pci_bar_probe(d, n, b);
		if (b->size)
			console_printf("pci %02x:%02x.%x BAR%u %s%s at 0x%lx size 0x%lx\n", d->bus,
				       d->dev, d->fn, n, b->io ? "io" : "mem",
				       b->io ? "" : b->is64 ? "64" : "32", b->addr, b->size);
		if (b->size && !b->io) {
			report(power_of_two(b->size) && b->size >= MIN_BAR_SIZE,
			       "%02x:%02x.%x: BAR %u size 0x%lx is not a power of two >= 4 KiB",
			       d->bus, d->dev, d->fn, n, b->size);
			report(b->addr && !(b->addr & (b->size - 1)) &&
				       b->addr + b->size <= PCI_MMIO_LIMIT,
			       "%02x:%02x.%x: BAR %u at 0x%lx (size 0x%lx) is unassigned, misaligned "
			       "or above 64 GiB", d->bus, d->dev, d->fn, n, b->addr, b->size);
		}
		if (b->is64 && n + 1 < PCI_NUM_BARS) {
			n++;
			bars[n] = (struct pci_bar){ 0 };
		}
	}

	if (!report(status & PCI_STATUS_CAP_LIST,
		    "%02x:%02x.%x: status 0x%04x lacks the capability-list bit", d->bus, d->dev,
		    d->fn, status))
		return;
	for (;;) {
		cap = pci_cap_next(d, cap, &error);
		if (!cap)
			break;
		caps++;
		if (!report(!visited[cap] && caps <= PCI_MAX_CAPS,
			    "%02x:%02x.%x: capability list loops (0x%02x again, %u entries)", d->bus,
			    d->dev, d->fn, cap, caps))
			return;
		visited[cap] = 1;
		uint8_t id = pci_read8(d, cap);

		if (id == PCI_CAP_ID_MSIX) {
			uint16_t control = pci_read16(d, cap + MSIX_CONTROL);
			uint32_t table = pci_read32(d, cap + MSIX_TABLE);
			uint32_t pba = pci_read32(d, cap + MSIX_PBA);
			uint32_t entries = (control & 0x7ff) + 1;

			msix = true;
			check_region(d, bars, table & 7, table & ~7u, entries * 16ULL, "MSI-X table");
			check_region(d, bars, pba & 7, pba & ~7u, (entries + 63) / 64 * 8ULL,
				     "MSI-X PBA");
			continue;
		}
		if (id != PCI_CAP_ID_VENDOR)
			continue;
		uint32_t head = pci_read32(d, cap);
		uint8_t len = (head >> 16) & 0xff, type = head >> 24;
		uint8_t bar = pci_read8(d, cap + VIRTIO_CAP_BAR);
		uint32_t offset = pci_read32(d, cap + VIRTIO_CAP_OFFSET);
		uint32_t length = pci_read32(d, cap + VIRTIO_CAP_LENGTH);
		char what[32];

		if (type < VIRTIO_PCI_CAP_COMMON_CFG || type > VIRTIO_PCI_CAP_DEVICE_CFG)
			continue;
		snprintf(what, sizeof(what), "virtio cap type %u", type);
		report(len >= (type == VIRTIO_PCI_CAP_NOTIFY_CFG ? VIRTIO_NOTIFY_CAP_SIZE
								 : VIRTIO_CAP_SIZE),
		       "%02x:%02x.%x: %s has cap_len %u", d->bus, d->dev, d->fn, what, len);
		report(length > 0, "%02x:%02x.%x: %s has length 0", d->bus, d->dev, d->fn, what);
		check_region(d, bars, bar, offset, length, what);
		if (type == VIRTIO_PCI_CAP_COMMON_CFG && !seen[type]) {
			common_bar = bar;
			report(length >= VIRTIO_COMMON_SIZE,
			       "%02x:%02x.%x: common config length 0x%x < 0x%x", d->bus, d->dev,
			       d->fn, length, VIRTIO_COMMON_SIZE);
		}
		seen[type] = true;
	}
	report(!error, "%02x:%02x.%x: %s", d->bus, d->dev, d->fn, error);
	report(seen[1] && seen[2] && seen[3] && seen[4],
	       "%02x:%02x.%x: missing virtio capabilities (common %u notify %u ISR %u device %u)",
	       d->bus, d->dev, d->fn, seen[1], seen[2], seen[3], seen[4]);
	report(msix, "%02x:%02x.%x: no MSI-X capability", d->bus, d->dev, d->fn);
	if (common_bar < PCI_NUM_BARS)
		report(bars[common_bar].is64,
		       "%02x:%02x.%x: BAR %u (the common config's) is not a 64-bit memory BAR",
		       d->bus, d->dev, d->fn, common_bar);
}

void test_pci(void)
{
	struct pci_dev devs[PCI_MAX_DEVICES];
	unsigned n = pci_scan(devs, PCI_MAX_DEVICES), virtio = 0;

	for (unsigned i = 0; i < n; i++) {
		const struct pci_dev *d = &devs[i];

		console_printf("pci %02x:%02x.%x %04x:%04x class %02x/%02x/%02x rev %u\n", d->bus,
			       d->dev, d->fn, d->vendor, d->device, d->class, d->subclass,
			       d->prog_if, d->revision);
	}
	if (!report(n > 0, "no PCI functions on bus 0 (0xcf8/0xcfc)"))
		return;
	report(devs[0].dev == 0 && devs[0].fn == 0 && devs[0].class == 0x06 &&
		       devs[0].subclass == 0x00,
	       "00:00.0 is not a host bridge: first function %02x:%02x.%x class %02x/%02x",
	       devs[0].bus, devs[0].dev, devs[0].fn, devs[0].class, devs[0].subclass);
	for (unsigned i = 0; i < n; i++) {
		check_readonly(&devs[i]);
		/* Red Hat's vendor ID covers other devices too (ivshmem, ...). */
		if (devs[i].vendor == VIRTIO_PCI_VENDOR && devs[i].device >= 0x1000 &&
		    devs[i].device <= 0x107f) {
			check_virtio(&devs[i]);
			virtio++;
		}
	}
	report(virtio > 0, "no virtio devices");
	report_details("%u devices", n);
}
