/* cmos-hostile: the RTC given values no clock has. (a) With register B as usual (BCD, 24 hour),
 * probe.count=N (default 10000) writes to the month register of 0x13, 0xff and 0x00 in turn;
 * then the month read before is written back and the date must be valid again. (b) With
 * register B's SET bit on in BCD mode (0x82), 0xff goes to the seconds register and is read
 * back (any value, reported); then the date read before is written back, SET cleared, and the
 * clock must read a valid BCD date (every digit 0-9, fields in range) within 2 s of it that
 * moves on within ~3 s. `PROBE cmos-hostile ok <n> writes <ms> ms readback 0x<v>`. The host
 * checks what the VMM logged meanwhile: a few lines, not one per write.
 *
 * The writes are plain outb: `rep outsb` would not be cheaper, KVM emulates it one byte per
 * exit (measured on PVM: 4096 bytes gave 4096 exits of count 1, ~120 us each under pyvmm). */
#include "lib/clock.h"
#include "lib/cmos.h"
#include "lib/probe.h"
#include "tests/tests.h"

#define DEFAULT_WRITES 10000
#define TICK_TIMEOUT_MS 3000	/* generous: the TSC calibration can be off under host load */
#define TICK_POLL_MS 20
#define SET_SLACK_S 2		/* the clock may have moved on this much since it was set */
#define SECONDS_PER_DAY 86400
#define REG_B_NORMAL REG_B_24H	/* BCD, 24 hour, no interrupts */
#define BAD_SECONDS 0xff

static const uint8_t bad_months[] = { 0x13, 0xff, 0x00 };

/* Read the date (register B normal); false (reported) unless it is valid BCD and in range. */
static bool read_valid_date(uint8_t raw[RTC_FIELDS], unsigned date[RTC_FIELDS], const char *when)
{
	if (!report(rtc_read_date(raw), "%s: register A: update in progress never cleared", when))
		return false;
	for (int i = 0; i < RTC_FIELDS; i++)
		if (!report(bcd_valid(raw[i]), "%s: register 0x%02x is 0x%02x, not BCD", when,
			    rtc_date_regs[i], raw[i]))
			return false;
	rtc_decode_date(raw, REG_B_NORMAL, date);
	return report(rtc_date_in_range(date),
		      "%s: date out of range: %u%02u-%02u-%02u %02u:%02u:%02u", when,
		      date[RTC_F_CENT], date[RTC_F_YEAR], date[RTC_F_MON], date[RTC_F_DAY],
		      date[RTC_F_HOUR], date[RTC_F_MIN], date[RTC_F_SEC]);
}

/* Seconds from a to b within one day (b at or after a, modulo midnight). */
static unsigned seconds_after(const unsigned a[RTC_FIELDS], const unsigned b[RTC_FIELDS])
{
	unsigned sa = a[RTC_F_HOUR] * 3600 + a[RTC_F_MIN] * 60 + a[RTC_F_SEC];
	unsigned sb = b[RTC_F_HOUR] * 3600 + b[RTC_F_MIN] * 60 + b[RTC_F_SEC];

	return (sb + SECONDS_PER_DAY - sa) % SECONDS_PER_DAY;
}

/* (a): count impossible months; how long they took (ms), or -1 after a failure. */
static int64_t month_flood(uint64_t count)
{
	uint8_t before[RTC_FIELDS], raw[RTC_FIELDS];
	unsigned date[RTC_FIELDS];
	uint64_t start, elapsed;

	cmos_write(RTC_REG_B, REG_B_NORMAL);
	if (!read_valid_date(before, date, "before the flood"))
		return -1;
	outb(CMOS_INDEX, RTC_MONTH);
	start = rdtsc();
	for (uint64_t i = 0; i < count; i++)
		outb(CMOS_DATA, bad_months[i % ARRAY_SIZE(bad_months)]);
	elapsed = ms_since(start);
	cmos_write(RTC_MONTH, before[RTC_F_MON]);
	if (!read_valid_date(raw, date, "after the flood"))
		return -1;
	return elapsed;
}

/* (b): 0xff into the seconds while SET; the value read back, or -1 after a failure. */
static int bad_seconds_while_set(void)
{
	uint8_t saved[RTC_FIELDS], raw[RTC_FIELDS], readback, second;
	unsigned set_date[RTC_FIELDS], now[RTC_FIELDS], later[RTC_FIELDS], gap;
	uint64_t deadline, poll;

	cmos_write(RTC_REG_B, REG_B_NORMAL);
	if (!read_valid_date(saved, set_date, "before SET"))
		return -1;
	cmos_write(RTC_REG_B, REG_B_SET | REG_B_NORMAL);
	cmos_write(RTC_SECONDS, BAD_SECONDS);
	readback = cmos_read(RTC_SECONDS);
	for (int i = 0; i < RTC_FIELDS; i++)
		cmos_write(rtc_date_regs[i], saved[i]);
	cmos_write(RTC_REG_B, REG_B_NORMAL);

	if (!read_valid_date(raw, now, "after SET"))
		return -1;
	gap = seconds_after(set_date, now);
	if (!report(gap <= SET_SLACK_S, "after SET: the clock reads %02u:%02u:%02u, %u s from "
		    "the %02u:%02u:%02u written", now[RTC_F_HOUR], now[RTC_F_MIN], now[RTC_F_SEC],
		    gap, set_date[RTC_F_HOUR], set_date[RTC_F_MIN], set_date[RTC_F_SEC]))
		return -1;
	/* Poll the seconds (a read every TICK_POLL_MS) until they move. */
	deadline = deadline_ms(TICK_TIMEOUT_MS);
	do {
		poll = deadline_ms(TICK_POLL_MS);
		while (!expired(poll))
			cpu_relax();
		second = cmos_read(RTC_SECONDS);
	} while (second == raw[RTC_F_SEC] && !expired(deadline));
	if (!report(second != raw[RTC_F_SEC], "the clock stayed at %02u:%02u:%02u for %u ms",
		    now[RTC_F_HOUR], now[RTC_F_MIN], now[RTC_F_SEC], TICK_TIMEOUT_MS))
		return -1;
	if (!read_valid_date(raw, later, "once the clock moved"))
		return -1;
	gap = seconds_after(now, later);
	return report(gap >= 1 && gap <= 3, "the clock went from %02u:%02u:%02u to "
		      "%02u:%02u:%02u", now[RTC_F_HOUR], now[RTC_F_MIN], now[RTC_F_SEC],
		      later[RTC_F_HOUR], later[RTC_F_MIN], later[RTC_F_SEC]) ? readback : -1;
}

void test_cmos_hostile(void)
{
	uint64_t count = DEFAULT_WRITES;
	const char *value;
	size_t len;
	int readback;
	int64_t ms;

	if (cmdline_find("probe.count", &value, &len) &&
	    !report(parse_u64(value, len, &count), "probe.count is not a number"))
		return;
	ms = month_flood(count);
	if (ms < 0)
		return;
	readback = bad_seconds_while_set();
	if (readback < 0)
		return;
	report_details("%lu writes %ld ms readback 0x%02x", count, ms, readback);
}
