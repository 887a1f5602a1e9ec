/* Copies the boot loader's memory map and command line (Linux zero page or PVH start info)
 * and answers questions about them. */
#include "lib/boot.h"
#include "lib/util.h"

/* Linux zero page (struct boot_params) offsets, see <asm/bootparam.h>. */
#define ZP_EXT_CMD_LINE_PTR 0x0c8
#define ZP_E820_ENTRIES 0x1e8
#define ZP_CMD_LINE_PTR 0x228
#define ZP_CMDLINE_SIZE 0x238
#define ZP_E820_TABLE 0x2d0
#define ZP_E820_ENTRY_SIZE 20
_Static_assert(sizeof(struct e820_entry) == ZP_E820_ENTRY_SIZE, "e820 entry layout");

/* PVH: struct hvm_start_info (Xen public/arch-x86/hvm/start_info.h). */
#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};

struct hvm_memmap_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

struct boot_info boot;

static void copy_cmdline(uint64_t addr, uint32_t size)
{
	const char *src = (const char *)addr;
	uint32_t limit = size ? size : CMDLINE_MAX;
	uint32_t i;

	boot.cmdline_addr = addr;
	boot.cmdline_size = size;
	if (!addr)
		return;
	for (i = 0; i < limit && i < CMDLINE_MAX - 1 && src[i]; i++)
		boot.cmdline[i] = src[i];
	boot.cmdline[i] = '\0';
	boot.cmdline_terminated = i < limit && !src[i];
}

void boot_copy_info(enum boot_kind kind, uint64_t info)
{
	const uint8_t *zp = (const uint8_t *)info;

	boot.kind = kind;
	if (kind == BOOT_PVH) {
		const struct hvm_start_info *si = (const void *)info;
		const struct hvm_memmap_entry *map = (const void *)si->memmap_paddr;

		if (si->magic != HVM_START_MAGIC)
			return;
		if (si->version >= 1) {
			uint32_t n = si->memmap_entries;

			if (n > E820_MAX_ENTRIES)
				n = E820_MAX_ENTRIES;
			for (uint32_t i = 0; i < n; i++) {
				boot.e820[i].addr = map[i].addr;
				boot.e820[i].size = map[i].size;
				boot.e820[i].type = map[i].type;
			}
			boot.e820_count = n;
		}
		copy_cmdline(si->cmdline_paddr, 0);
		return;
	}

	boot.e820_count = zp[ZP_E820_ENTRIES];
	if (boot.e820_count > E820_MAX_ENTRIES)
		boot.e820_count = E820_MAX_ENTRIES;
	memcpy(boot.e820, zp + ZP_E820_TABLE, boot.e820_count * ZP_E820_ENTRY_SIZE);
	copy_cmdline(*(const uint32_t *)(zp + ZP_CMD_LINE_PTR) |
			     (uint64_t)*(const uint32_t *)(zp + ZP_EXT_CMD_LINE_PTR) << 32,
		     *(const uint32_t *)(zp + ZP_CMDLINE_SIZE));
}

uint64_t e820_ram_between(uint64_t lo, uint64_t hi)
{
	uint64_t total = 0;

	for (uint32_t i = 0; i < boot.e820_count; i++) {
		uint64_t start = boot.e820[i].addr, end = start + boot.e820[i].size;

		if (boot.e820[i].type != E820_RAM)
			continue;
		if (start < lo)
			start = lo;
		if (end > hi)
			end = hi;
		if (end > start)
			total += end - start;
	}
	return total;
}

uint64_t e820_ram_top(void)
{
	uint64_t top = 0;

	for (uint32_t i = 0; i < boot.e820_count; i++)
		if (boot.e820[i].type == E820_RAM && boot.e820[i].addr + boot.e820[i].size > top)
			top = boot.e820[i].addr + boot.e820[i].size;
	return top;
}
