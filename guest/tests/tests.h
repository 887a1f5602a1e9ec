/* The tests, one per file in tests/; each runs at CPL3 and reports through lib/report.h. */
#ifndef PROBE_TESTS_H
#define PROBE_TESTS_H

void test_serial(void);
void test_cmos(void);
void test_cmos_hostile(void);
void test_e820(void);
void test_cpus(void);
void test_cmdline(void);
void test_timer(void);
void test_outloop(void);
void test_pci(void);
void test_blk(void);
void test_blk_ro(void);
void test_blk_discard_bomb(void);
void test_rng(void);
void test_virtq_hostile(void);
void test_virtq_overlap(void);
void test_net_arp(void);
void test_net_ping(void);
void test_net_udp(void);
void test_net_hostile(void);
void test_vsock_echo(void);
void test_vsock_connect(void);
void test_vsock_many(void);
void test_vsock_slow_reader(void);
void test_vsock_hostile(void);
void test_balloon(void);
void test_balloon_hostile(void);
void test_spin(void);
void test_blkbench(void);
void test_netbench(void);
void test_vsockbench(void);

#endif
