/* cpus: the Intel MultiProcessor Specification 1.4 table the VMM puts in the EBDA (or BIOS
 * area): floating pointer and configuration table signatures and checksums, one enabled
 * processor entry per vCPU (probe.cpus=N to check the count), the IOAPIC at 0xfec00000. */
#include "lib/probe.h"
#include "tests/tests.h"

#define EBDA_START 0x9fc00
#define EBDA_END 0xa0000
#define BIOS_START 0xf0000
#define BIOS_END 0x100000
#define IOAPIC_ADDRESS 0xfec00000
#define LAPIC_ADDRESS 0xfee00000

struct mpf_intel {		/* MP floating pointer structure */
	char signature[4];	/* "_MP_" */
	uint32_t physptr;	/* configuration table */
	uint8_t length;		/* in 16-byte units: 1 */
	uint8_t specification;
	uint8_t checksum;
	uint8_t feature1;	/* non-zero: a default configuration, no table */
	uint8_t feature2;
	uint8_t feature3[3];
} __attribute__((packed));

struct mpc_table {		/* configuration table header */
	char signature[4];	/* "PCMP" */
	uint16_t length;	/* base table, header included */
	uint8_t spec;
	uint8_t checksum;
	char oem[8];
	char productid[12];
	uint32_t oemptr;
	uint16_t oemsize;
	uint16_t oemcount;	/* number of entries */
	uint32_t lapic;
	uint16_t ext_length;
	uint8_t ext_checksum;
	uint8_t reserved;
} __attribute__((packed));

enum mp_entry_type {
	MP_PROCESSOR = 0,	/* 20 bytes */
	MP_BUS = 1,		/* the rest: 8 bytes */
	MP_IOAPIC = 2,
	MP_INTSRC = 3,
	MP_LINTSRC = 4,
};

#define CPU_ENABLED 0x01
#define IOAPIC_ENABLED 0x01

static uint8_t checksum(const void *p, size_t len)
{
	const volatile uint8_t *b = p;
	uint8_t sum = 0;

	while (len--)
		sum += *b++;
	return sum;
}

static const struct mpf_intel *find_mpf(uint64_t start, uint64_t end)
{
	for (uint64_t addr = start; addr + sizeof(struct mpf_intel) <= end; addr += 16) {
		const struct mpf_intel *mpf = (const void *)addr;

		if (!memcmp(mpf->signature, "_MP_", 4) && mpf->length == 1 &&
		    checksum(mpf, sizeof(*mpf)) == 0)
			return mpf;
	}
	return NULL;
}

void test_cpus(void)
{
	const struct mpf_intel *mpf = find_mpf(EBDA_START, EBDA_END);
	const struct mpc_table *mpc;
	const uint8_t *entry, *end;
	unsigned cpus = 0, ioapics = 0, entries = 0;
	uint64_t want;

	if (!mpf)
		mpf = find_mpf(BIOS_START, BIOS_END);
	if (!report(mpf, "no MP floating pointer (\"_MP_\" with a good checksum) in 0x%x-0x%x or "
			 "0x%x-0x%x", EBDA_START, EBDA_END, BIOS_START, BIOS_END))
		return;
	if (!report(!mpf->feature1 && mpf->physptr,
		    "MP floating pointer at 0x%lx: default configuration %u / table at 0x%x, "
		    "expected a configuration table", (uint64_t)mpf, mpf->feature1, mpf->physptr))
		return;
	mpc = (const void *)(uint64_t)mpf->physptr;
	if (!report(!memcmp(mpc->signature, "PCMP", 4), "no \"PCMP\" signature at 0x%x",
		    mpf->physptr))
		return;
	if (!report(mpc->length >= sizeof(*mpc) && checksum(mpc, mpc->length) == 0,
		    "configuration table at 0x%x: bad length %u or checksum", mpf->physptr,
		    mpc->length))
		return;
	report(mpc->lapic == LAPIC_ADDRESS, "local APIC address is 0x%x, expected 0x%x",
	       mpc->lapic, LAPIC_ADDRESS);

	entry = (const uint8_t *)(mpc + 1);
	end = (const uint8_t *)mpc + mpc->length;
	for (; entry < end && entries < mpc->oemcount; entries++) {
		switch (entry[0]) {
		case MP_PROCESSOR:
			if (entry[3] & CPU_ENABLED)
				cpus++;
			entry += 20;
			break;
		case MP_IOAPIC: {
			uint32_t addr = *(const uint32_t *)(entry + 4);

			report(addr == IOAPIC_ADDRESS, "IOAPIC %u at 0x%x, expected 0x%x", entry[1],
			       addr, IOAPIC_ADDRESS);
			if (entry[3] & IOAPIC_ENABLED)
				ioapics++;
			entry += 8;
			break;
		}
		case MP_BUS:
		case MP_INTSRC:
		case MP_LINTSRC:
			entry += 8;
			break;
		default:
			report(false, "entry %u has unknown type %u", entries, entry[0]);
			return;
		}
	}
	report(entry == end && entries == mpc->oemcount,
	       "table length %u and entry count %u disagree (%u entries fit)", mpc->length,
	       mpc->oemcount, entries);
	report(cpus > 0, "no enabled processor entries");
	report(ioapics > 0, "no enabled IOAPIC entry");
	if (cmdline_u64("probe.cpus", &want))
		report(cpus == want, "probe.cpus=%lu but the MP table lists %u enabled processors",
		       want, cpus);
	report_details("%u", cpus);
}
