/* Per-test result lines, the summary line and the i8042 reset that ends a run. */
#include "lib/report.h"
#include "lib/console.h"
#include "lib/io.h"
#include "lib/util.h"

#define I8042_COMMAND 0x64
#define I8042_CMD_RESET 0xfe

const char *current_test = "setup";
static bool failed;
/* Big enough for the cmdline test's details: the whole command line. */
static char message[2200];
static unsigned tests_passed, tests_failed;

bool report(bool cond, const char *fmt, ...)
{
	va_list ap;

	if (cond || failed)
		return cond;
	failed = true;
	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	return false;
}

bool report_failed(void)
{
	return failed;
}

void report_details(const char *fmt, ...)
{
	va_list ap;

	if (failed)
		return;
	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
}

void report_begin(const char *name)
{
	current_test = name;
	failed = false;
	message[0] = '\0';
}

bool report_end(void)
{
	if (failed) {
		tests_failed++;
		console_printf("PROBE %s FAIL %s\n", current_test, message);
	} else {
		tests_passed++;
		console_printf("PROBE %s ok%s%s\n", current_test, message[0] ? " " : "", message);
	}
	current_test = "runner";
	return !failed;
}

void report_unknown(const char *name, unsigned len)
{
	char copy[64];

	if (len >= sizeof(copy))
		len = sizeof(copy) - 1;
	memcpy(copy, name, len);
	copy[len] = '\0';
	tests_failed++;
	console_printf("PROBE %s FAIL unknown test\n", copy);
}

void report_trap(uint64_t vector, uint64_t error, uint64_t rip, uint64_t cr2)
{
	if (vector < 32)
		console_printf("PROBE %s FAIL exception %lu rip=0x%lx err=0x%lx", current_test, vector,
			       rip, error);
	else
		console_printf("PROBE %s FAIL unexpected interrupt %lu rip=0x%lx", current_test,
			       vector, rip);
	if (vector == 14)
		console_printf(" cr2=0x%lx", cr2);
	console_write("\n");
	tests_failed++;
	report_summary();
	machine_reset();
}

void report_summary(void)
{
	console_printf("PROBE done %u passed, %u failed\n", tests_passed, tests_failed);
}

void machine_reset(void)
{
	outb(I8042_COMMAND, I8042_CMD_RESET);
	for (;;)
		cpu_relax();
}
