/* Reading the RTC's date (see lib/cmos.h). */
#include "lib/cmos.h"

#define UIP_POLLS 20000

const uint8_t rtc_date_regs[RTC_FIELDS] = {
	RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY, RTC_MONTH, RTC_YEAR, RTC_CENTURY,
};

bool rtc_read_date(uint8_t raw[RTC_FIELDS])
{
	int i;

	for (i = 0; i < UIP_POLLS && (cmos_read(RTC_REG_A) & REG_A_UIP); i++)
		;
	if (i == UIP_POLLS)
		return false;
	for (i = 0; i < RTC_FIELDS; i++)
		raw[i] = cmos_read(rtc_date_regs[i]);
	return true;
}

bool bcd_valid(uint8_t v)
{
	return (v & 0x0f) <= 9 && (v >> 4) <= 9;
}

void rtc_decode_date(const uint8_t raw[RTC_FIELDS], uint8_t reg_b, unsigned out[RTC_FIELDS])
{
	for (int i = 0; i < RTC_FIELDS; i++) {
		uint8_t v = i == RTC_F_HOUR ? raw[i] & ~HOUR_PM : raw[i];

		out[i] = reg_b & REG_B_DM_BINARY ? v : (v >> 4) * 10 + (v & 0x0f);
	}
	if (!(reg_b & REG_B_24H)) {
		out[RTC_F_HOUR] %= 12;
		if (raw[RTC_F_HOUR] & HOUR_PM)
			out[RTC_F_HOUR] += 12;
	}
}

bool rtc_date_in_range(const unsigned date[RTC_FIELDS])
{
	return date[RTC_F_SEC] < 60 && date[RTC_F_MIN] < 60 && date[RTC_F_HOUR] < 24 &&
	       date[RTC_F_DAY] >= 1 && date[RTC_F_DAY] <= 31 && date[RTC_F_MON] >= 1 &&
	       date[RTC_F_MON] <= 12 && date[RTC_F_CENT] >= 19 && date[RTC_F_CENT] <= 21;
}
