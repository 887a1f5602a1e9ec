/* outloop: the exit-cost benchmark. probe.count=N (default 100000) outb's to the scratch port
 * 0x80 in a tight loop at CPL3. Prints `PROBE outloop start` just before the loop so the host
 * can time the loop alone, between that line and the `ok` line. */
#include "lib/probe.h"
#include "tests/tests.h"

#define SCRATCH_PORT 0x80
#define DEFAULT_COUNT 100000

void test_outloop(void)
{
	uint64_t count = DEFAULT_COUNT;
	const char *value;
	size_t len;

	if (cmdline_find("probe.count", &value, &len) &&
	    !report(parse_u64(value, len, &count), "probe.count is not a number"))
		return;
	console_write("PROBE outloop start\n");
	for (uint64_t i = 0; i < count; i++)
		outb(SCRATCH_PORT, (uint8_t)i);
	report_details("%lu", count);
}
