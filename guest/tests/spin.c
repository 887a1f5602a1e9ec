/* spin: prints `PROBE spin <n>` (n = 1, 2, ...) every ~100 ms, timed with the TSC calibrated
 * against the PIT, and never ends: the host stops the VM through its control socket. */
#include "lib/clock.h"
#include "lib/probe.h"
#include "tests/tests.h"

#define INTERVAL_MS 100

void test_spin(void)
{
	uint64_t next = rdtsc(), interval = INTERVAL_MS * tsc_per_ms();

	for (uint64_t n = 1;; n++) {
		console_printf("PROBE spin %lu\n", n);
		next += interval;
		while (!expired(next))
			cpu_relax();
	}
}
