/* The probe's CPL3 program: runs the tests named by probe=<test>[,<test>...] on the command line
 * (default: all but the benchmarks), one result line each, then a summary line, then resets. */
#include "lib/cpu.h"
#include "lib/probe.h"
#include "tests/tests.h"

struct test {
	const char *name;
	void (*run)(void);
	bool by_default;
};

static const struct test tests[] = {
	{ "serial", test_serial, true },
	{ "cmos", test_cmos, true },
	{ "e820", test_e820, true },
	{ "cpus", test_cpus, true },
	{ "cmdline", test_cmdline, true },
	{ "timer", test_timer, true },
	{ "outloop", test_outloop, false },
	{ "pci", test_pci, false },
	{ "blk", test_blk, false },
	{ "blk-ro", test_blk_ro, false },
	{ "rng", test_rng, false },
	{ "virtq-hostile", test_virtq_hostile, false },
	{ "virtq-overlap", test_virtq_overlap, false },
	{ "cmos-hostile", test_cmos_hostile, false },
	{ "net-arp", test_net_arp, false },
	{ "net-ping", test_net_ping, false },
	{ "net-udp", test_net_udp, false },
	{ "net-hostile", test_net_hostile, false },
	{ "blk-discard-bomb", test_blk_discard_bomb, false },
	{ "vsock-echo", test_vsock_echo, false },
	{ "vsock-connect", test_vsock_connect, false },
	{ "vsock-many", test_vsock_many, false },
	{ "vsock-slow-reader", test_vsock_slow_reader, false },
	{ "vsock-hostile", test_vsock_hostile, false },
	{ "balloon", test_balloon, false },
	{ "balloon-hostile", test_balloon_hostile, false },
	{ "spin", test_spin, false },
	{ "blkbench", test_blkbench, false },
	{ "netbench", test_netbench, false },
	{ "vsockbench", test_vsockbench, false },
};

static void run_test(const struct test *t)
{
	report_begin(t->name);
	t->run();
	report_end();
}

static void run_named(const char *name, size_t len)
{
	for (size_t i = 0; i < ARRAY_SIZE(tests); i++) {
		if (strlen(tests[i].name) == len && !memcmp(tests[i].name, name, len)) {
			run_test(&tests[i]);
			return;
		}
	}
	report_unknown(name, len);
}

void user_main(void)
{
	const char *list;
	size_t len;

	if (cmdline_find("probe", &list, &len)) {
		size_t start = 0;

		for (size_t i = 0; i <= len; i++) {
			if (i == len || list[i] == ',') {
				if (i > start)
					run_named(list + start, i - start);
				start = i + 1;
			}
		}
	} else {
		for (size_t i = 0; i < ARRAY_SIZE(tests); i++)
			if (tests[i].by_default)
				run_test(&tests[i]);
	}
	report_summary();
	machine_reset();
}
