/* Time for bounded waits: the TSC, calibrated once (on first use, ~20 ms) against PIT
 * interrupts. Reading the TSC costs no exit, so polling loops can check it every iteration. */
#ifndef PROBE_CLOCK_H
#define PROBE_CLOCK_H

#include <stdbool.h>
#include <stdint.h>

/* TSC ticks per millisecond (calibrates on the first call). */
uint64_t tsc_per_ms(void);
/* A deadline ms milliseconds from now, and whether it has passed. */
uint64_t deadline_ms(uint64_t ms);
bool expired(uint64_t deadline);
/* Milliseconds since a rdtsc() value. */
uint64_t ms_since(uint64_t tsc);

#endif
