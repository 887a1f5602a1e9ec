/* cmdline: the kernel command line is NUL-terminated within cmdline_size and printable ASCII;
 * prints it whole so the host can compare it with what it passed. */
#include "lib/probe.h"
#include "tests/tests.h"

void test_cmdline(void)
{
	if (!report(boot.cmdline_addr != 0, "cmd_line_ptr is 0"))
		return;
	if (boot.kind == BOOT_LINUX64)
		report(boot.cmdline_size != 0, "cmdline_size is 0");
	if (!report(boot.cmdline_terminated,
		    "no NUL within cmdline_size %u (or the probe's %u-byte buffer) at 0x%lx",
		    boot.cmdline_size, CMDLINE_MAX, boot.cmdline_addr))
		return;
	for (size_t i = 0; boot.cmdline[i]; i++)
		if (!report(boot.cmdline[i] >= 0x20 && boot.cmdline[i] < 0x7f,
			    "byte %lu is 0x%02x, expected printable ASCII", i,
			    (unsigned char)boot.cmdline[i]))
			return;
	report_details("%s", boot.cmdline);
}
