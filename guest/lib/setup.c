/* CPL0 set-up, run once at start-up: copy the boot info, load our GDT (with user segments and a
 * 64-bit TSS whose I/O bitmap allows every port), our IDT, page tables that identity-map RAM
 * and the PCI hole (and up to 64 GiB, for BARs) with the U/S bit set, remap and mask the 8259
 * PICs, software-enable the local APIC, then iretq to CPL3.
 * On PVM every instruction here is emulated (~0.26 us), so it does as little as it can;
 * .bss is not cleared (the VMM's memory starts zeroed). */
#include "lib/boot.h"
#include "lib/cpu.h"
#include "lib/io.h"
#include "lib/report.h"
#include "lib/util.h"

#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_US 0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080
#define LARGE_PAGE (2 * MiB)
#define MAX_MAPPED_GIB 64	/* one page directory per GiB */

struct tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
	uint8_t iomap[8192];	/* all zero: every port allowed at CPL3 */
	uint8_t iomap_end;	/* must be 0xff */
} __attribute__((packed));

struct idt_gate {
	uint16_t offset_low;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset_mid;
	uint32_t offset_high;
	uint32_t reserved;
} __attribute__((packed));

struct table_desc {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

uint8_t cpl0_stack[16 * KiB] __attribute__((aligned(16)));
static uint8_t cpl3_stack[64 * KiB] __attribute__((aligned(16)));

static struct tss64 tss __attribute__((aligned(64))) = {
	.rsp = { (uint64_t)(cpl0_stack + sizeof(cpl0_stack)) },
	.iomap_base = offsetof(struct tss64, iomap),
	.iomap_end = 0xff,
};

static uint64_t gdt[7] __attribute__((aligned(16))) = {
	0,
	0x00af9a000000ffff,	/* 0x08 kernel code, 64-bit */
	0x00cf92000000ffff,	/* 0x10 kernel data */
	0x00cff2000000ffff,	/* 0x18 user data, DPL 3 */
	0x00affa000000ffff,	/* 0x20 user code, 64-bit, DPL 3 */
	0, 0,			/* 0x28 TSS (16 bytes), filled in below */
};

/* Also used by the 32-bit PVH entry (lgdt there reads the low 32 bits of base). */
const struct table_desc gdt_desc = { sizeof(gdt) - 1, (uint64_t)gdt };

static struct idt_gate idt[256] __attribute__((aligned(4096)));

static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[MAX_MAPPED_GIB * 512] __attribute__((aligned(4096)));

static void set_tss_descriptor(void)
{
	uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;

	gdt[TSS_SEL / 8] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ULL << 40 |
			   ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
	gdt[TSS_SEL / 8 + 1] = base >> 32;
}

static void set_gate(unsigned vector, const void *handler, unsigned dpl)
{
	uint64_t addr = (uint64_t)handler;

	idt[vector] = (struct idt_gate){
		.offset_low = addr & 0xffff,
		.selector = KERNEL_CS,
		.type_attr = 0x8e | dpl << 5,	/* present, 64-bit interrupt gate */
		.offset_mid = (addr >> 16) & 0xffff,
		.offset_high = addr >> 32,
	};
}

static void setup_idt(void)
{
	struct table_desc desc = { sizeof(idt) - 1, (uint64_t)idt };

	for (unsigned v = 0; v < 256; v++)
		set_gate(v, vector_stubs + 16 * v, v == 3 ? 3 : 0);	/* int3 allowed at CPL3 */
	set_gate(IRQ_BASE, timer_irq, 0);
	for (unsigned v = IRQ_BASE + 1; v < IRQ_BASE + 8; v++)
		set_gate(v, pic1_irq, 0);
	for (unsigned v = IRQ_BASE + 8; v < IRQ_BASE + 16; v++)
		set_gate(v, pic2_irq, 0);
	set_gate(SPURIOUS_VECTOR, spurious_irq, 0);	/* the local APIC's spurious vector */
	set_gate(MSI_VECTOR, msi_irq, 0);
	set_gate(LAPIC_TIMER_VECTOR, lapic_timer_irq, 0);
	set_gate(UD_VECTOR, ud_trap, 0);	/* irq_wait's way in; other #UDs stay fatal */
	asm volatile("lidt %0" : : "m"(desc));
}

/* CPUID.80000001H:EDX[26]: 1 GiB pages. */
static bool have_1g_pages(void)
{
	uint32_t eax = 0x80000000, ebx, ecx = 0, edx;

	asm volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
	if (eax < 0x80000001)
		return false;
	eax = 0x80000001;
	ecx = 0;
	asm volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
	return edx & (1u << 26);
}

/*
 * Identity-map [0, max(4 GiB, top of RAM)) with 2 MiB user-accessible pages; the part of the
 * 4 GiB below RAM's end (the PCI hole: IOAPIC, LAPIC, BARs) is cache-disabled. The rest up to
 * 64 GiB, where firmware may put 64-bit BARs, is mapped cache-disabled too, with 1 GiB pages
 * where the CPU has them (60 entries instead of 30720, each write emulated on PVM).
 */
static void setup_paging(void)
{
	uint64_t top = e820_ram_top(), low_ram_end = 0;

	if (top < 4 * GiB)
		top = 4 * GiB;
	top = (top + GiB - 1) & ~(GiB - 1);
	if (top > MAX_MAPPED_GIB * GiB)
		top = MAX_MAPPED_GIB * GiB;
	for (uint32_t i = 0; i < boot.e820_count; i++) {
		uint64_t end = boot.e820[i].addr + boot.e820[i].size;

		if (boot.e820[i].type == E820_RAM && boot.e820[i].addr < 4 * GiB && end > low_ram_end)
			low_ram_end = end < 4 * GiB ? end : 4 * GiB;
	}
	low_ram_end = (low_ram_end + LARGE_PAGE - 1) & ~(LARGE_PAGE - 1);

	pml4[0] = (uint64_t)pdpt | PTE_P | PTE_RW | PTE_US;
	for (uint64_t i = 0; i < top / GiB; i++)
		pdpt[i] = (uint64_t)&pd[i * 512] | PTE_P | PTE_RW | PTE_US;
	for (uint64_t addr = 0; addr < top; addr += LARGE_PAGE) {
		uint64_t flags = PTE_P | PTE_RW | PTE_US | PTE_PS;

		if (addr >= low_ram_end && addr < 4 * GiB)
			flags |= PTE_PCD | PTE_PWT;
		pd[addr / LARGE_PAGE] = addr | flags;
	}
	if (have_1g_pages()) {
		for (uint64_t i = top / GiB; i < MAX_MAPPED_GIB; i++)
			pdpt[i] = (i * GiB) | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PCD | PTE_PWT;
	} else {
		for (uint64_t i = top / GiB; i < MAX_MAPPED_GIB; i++)
			pdpt[i] = (uint64_t)&pd[i * 512] | PTE_P | PTE_RW | PTE_US;
		for (uint64_t addr = top; addr < MAX_MAPPED_GIB * GiB; addr += LARGE_PAGE)
			pd[addr / LARGE_PAGE] = addr | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PCD |
						 PTE_PWT;
	}
	asm volatile("mov %0, %%cr3" : : "r"(pml4) : "memory");
}

/* Remap the PICs to vectors 0x20-0x2f and mask everything but the cascade. */
static void setup_pics(void)
{
	outb(PIC1_CMD, 0x11);		/* ICW1: edge, cascade, ICW4 follows */
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, IRQ_BASE);	/* ICW2: vector base */
	outb(PIC2_DATA, IRQ_BASE + 8);
	outb(PIC1_DATA, 1 << 2);	/* ICW3: slave on IRQ 2 */
	outb(PIC2_DATA, 2);
	outb(PIC1_DATA, 0x01);		/* ICW4: 8086 mode */
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, 0xff & ~(1 << 2));
	outb(PIC2_DATA, 0xff);
}

void cpl0_main(uint64_t kind, uint64_t info)
{
	boot_copy_info((enum boot_kind)kind, info);
	set_tss_descriptor();
	load_gdt(&gdt_desc);
	asm volatile("ltr %w0" : : "r"(TSS_SEL));
	setup_idt();
	setup_paging();
	setup_pics();
	/* Software-enable the local APIC (for MSI-X); LINT0 keeps passing the PIC through. */
	*(volatile uint32_t *)(LAPIC_BASE + LAPIC_SVR) = LAPIC_SVR_ENABLE | SPURIOUS_VECTOR;
	/* The stack top minus 8 gives user_main the alignment of a called function. */
	enter_user(user_main, (uint64_t)(cpl3_stack + sizeof(cpl3_stack) - 8));
}

/* From the vector stubs (entry.S), at CPL0. */
void trap_fatal(uint64_t vector, uint64_t error, uint64_t rip)
{
	uint64_t cr2;

	asm volatile("mov %%cr2, %0" : "=r"(cr2));
	report_trap(vector, error, rip, cr2);
}
