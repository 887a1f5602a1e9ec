/* What the boot loader (pyvmm, or QEMU via PVH) told us: the memory map and the command line,
 * copied into .bss at start-up before any test can overwrite low RAM. */
#ifndef PROBE_BOOT_H
#define PROBE_BOOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define E820_MAX_ENTRIES 128
#define E820_RAM 1
#define CMDLINE_MAX 2048

/* How we were started: the Linux 64-bit boot protocol (RSI = zero page) or PVH (EBX = start info). */
enum boot_kind { BOOT_LINUX64 = 0, BOOT_PVH = 1 };

/* As in the zero page's e820_table: packed, 20 bytes. */
struct e820_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
} __attribute__((packed));

struct boot_info {
	enum boot_kind kind;
	uint32_t e820_count;
	struct e820_entry e820[E820_MAX_ENTRIES];
	uint64_t cmdline_addr;
	uint32_t cmdline_size;      /* as the boot loader gave it (0 = not given) */
	bool cmdline_terminated;    /* a NUL was found within cmdline_size */
	char cmdline[CMDLINE_MAX];  /* always NUL-terminated */
};

extern struct boot_info boot;

/* Image bounds from the linker script: [_start, _end) holds code, data, .bss, stacks, tables. */
extern char _start[], _end[];

/* CPL0, first thing after entry: copy the memory map and command line. */
void boot_copy_info(enum boot_kind kind, uint64_t info);

/* Sum of usable RAM (e820 type 1) inside [lo, hi). */
uint64_t e820_ram_between(uint64_t lo, uint64_t hi);
/* End of the highest usable RAM range (0 if none). */
uint64_t e820_ram_top(void);

/* lib/cmdline.c. Find "key=value" and return the value (not NUL-terminated) and its length. */
bool cmdline_find(const char *key, const char **value, size_t *len);
/* "key=<number>"; false if absent or not a number. */
bool cmdline_u64(const char *key, uint64_t *value);

#endif
