/* The MC146818 RTC/NVRAM at ports 0x70 (index) and 0x71 (data): register numbers and bits,
 * and one-register reads and writes (two port exits each). */
#ifndef PROBE_CMOS_H
#define PROBE_CMOS_H

#include <stdbool.h>
#include <stdint.h>

#include "lib/io.h"

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
#define REG_B_SET 0x80
#define REG_D_VRT 0x80
#define HOUR_PM 0x80

/* The date registers, in the order rtc_read_date() returns them. */
enum rtc_field { RTC_F_SEC, RTC_F_MIN, RTC_F_HOUR, RTC_F_DAY, RTC_F_MON, RTC_F_YEAR, RTC_F_CENT,
		 RTC_FIELDS };
extern const uint8_t rtc_date_regs[RTC_FIELDS];

static inline uint8_t cmos_read(uint8_t reg)
{
	outb(CMOS_INDEX, reg);
	return inb(CMOS_DATA);
}

static inline void cmos_write(uint8_t reg, uint8_t value)
{
	outb(CMOS_INDEX, reg);
	outb(CMOS_DATA, value);
}

/* Wait (bounded) for no update in progress, then read the date registers; false on timeout. */
bool rtc_read_date(uint8_t raw[RTC_FIELDS]);
/* Both digits of a BCD byte are 0-9. */
bool bcd_valid(uint8_t v);
/* Raw registers (BCD or binary as in reg_b, 12 or 24 hour) as plain numbers. */
void rtc_decode_date(const uint8_t raw[RTC_FIELDS], uint8_t reg_b, unsigned out[RTC_FIELDS]);
/* Every field of a decoded date in range (day 1-31, month 1-12, century 19-21, ...). */
bool rtc_date_in_range(const unsigned date[RTC_FIELDS]);

#endif
