/* TSC calibration against the PIT: channel 0 at ~1000 Hz through the 8259 (IRQ 0, counted by
 * the handler in entry.S), 20 ticks timed with rdtsc, then the PIT is stopped again. */
#include "lib/clock.h"
#include "lib/cpu.h"
#include "lib/io.h"

#define PIT_HZ 1193182
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_CH0_LOHI_RATE 0x34
#define PIT_CH0_LOHI_ONESHOT 0x30
#define PIT_DIVISOR 1193
#define CALIBRATION_TICKS 20
#define GIVE_UP_TSC (UINT64_C(20) << 30)	/* ~5-10 s of TSC without PIT ticks */
#define FALLBACK_TSC_PER_MS 2000000		/* a 2 GHz guess if the PIT never ticks */

static uint64_t per_ms;

static uint64_t calibrate(void)
{
	uint64_t start_tsc, end_tsc, give_up;
	uint32_t start;

	outb(PIT_CMD, PIT_CH0_LOHI_RATE);
	outb(PIT_CH0, PIT_DIVISOR & 0xff);
	outb(PIT_CH0, PIT_DIVISOR >> 8);
	outb(PIC1_DATA, inb(PIC1_DATA) & ~0x01);
	give_up = rdtsc() + GIVE_UP_TSC;

	/* Start on a tick edge. */
	start = READ_ONCE(timer_ticks);
	while (READ_ONCE(timer_ticks) == start && rdtsc() < give_up)
		cpu_relax();
	start = READ_ONCE(timer_ticks);
	start_tsc = rdtsc();
	while (READ_ONCE(timer_ticks) - start < CALIBRATION_TICKS && rdtsc() < give_up)
		cpu_relax();
	end_tsc = rdtsc();
	uint32_t ticks = READ_ONCE(timer_ticks) - start;

	outb(PIC1_DATA, inb(PIC1_DATA) | 0x01);
	outb(PIT_CMD, PIT_CH0_LOHI_ONESHOT);
	outb(PIT_CH0, 0xff);
	outb(PIT_CH0, 0xff);
	if (ticks < CALIBRATION_TICKS)
		return FALLBACK_TSC_PER_MS;
	/* Each tick is PIT_DIVISOR / PIT_HZ seconds. */
	return (end_tsc - start_tsc) * PIT_HZ / ((uint64_t)ticks * PIT_DIVISOR * 1000);
}

uint64_t tsc_per_ms(void)
{
	if (!per_ms)
		per_ms = calibrate() ?: 1;
	return per_ms;
}

uint64_t deadline_ms(uint64_t ms)
{
	return rdtsc() + ms * tsc_per_ms();
}

bool expired(uint64_t deadline)
{
	return (int64_t)(rdtsc() - deadline) >= 0;
}

uint64_t ms_since(uint64_t tsc)
{
	return (rdtsc() - tsc) / tsc_per_ms();
}

/* Local APIC timer registers; KVM (and QEMU) run it at a 1 GHz bus clock. */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define DIVIDE_BY_1 0xb
#define LAPIC_TICKS_PER_MS 1000000u

static void lapic_write(unsigned reg, uint32_t value)
{
	*(volatile uint32_t *)(LAPIC_BASE + reg) = value;
}

void lapic_timer_periodic(unsigned ms)
{
	if (!ms) {
		lapic_write(LAPIC_TIMER_INITIAL, 0);
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
		return;
	}
	lapic_write(LAPIC_TIMER_DIVIDE, DIVIDE_BY_1);
	lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | LAPIC_TIMER_VECTOR);
	lapic_write(LAPIC_TIMER_INITIAL, ms * LAPIC_TICKS_PER_MS);
}
