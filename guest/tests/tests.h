/* The tests, one per file in tests/; each runs at CPL3 and reports through lib/report.h. */
#ifndef PROBE_TESTS_H
#define PROBE_TESTS_H

void test_serial(void);
void test_cmos(void);
void test_e820(void);
void test_cpus(void);
void test_cmdline(void);
void test_timer(void);
void test_outloop(void);

#endif
