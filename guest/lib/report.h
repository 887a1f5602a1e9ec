/* kvm-unit-tests style reporting: tests call report(cond, "what was expected, what came") for
 * each check; the runner prints one line per test from the first failure (or the details). */
#ifndef PROBE_REPORT_H
#define PROBE_REPORT_H

#include <stdbool.h>
#include <stdint.h>

/* Name of the running test, used by the exception handlers too. */
extern const char *current_test;

/* Record a failure (the first one per test wins) unless cond holds; returns cond. */
bool report(bool cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* report() with `cond` evaluated before the message's arguments: C leaves the order of a call's
 * arguments open, and a message often names what `cond` itself sets (a device's error text). */
#define report_after(cond, ...) ({ bool cond_ = (cond); report(cond_, __VA_ARGS__); })
/* Has the current test failed so far? */
bool report_failed(void);
/* Text printed after "ok" when the test passes. */
void report_details(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void report_begin(const char *name);
/* Print "PROBE <name> ok[ details]" or "PROBE <name> FAIL <why>"; returns whether it passed. */
bool report_end(void);
/* Print "PROBE done <passed> passed, <failed> failed". */
void report_summary(void);
/* Count a test that failed without running (unknown name); prints its line. */
void report_unknown(const char *name, unsigned len);

/* An exception or unexpected interrupt (at CPL0): print the FAIL line and the summary, reset. */
void report_trap(uint64_t vector, uint64_t error, uint64_t rip, uint64_t cr2)
	__attribute__((noreturn));

/* Reset the machine through the i8042 (ends the VM); spins if that returns. */
void machine_reset(void) __attribute__((noreturn));

#endif
