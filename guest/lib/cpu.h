/* The CPL0 set-up (descriptor tables, paging, PICs) and the interface to the entry code. */
#ifndef PROBE_CPU_H
#define PROBE_CPU_H

#include <stdint.h>

/* Our GDT: selectors. */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SEL 0x28

/* 8259 PICs, remapped to vectors 0x20-0x2f. */
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI 0x20
#define IRQ_BASE 0x20

/* Timer interrupts counted by the IRQ 0 handler (entry.S). */
extern volatile uint32_t timer_ticks;

/* Local APIC (xAPIC MMIO), software-enabled at set-up with 0xff as its spurious vector. */
#define LAPIC_BASE 0xfee00000UL
#define LAPIC_ID 0x020
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_SVR_ENABLE 0x100
#define SPURIOUS_VECTOR 0xff

/* MSI/MSI-X interrupts on this vector are counted (and EOId at the LAPIC) by msi_irq. */
#define MSI_VECTOR 0x41
#define UD_VECTOR 6
extern volatile uint32_t msi_count;

/* Halt until the next interrupt unless msi_count is no longer `seen` (entry.S); callable at
 * CPL3. */
void irq_wait(uint32_t seen);

/* The local APIC timer, periodic every `ms` milliseconds (0: off), counted by lapic_timer_irq:
 * a bound on every irq_wait, should an expected interrupt never come. */
#define LAPIC_TIMER_VECTOR 0x42
extern volatile uint32_t lapic_timer_ticks;
void lapic_timer_periodic(unsigned ms);

/* Called from entry.S on the CPL0 stack; never returns (ends in iretq to CPL3). */
void cpl0_main(uint64_t kind, uint64_t info) __attribute__((noreturn));
/* The CPL3 program (main.c). */
void user_main(void) __attribute__((noreturn));

/* entry.S */
extern char vector_stubs[];	/* 256 stubs, 16 bytes apart, that call trap_fatal */
extern char timer_irq[], pic1_irq[], pic2_irq[], spurious_irq[], msi_irq[], lapic_timer_irq[];
extern char ud_trap[];	/* #UD: irq_wait's way in, else fatal */
void load_gdt(const void *desc);
void enter_user(void (*entry)(void), uint64_t stack) __attribute__((noreturn));

#endif
