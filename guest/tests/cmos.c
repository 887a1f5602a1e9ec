/* cmos: the MC146818 RTC/NVRAM at 0x70/0x71 as Linux reads it: a valid date in BCD and the
 * same date in binary mode, register D's VRT bit, NVRAM read-back, and the memory-size
 * registers (0x34/0x35 and 0x5b-0x5d) matching the e820 map. Prints the date (UTC) so the
 * host can compare it with its own clock. */
#include "lib/cmos.h"
#include "lib/probe.h"
#include "tests/tests.h"

#define UNITS_64K (64 * KiB)
#define MEM_SLACK_UNITS 16	/* 1 MiB a firmware may take from the top of RAM */

static void check_date(unsigned date[RTC_FIELDS])
{
	uint8_t reg_b = cmos_read(RTC_REG_B), bcd[RTC_FIELDS], bin[RTC_FIELDS];
	unsigned again[RTC_FIELDS];
	bool read_ok = true;
	int tries;

	/* Read in BCD, then in binary; retry if the seconds ticked over in between. */
	for (tries = 0; tries < 3; tries++) {
		cmos_write(RTC_REG_B, reg_b & ~REG_B_DM_BINARY);
		read_ok &= rtc_read_date(bcd);
		cmos_write(RTC_REG_B, reg_b | REG_B_DM_BINARY);
		read_ok &= rtc_read_date(bin);
		if (bcd[RTC_F_SEC] == ((bin[RTC_F_SEC] / 10) << 4 | bin[RTC_F_SEC] % 10))
			break;
	}
	cmos_write(RTC_REG_B, reg_b);

	if (!report(read_ok, "register A: update in progress never cleared"))
		return;
	for (int i = 0; i < RTC_FIELDS; i++)
		report(bcd_valid(i == RTC_F_HOUR ? bcd[i] & ~HOUR_PM : bcd[i]),
		       "register 0x%02x in BCD mode is 0x%02x, not BCD", rtc_date_regs[i], bcd[i]);
	rtc_decode_date(bcd, reg_b & ~REG_B_DM_BINARY, date);
	rtc_decode_date(bin, reg_b | REG_B_DM_BINARY, again);
	for (int i = 0; i < RTC_FIELDS; i++)
		report(date[i] == again[i],
		       "register 0x%02x: BCD mode gives %u (0x%02x), binary mode %u (0x%02x)",
		       rtc_date_regs[i], date[i], bcd[i], again[i], bin[i]);
	report(rtc_date_in_range(date), "date out of range: %u%02u-%02u-%02u %02u:%02u:%02u",
	       date[RTC_F_CENT], date[RTC_F_YEAR], date[RTC_F_MON], date[RTC_F_DAY],
	       date[RTC_F_HOUR], date[RTC_F_MIN], date[RTC_F_SEC]);
}

static void check_nvram(void)
{
	static const uint8_t patterns[] = { 0x5a, 0xa5 };
	uint8_t saved = cmos_read(CMOS_NVRAM_TEST), got;

	for (size_t i = 0; i < ARRAY_SIZE(patterns); i++) {
		cmos_write(CMOS_NVRAM_TEST, patterns[i]);
		got = cmos_read(CMOS_NVRAM_TEST);
		report(got == patterns[i], "NVRAM 0x%02x: wrote 0x%02x, read 0x%02x",
		       CMOS_NVRAM_TEST, patterns[i], got);
	}
	cmos_write(CMOS_NVRAM_TEST, saved);
}

/* CMOS may round down or leave out up to MEM_SLACK_UNITS; 0x34/0x35 saturate at 0xffff. */
static bool mem_matches(uint64_t cmos_units, uint64_t e820_units, uint64_t max_units)
{
	if (e820_units > max_units)
		e820_units = max_units;
	return cmos_units <= e820_units + MEM_SLACK_UNITS &&
	       e820_units <= cmos_units + MEM_SLACK_UNITS;
}

static void check_memory_size(void)
{
	uint64_t below = cmos_read(CMOS_MEM_ABOVE_16M_LO) | cmos_read(CMOS_MEM_ABOVE_16M_HI) << 8;
	uint64_t above = cmos_read(CMOS_MEM_ABOVE_4G_LO) | cmos_read(CMOS_MEM_ABOVE_4G_MID) << 8 |
			 (uint64_t)cmos_read(CMOS_MEM_ABOVE_4G_HI) << 16;
	uint64_t e820_below = e820_ram_between(16 * MiB, 4 * GiB) / UNITS_64K;
	uint64_t e820_above = e820_ram_between(4 * GiB, ~UINT64_C(0)) / UNITS_64K;

	report(mem_matches(below, e820_below, 0xffff),
	       "CMOS 0x34/0x35 (RAM 16M-4G) is 0x%lx x 64K, e820 says 0x%lx", below, e820_below);
	report(mem_matches(above, e820_above, 0xffffff),
	       "CMOS 0x5b-0x5d (RAM above 4G) is 0x%lx x 64K, e820 says 0x%lx", above,
	       e820_above);
}

void test_cmos(void)
{
	unsigned date[RTC_FIELDS] = { 0 };
	uint8_t reg_d = cmos_read(RTC_REG_D);

	report(reg_d & REG_D_VRT, "register D: expected VRT (0x80) set, read 0x%02x", reg_d);
	check_date(date);
	check_nvram();
	check_memory_size();
	report_details("%u%02u-%02u-%02u %02u:%02u:%02u", date[RTC_F_CENT], date[RTC_F_YEAR],
		       date[RTC_F_MON], date[RTC_F_DAY], date[RTC_F_HOUR], date[RTC_F_MIN],
		       date[RTC_F_SEC]);
}
