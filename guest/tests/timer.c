/* timer: PIT channel 0 at ~1000 Hz through the 8259 (IRQ 0, vector 0x20) reaches CPL3 code:
 * at least 10 ticks within ~2 s (counted on the RTC seconds, so no TSC calibration is needed). */
#include "lib/cpu.h"
#include "lib/probe.h"
#include "tests/tests.h"

#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_CH0_LOHI_RATE 0x34		/* channel 0, lobyte/hibyte, mode 2, binary */
#define PIT_CH0_LOHI_ONESHOT 0x30	/* mode 0: one edge at the terminal count, then quiet */
#define PIT_DIVISOR 1193		/* 1193182 Hz / 1193 = ~1000 Hz */
#define WANT_TICKS 10
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define MAX_SECONDS 3			/* RTC second changes: 2-3 s */
#define MAX_POLLS 3000			/* in case the RTC does not tick either */

static uint8_t rtc_seconds(void)
{
	outb(CMOS_INDEX, 0x00);
	return inb(CMOS_DATA);
}

void test_timer(void)
{
	uint32_t start, ticks = 0;
	unsigned seconds = 0, polls = 0;
	uint8_t sec = rtc_seconds(), now;

	outb(PIT_CMD, PIT_CH0_LOHI_RATE);
	outb(PIT_CH0, PIT_DIVISOR & 0xff);
	outb(PIT_CH0, PIT_DIVISOR >> 8);
	start = timer_ticks;
	outb(PIC1_DATA, inb(PIC1_DATA) & ~0x01);	/* unmask IRQ 0 */

	while (ticks < WANT_TICKS && seconds < MAX_SECONDS && polls < MAX_POLLS) {
		for (int i = 0; i < 100000; i++)	/* spin a little between RTC reads */
			cpu_relax();
		ticks = timer_ticks - start;
		now = rtc_seconds();
		if (now != sec) {
			sec = now;
			seconds++;
		}
		polls++;
	}

	outb(PIC1_DATA, inb(PIC1_DATA) | 0x01);	/* mask IRQ 0 */
	outb(PIT_CMD, PIT_CH0_LOHI_ONESHOT);		/* and stop the periodic timer */
	outb(PIT_CH0, 0xff);
	outb(PIT_CH0, 0xff);
	ticks = timer_ticks - start;

	if (report(ticks >= WANT_TICKS,
		   "expected >= %u IRQ 0 ticks at ~1000 Hz, got %u in %u RTC seconds (%u polls)",
		   WANT_TICKS, ticks, seconds, polls))
		report_details("%u ticks", ticks);
}
