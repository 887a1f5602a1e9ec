/* e820: the memory map from the boot loader is usable as it says: every 4 KiB page of usable
 * RAM (except the probe's own image, .bss, stacks and page tables, and the legacy hole
 * 0xa0000-0xfffff) takes a pattern in its first and last qword and keeps it. With
 * probe.mem=M the usable total must be within 1 MiB below M MiB. */
#include "lib/probe.h"
#include "tests/tests.h"

#define PAGE_SIZE 4096
#define PATTERN UINT64_C(0x5a5ac3c3a5a53c3c)
#define LEGACY_HOLE_START 0xa0000
#define LEGACY_HOLE_END 0x100000
#define MAPPED_LIMIT (64 * GiB)	/* what lib/setup.c maps */

static bool skip_page(uint64_t addr)
{
	return (addr >= (uint64_t)_start && addr < (uint64_t)_end) ||
	       (addr >= LEGACY_HOLE_START && addr < LEGACY_HOLE_END);
}

/* Write (or check, if verify) the pattern in every page of one range; false on a mismatch. */
static bool walk_range(const struct e820_entry *e, bool verify)
{
	uint64_t start = (e->addr + PAGE_SIZE - 1) & ~(uint64_t)(PAGE_SIZE - 1);
	uint64_t end = (e->addr + e->size) & ~(uint64_t)(PAGE_SIZE - 1);

	if (end > MAPPED_LIMIT)
		end = MAPPED_LIMIT;
	for (uint64_t addr = start; addr < end; addr += PAGE_SIZE) {
		volatile uint64_t *first = (volatile uint64_t *)addr;
		volatile uint64_t *last = (volatile uint64_t *)(addr + PAGE_SIZE - 8);

		if (skip_page(addr))
			continue;
		if (!verify) {
			*first = addr ^ PATTERN;
			*last = ~addr ^ PATTERN;
			continue;
		}
		uint64_t got_first = *first, got_last = *last;

		if (!report(got_first == (addr ^ PATTERN) && got_last == (~addr ^ PATTERN),
			    "page 0x%lx: expected 0x%lx/0x%lx in first/last qword, read 0x%lx/0x%lx",
			    addr, addr ^ PATTERN, ~addr ^ PATTERN, got_first, got_last))
			return false;
	}
	return true;
}

void test_e820(void)
{
	uint64_t usable = 0, top = e820_ram_top(), mem_mib;
	unsigned ranges = 0;

	if (!report(boot.e820_count > 0, "the e820 table is empty"))
		return;
	for (uint32_t i = 0; i < boot.e820_count; i++) {
		if (boot.e820[i].type != E820_RAM)
			continue;
		usable += boot.e820[i].size;
		ranges++;
	}
	if (!report(usable > 0, "no usable RAM in %u e820 entries", boot.e820_count))
		return;
	report(top <= MAPPED_LIMIT, "RAM ends at 0x%lx, above what the probe maps (0x%lx)", top,
	       MAPPED_LIMIT);
	if (cmdline_u64("probe.mem", &mem_mib))
		report(usable <= mem_mib * MiB && usable >= (mem_mib - 1) * MiB,
		       "probe.mem=%lu: expected %lu-%lu KiB usable, e820 has %lu KiB", mem_mib,
		       (mem_mib - 1) * 1024, mem_mib * 1024, usable / KiB);

	for (uint32_t i = 0; i < boot.e820_count; i++)
		if (boot.e820[i].type == E820_RAM)
			walk_range(&boot.e820[i], false);
	for (uint32_t i = 0; i < boot.e820_count; i++)
		if (boot.e820[i].type == E820_RAM && !walk_range(&boot.e820[i], true))
			break;

	report_details("%lu MiB in %u ranges, top 0x%lx", usable / MiB, ranges, top);
}
