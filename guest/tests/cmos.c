/* cmos: the MC146818 RTC/NVRAM at 0x70/0x71 as Linux reads it: a valid date in BCD and the
 * same date in binary mode, register D's VRT bit, NVRAM read-back, and the memory-size
 * registers (0x34/0x35 and 0x5b-0x5d) matching the e820 map. Prints the date (UTC) so the
 * host can compare it with its own clock. */
#include "lib/probe.h"
#include "tests/tests.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

enum cmos_reg {
	RTC_SECONDS = 0x00,
	RTC_MINUTES = 0x02,
	RTC_HOURS = 0x04,
	RTC_DAY = 0x07,
	RTC_MONTH = 0x08,
	RTC_YEAR = 0x09,
	RTC_REG_A = 0x0a,
	RTC_REG_B = 0x0b,
	RTC_REG_D = 0x0d,
	RTC_CENTURY = 0x32,
	CMOS_MEM_ABOVE_16M_LO = 0x34,	/* RAM between 16 MiB and 4 GiB, 64 KiB units */
	CMOS_MEM_ABOVE_16M_HI = 0x35,
	CMOS_MEM_ABOVE_4G_LO = 0x5b,	/* RAM above 4 GiB, 64 KiB units (24 bits) */
	CMOS_MEM_ABOVE_4G_MID = 0x5c,
	CMOS_MEM_ABOVE_4G_HI = 0x5d,
	CMOS_NVRAM_TEST = 0x40,
};

#define REG_A_UIP 0x80
#define REG_B_24H 0x02
#define REG_B_DM_BINARY 0x04
#define REG_D_VRT 0x80
#define HOUR_PM 0x80
#define UIP_POLLS 20000
#define UNITS_64K (64 * KiB)
#define MEM_SLACK_UNITS 16	/* 1 MiB a firmware may take from the top of RAM */

/* Raw register values: seconds, minutes, hours, day, month, year, century. */
#define N_FIELDS 7
static const uint8_t date_regs[N_FIELDS] = {
	RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY, RTC_MONTH, RTC_YEAR, RTC_CENTURY,
};
enum { SEC, MIN, HOUR, DAY, MON, YEAR, CENT };

static uint8_t cmos_read(uint8_t reg)
{
	outb(CMOS_INDEX, reg);
	return inb(CMOS_DATA);
}

static void cmos_write(uint8_t reg, uint8_t value)
{
	outb(CMOS_INDEX, reg);
	outb(CMOS_DATA, value);
}

/* Wait for no update in progress, then read the date registers; false on timeout. */
static bool read_date(uint8_t raw[N_FIELDS])
{
	int i;

	for (i = 0; i < UIP_POLLS && (cmos_read(RTC_REG_A) & REG_A_UIP); i++)
		;
	if (i == UIP_POLLS)
		return false;
	for (i = 0; i < N_FIELDS; i++)
		raw[i] = cmos_read(date_regs[i]);
	return true;
}

static bool valid_bcd(uint8_t v)
{
	return (v & 0x0f) <= 9 && (v >> 4) <= 9;
}

/* Decode raw registers (BCD or binary, 12 or 24 hour) into plain numbers. */
static void decode_date(const uint8_t raw[N_FIELDS], uint8_t reg_b, unsigned out[N_FIELDS])
{
	for (int i = 0; i < N_FIELDS; i++) {
		uint8_t v = i == HOUR ? raw[i] & ~HOUR_PM : raw[i];

		out[i] = reg_b & REG_B_DM_BINARY ? v : (v >> 4) * 10 + (v & 0x0f);
	}
	if (!(reg_b & REG_B_24H)) {
		out[HOUR] %= 12;
		if (raw[HOUR] & HOUR_PM)
			out[HOUR] += 12;
	}
}

static void check_date(unsigned date[N_FIELDS])
{
	uint8_t reg_b = cmos_read(RTC_REG_B), bcd[N_FIELDS], bin[N_FIELDS];
	unsigned again[N_FIELDS];
	bool read_ok = true;
	int tries;

	/* Read in BCD, then in binary; retry if the seconds ticked over in between. */
	for (tries = 0; tries < 3; tries++) {
		cmos_write(RTC_REG_B, reg_b & ~REG_B_DM_BINARY);
		read_ok &= read_date(bcd);
		cmos_write(RTC_REG_B, reg_b | REG_B_DM_BINARY);
		read_ok &= read_date(bin);
		if (bcd[SEC] == ((bin[SEC] / 10) << 4 | bin[SEC] % 10))
			break;
	}
	cmos_write(RTC_REG_B, reg_b);

	if (!report(read_ok, "register A: update in progress never cleared"))
		return;
	for (int i = 0; i < N_FIELDS; i++)
		report(valid_bcd(i == HOUR ? bcd[i] & ~HOUR_PM : bcd[i]),
		       "register 0x%02x in BCD mode is 0x%02x, not BCD", date_regs[i], bcd[i]);
	decode_date(bcd, reg_b & ~REG_B_DM_BINARY, date);
	decode_date(bin, reg_b | REG_B_DM_BINARY, again);
	for (int i = 0; i < N_FIELDS; i++)
		report(date[i] == again[i],
		       "register 0x%02x: BCD mode gives %u (0x%02x), binary mode %u (0x%02x)",
		       date_regs[i], date[i], bcd[i], again[i], bin[i]);
	report(date[SEC] < 60 && date[MIN] < 60 && date[HOUR] < 24 && date[DAY] >= 1 &&
		       date[DAY] <= 31 && date[MON] >= 1 && date[MON] <= 12 && date[CENT] >= 19 &&
		       date[CENT] <= 21,
	       "date out of range: %u%02u-%02u-%02u %02u:%02u:%02u", date[CENT], date[YEAR],
	       date[MON], date[DAY], date[HOUR], date[MIN], date[SEC]);
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
	unsigned date[N_FIELDS] = { 0 };
	uint8_t reg_d = cmos_read(RTC_REG_D);

	report(reg_d & REG_D_VRT, "register D: expected VRT (0x80) set, read 0x%02x", reg_d);
	check_date(date);
	check_nvram();
	check_memory_size();
	report_details("%u%02u-%02u-%02u %02u:%02u:%02u", date[CENT], date[YEAR], date[MON],
		       date[DAY], date[HOUR], date[MIN], date[SEC]);
}
