/* vsockbench: stream throughput each way and connection rate through the first virtio-vsock
 * device (lib/virtio_vsock.h), against a host program on pyvmm's Unix socket (--cid N
 * --vsock-uds PATH). Parameters: probe.vsock.dir=tx|rx|conn (default tx), probe.vsock.bytes=N
 * (tx and rx, default 1 MiB, at most 64 MiB), probe.vsock.count=N (conn, default 1000), and
 * vsock.c's probe.vsock.port (where the guest listens, default 1234) and probe.vsock.host_port
 * (the host port tx connects to, default 5678: a listener at PATH_5678). dir may be a
 * comma-separated list: the k-th vsockbench in probe= takes the k-th item (the last one for runs
 * beyond the list), so that one boot runs several (`probe=vsockbench,vsockbench
 * probe.vsock.dir=tx,rx`). Each run sets the device up, prints `PROBE vsockbench start <dir>
 * <n>` (n: bytes, or connections) once it is ready for the host, and resets the device at its
 * end. Times are the guest's own (TSC), in microseconds; bench/vsock.py times each case on the
 * host too, and reports that (a loaded host can throw the TSC's calibration off).
 *
 * The data both ways is the byte pattern i % 251 at stream offset i (a prime period: a chunk
 * lost, repeated or out of place shows), checked cheaply: the first and last byte of every
 * chunk received, and the byte count.
 *
 * tx: connect to host_port and send `bytes` of the pattern as fast as the device's credit and
 * the 64 transmit buffers allow, then shut down sending and wait for the stream's end (the
 * device's RST once the host program has read everything and closed).
 * `PROBE vsockbench ok tx <bytes> bytes <us> us credit waits <w>`: from the connection to its
 * end.
 *
 * rx: listen on port, accept one stream, read until the host shuts down sending, then close.
 * `PROBE vsockbench ok rx <bytes> bytes <us> us first <n>`: the bytes, the time from the
 * first received chunk to the last, and the first chunk's bytes (not in that time: the rate is
 * (bytes - n) / us).
 *
 * conn: listen on port and accept `count` host streams one after another; on each, receive one
 * byte, send it back, close (SHUTDOWN both ways, the device's RST).
 * `PROBE vsockbench ok conn <count> connections <us> us`: from the first accept to the last
 * close. */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_vsock.h"
#include "tests/tests.h"

#define PATTERN_PERIOD 251
#define CHUNK (64 * 1024)
#define DEFAULT_COUNT 1000
#define MAX_COUNT 1000000
#define FIRST_ACCEPT_MS 30000		/* for the host's first connection */
#define NEXT_ACCEPT_MS 10000		/* for each one after */
#define CONNECT_TIMEOUT_MS 5000
#define SEND_TIMEOUT_MS 10000		/* without credit */
#define RECV_TIMEOUT_MS 10000
#define CLOSE_TIMEOUT_MS 2000
#define US_PER_MS 1000

enum direction { TX, RX, CONN };

static struct vsock vs;
static struct vsock_params params;
static struct virtio_dev *dev;
static unsigned runs;			/* vsockbench runs so far in this boot */
/* The pattern from any offset mod PATTERN_PERIOD, CHUNK bytes on. */
static uint8_t source[CHUNK + PATTERN_PERIOD];
static uint8_t sink[CHUNK];

static uint64_t us_between(uint64_t from, uint64_t to)
{
	return (to - from) * US_PER_MS / tsc_per_ms();
}

/* Item `index` of the comma-separated probe.vsock.dir (the last item if there are fewer):
 * false if it is not on the command line. */
static bool dir_item(unsigned index, const char **item, size_t *len)
{
	const char *value;
	size_t all, start = 0;

	if (!cmdline_find("probe.vsock.dir", &value, &all))
		return false;
	for (size_t i = 0; i <= all; i++) {
		if (i < all && value[i] != ',')
			continue;
		*item = value + start;
		*len = i - start;
		if (!index--)
			break;
		start = i + 1;
	}
	return true;
}

static bool word_is(const char *value, size_t len, const char *word)
{
	return strlen(word) == len && !memcmp(value, word, len);
}

/* Whether the first and last of len bytes received at stream offset `at` are the pattern's. */
static bool pattern_ok(const uint8_t *data, uint64_t len, uint64_t at)
{
	return data[0] == at % PATTERN_PERIOD && data[len - 1] == (at + len - 1) % PATTERN_PERIOD;
}

static void bench_tx(uint64_t bytes)
{
	struct vsock_stream *s;
	uint64_t sent = 0, begin, end;
	int64_t got;

	console_printf("PROBE vsockbench start tx %lu\n", bytes);
	s = vsock_connect(&vs, params.host_port, CONNECT_TIMEOUT_MS);
	if (!report(s, "connecting to host port %lu: %s", params.host_port, vs.error))
		return;
	begin = rdtsc();
	while (sent < bytes) {
		uint64_t n = bytes - sent < CHUNK ? bytes - sent : CHUNK;

		if (!report_after(vsock_send_all(&vs, s, source + sent % PATTERN_PERIOD, n,
						 SEND_TIMEOUT_MS), "after %lu bytes: %s", sent,
				  vs.error))
			return;
		sent += n;
	}
	if (!report_after(vsock_shutdown(&vs, s, VSOCK_SHUTDOWN_SEND), "%s", vs.error))
		return;
	/* The host program reads to the end and closes: the device resets the stream. */
	got = vsock_recv(&vs, s, sink, sizeof(sink), RECV_TIMEOUT_MS);
	end = rdtsc();
	if (!report(got == 0, "waiting for the host to close after %lu bytes: %s", bytes,
		    got > 0 ? "it sent data" : vs.error))
		return;
	report_details("tx %lu bytes %lu us credit waits %lu", bytes, us_between(begin, end),
		       s->credit_waits);
	vsock_close(&vs, s, CLOSE_TIMEOUT_MS);
}

static void bench_rx(uint64_t bytes)
{
	struct vsock_stream *s;
	uint64_t received = 0, first = 0, last = 0, first_len = 0;

	if (!report_after(vsock_listen(&vs, params.port), "%s", vs.error))
		return;
	console_printf("PROBE vsockbench start rx %lu\n", bytes);
	s = vsock_accept(&vs, params.port, FIRST_ACCEPT_MS);
	if (!report(s, "accepting: %s", vs.error))
		return;
	for (;;) {
		int64_t got = vsock_recv(&vs, s, sink, sizeof(sink), RECV_TIMEOUT_MS);

		if (!report(got >= 0, "after %lu of %lu bytes: %s", received, bytes, vs.error))
			return;
		if (!got)
			break;
		last = rdtsc();
		if (!received) {
			first = last;
			first_len = got;
		}
		if (!report(pattern_ok(sink, got, received), "%ld bytes at offset %lu are not the "
			    "pattern (first 0x%02x, last 0x%02x)", got, received, sink[0],
			    sink[got - 1]))
			return;
		received += got;
	}
	if (!report(received == bytes, "the stream ended after %lu of %lu bytes", received,
		    bytes) ||
	    !report_after(vsock_close(&vs, s, CLOSE_TIMEOUT_MS), "%s", vs.error))
		return;
	report_details("rx %lu bytes %lu us first %lu", received, us_between(first, last),
		       first_len);
}

static void bench_conn(uint64_t count)
{
	uint64_t begin = 0, done;

	if (!report_after(vsock_listen(&vs, params.port), "%s", vs.error))
		return;
	console_printf("PROBE vsockbench start conn %lu\n", count);
	for (done = 0; done < count; done++) {
		struct vsock_stream *s = vsock_accept(&vs, params.port,
						      done ? NEXT_ACCEPT_MS : FIRST_ACCEPT_MS);
		uint8_t byte;
		int64_t got;

		if (!report(s, "after %lu connections: %s", done, vs.error))
			return;
		if (!done)
			begin = rdtsc();
		got = vsock_recv(&vs, s, &byte, 1, RECV_TIMEOUT_MS);
		if (!report(got == 1, "connection %lu: no byte came: %s", done,
			    got == 0 ? "the stream ended" : vs.error) ||
		    !report_after(vsock_send_all(&vs, s, &byte, 1, SEND_TIMEOUT_MS),
				  "connection %lu: %s", done, vs.error) ||
		    !report_after(vsock_close(&vs, s, CLOSE_TIMEOUT_MS), "connection %lu: %s",
				  done, vs.error))
			return;
	}
	report_details("conn %lu connections %lu us", count, us_between(begin, rdtsc()));
}

void test_vsockbench(void)
{
	unsigned run = runs++;
	enum direction dir = TX;
	uint64_t count = DEFAULT_COUNT;
	const char *value, *why;
	size_t len;

	why = vsock_read_params(&params);
	if (!report(!why, "%s", why))
		return;
	if (dir_item(run, &value, &len)) {
		dir = word_is(value, len, "rx") ? RX : word_is(value, len, "conn") ? CONN : TX;
		if (!report(dir != TX || word_is(value, len, "tx"), "probe.vsock.dir: expected tx, "
			    "rx or conn"))
			return;
	}
	if (cmdline_find("probe.vsock.count", &value, &len) &&
	    !report(parse_u64(value, len, &count) && count && count <= MAX_COUNT,
		    "probe.vsock.count is not a number from 1 to %u", MAX_COUNT))
		return;
	for (unsigned i = 0; i < sizeof(source); i++)
		source[i] = i % PATTERN_PERIOD;
	dev = vsock_find();
	if (!report(dev, "no virtio-vsock device"))
		return;
	if (report_after(vsock_open(&vs, dev, true), "set-up of %02x:%02x.%x: %s", dev->pci.bus,
			 dev->pci.dev, dev->pci.fn, vs.error)) {
		if (dir == TX)
			bench_tx(params.bytes);
		else if (dir == RX)
			bench_rx(params.bytes);
		else
			bench_conn(count);
	}
	vsock_stop(&vs);
}
