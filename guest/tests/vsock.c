/* The first virtio-vsock device (lib/virtio_vsock.h), against host programs on the other side
 * of pyvmm's Unix socket (--cid N --vsock-uds PATH). Parameters: probe.vsock.port=N (where the
 * guest listens, default 1234), probe.vsock.host_port=N (the host port the guest connects to,
 * default 5678: a listener at PATH_5678), probe.vsock.bytes=N (what vsock-connect and
 * vsock-slow-reader send, default 1 MiB), probe.vsock.streams=N (vsock-many, default 16),
 * probe.vsock.flood=N (vsock-hostile's REQUESTs, default 1000). Each test resets the device at
 * its end.
 *
 * The host listener's protocol (vsock-connect, vsock-slow-reader, vsock-hostile): the guest
 * sends n bytes of the PRNG stream VSOCK_SEED_GUEST and shuts down sending; the host reads to
 * the end, and if the bytes are that stream answers n bytes of the stream VSOCK_SEED_HOST
 * (else a line "MISMATCH ..."), then closes.
 *
 * vsock-echo: listen on `port`, accept one stream and echo every byte until the peer shuts
 * down, then close. `PROBE vsock-echo ok cid <cid> port <port> echoed <n> bytes in <ms> ms`.
 *
 * vsock-many: the same with `streams` streams at once, each echoed on its own.
 * `PROBE vsock-many ok <streams> streams <total> bytes in <ms> ms`.
 *
 * vsock-connect: connect to `host_port`, a CREDIT_REQUEST answered by a CREDIT_UPDATE, then the
 * listener's protocol with n = bytes. `PROBE vsock-connect ok sent <n> received <n> peer
 * buf_alloc <b> credit waits <w> in <ms> ms`.
 *
 * vsock-slow-reader: the same while the host reads slowly: the guest must have waited for
 * credit at least once (each time its credit ran out with data left counts one), and every
 * byte arrived. `PROBE vsock-slow-reader ok sent <n> credit waits <w> credit updates <u> in
 * <ms> ms`.
 *
 * vsock-hostile: with no receive buffers posted, `flood` REQUESTs to host ports nobody listens
 * on (60000 + i, from guest ports 20000 + i), RWs to 8 unknown streams, then packets the device
 * must refuse or answer with RST (see `cases`): a bad src_cid, the host's own CID as source, our
 * own CID as destination, a SEQPACKET type, operation 0 and 42, a header claiming more payload
 * than its chain has (1000 and 0xffffffff bytes), a 20-byte chain, a chain with a device-writable
 * descriptor, a header split over two descriptors (legal). Every transmit chain must come back
 * within 5 s. Then two unfit receive buffers (device-readable; 16 bytes) and the real ones:
 * the unfit ones must come back empty, and an RST must come for every REQUEST of the flood and
 * every RW and every case marked so. Then a chain with its packet at 1 TiB (used, or
 * DEVICE_NEEDS_RESET and a reset), operation 42 and a second REQUEST on live streams (each
 * answered by RST), and finally the listener's protocol with 64 KiB must work.
 * `PROBE vsock-hostile ok flood <n>/<n> rst rw 8/8 rst cases <k>:<rst|none>... 1TiB:<used|reset>
 * op42:rst dup:rst then 65536 bytes`. */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_vsock.h"
#include "tests/tests.h"

#define ACCEPT_TIMEOUT_MS 30000		/* for the host's first connection */
#define IDLE_TIMEOUT_MS 10000		/* nothing moved on any stream */
#define CONNECT_TIMEOUT_MS 5000
#define CLOSE_TIMEOUT_MS 2000
#define CREDIT_TIMEOUT_MS 2000
#define SEND_TIMEOUT_MS 10000		/* without credit */
#define RECV_TIMEOUT_MS 10000
#define ECHO_CHUNK 4096
#define CHUNK (4 * VSOCK_PAYLOAD_MAX)
#define MISMATCH_TEXT 60
#define HOSTILE_BYTES (64 * 1024)
#define FLOOD_GUEST_PORT 20000
#define FLOOD_HOST_PORT 60000
#define RW_GUEST_PORT 30000
#define RW_HOST_PORT 61000
#define RW_COUNT 8
#define RW_PAYLOAD 100
#define CASE_GUEST_PORT 31000
#define CASE_HOST_PORT 62000
#define BAD_CID 99
#define TYPE_SEQPACKET 2
#define OP_UNKNOWN 42
#define SHORT_CHAIN 20
#define TX_DRAIN_MS 5000
#define RST_IDLE_MS 3000
#define OUTCOME_MS 1000
#define OUTSIDE_RAM (1ULL << 40)	/* 1 TiB */
#define UNFIT_RX_LEN 16

static struct vsock vs;
static struct vsock_params params;
static struct virtio_dev *dev;
static uint8_t chunk[CHUNK];

/* Parameters and the device, set up (receive buffers posted unless !post_rx). */
static bool start(bool post_rx)
{
	const char *why = vsock_read_params(&params);
	bool ok;

	if (!report(!why, "%s", why))
		return false;
	dev = vsock_find();
	if (!report(dev, "no virtio-vsock device"))
		return false;
	ok = vsock_open(&vs, dev, post_rx);
	return report(ok, "set-up of %02x:%02x.%x: %s", dev->pci.bus, dev->pci.dev, dev->pci.fn,
		      vs.error);
}

static void stop(void)
{
	if (dev)
		vsock_stop(&vs);
	dev = NULL;
}

/* ---- vsock-echo, vsock-many ---- */

struct echo {
	struct vsock_stream *s;
	uint8_t buf[ECHO_CHUNK];
	uint32_t len, off;		/* received into buf; of that, sent back */
	uint64_t bytes;			/* echoed (s is freed, maybe reused, once done) */
	bool done;
};

static struct echo echoes[VSOCK_MAX_STREAMS];

/* Move what one stream allows now; false (reported) on failure. *moved if anything did. */
static bool echo_step(struct echo *e, unsigned *done, bool *moved)
{
	if (e->off == e->len) {
		int64_t got = vsock_recv(&vs, e->s, e->buf, sizeof(e->buf), 0);

		if (!report(got != VSOCK_ERROR, "stream %u:%u: %s", e->s->local_port,
			    e->s->peer_port, vs.error))
			return false;
		if (got == 0) {	/* the peer is done and everything went back */
			bool closed = vsock_close(&vs, e->s, CLOSE_TIMEOUT_MS);

			e->done = true;
			++*done;
			*moved = true;
			return report(closed, "%s", vs.error);
		}
		if (got > 0) {
			e->len = got;
			e->off = 0;
			*moved = true;
		}
	}
	if (e->off < e->len) {
		int64_t sent = vsock_send_some(&vs, e->s, e->buf + e->off, e->len - e->off);

		if (!report(sent >= 0, "echoing: %s", vs.error))
			return false;
		e->off += sent;
		e->bytes += sent;
		*moved |= sent > 0;
	}
	return true;
}

/* Accept n streams to params.port and echo each until its peer is done. */
static void echo_serve(unsigned n)
{
	uint64_t idle = deadline_ms(ACCEPT_TIMEOUT_MS), start_tsc = 0, total = 0;
	unsigned accepted = 0, done = 0;

	if (!report_after(vsock_listen(&vs, params.port), "%s", vs.error))
		return;
	while (done < n) {
		bool moved = false;

		if (accepted < n) {
			struct vsock_stream *s = vsock_accept(&vs, params.port, 0);

			if (!report(s || !vs.failed, "accepting: %s", vs.error))
				return;
			if (s) {
				echoes[accepted] = (struct echo){ .s = s };
				if (!accepted)
					start_tsc = rdtsc();
				accepted++;
				moved = true;
			}
		}
		for (unsigned i = 0; i < accepted; i++)
			if (!echoes[i].done && !echo_step(&echoes[i], &done, &moved))
				return;
		if (moved)
			idle = deadline_ms(IDLE_TIMEOUT_MS);
		else if (!report(!expired(idle), "%u of %u streams accepted, %u done: nothing "
				 "moved for %u ms", accepted, n, done,
				 accepted ? IDLE_TIMEOUT_MS : ACCEPT_TIMEOUT_MS))
			return;
	}
	for (unsigned i = 0; i < n; i++)
		total += echoes[i].bytes;
	if (n == 1)
		report_details("cid %lu port %lu echoed %lu bytes in %lu ms", vs.cid, params.port,
			       total, ms_since(start_tsc));
	else
		report_details("%u streams %lu bytes in %lu ms", n, total, ms_since(start_tsc));
}

void test_vsock_echo(void)
{
	if (start(true))
		echo_serve(1);
	stop();
}

void test_vsock_many(void)
{
	if (start(true))
		echo_serve(params.streams);
	stop();
}

/* ---- vsock-connect, vsock-slow-reader, and the end of vsock-hostile ---- */

struct transfer {
	uint64_t bytes;
	bool credit_request;		/* ask for credit first */
	uint64_t ms, credit_waits, credit_updates, peer_buf_alloc;
};

/* The host listener's protocol on a new stream; false (reported) on failure. */
static bool transfer(struct transfer *t)
{
	struct prng_stream out, in;
	struct vsock_stream *s = vsock_connect(&vs, params.host_port, CONNECT_TIMEOUT_MS);
	uint64_t start_tsc = rdtsc(), sent = 0, received = 0;

	if (!report(s, "connecting to host port %lu: %s", params.host_port, vs.error))
		return false;
	if (t->credit_request &&
	    !report_after(vsock_credit_request(&vs, s, CREDIT_TIMEOUT_MS), "%s", vs.error))
		return false;
	prng_start(&out, VSOCK_SEED_GUEST);
	while (sent < t->bytes) {
		uint32_t n = t->bytes - sent < CHUNK ? t->bytes - sent : CHUNK;

		prng_fill(&out, chunk, n);
		if (!report_after(vsock_send_all(&vs, s, chunk, n, SEND_TIMEOUT_MS), "sending: %s",
				  vs.error))
			return false;
		sent += n;
	}
	if (!report_after(vsock_shutdown(&vs, s, VSOCK_SHUTDOWN_SEND), "%s", vs.error))
		return false;
	prng_start(&in, VSOCK_SEED_HOST);
	for (;;) {
		int64_t got = vsock_recv(&vs, s, chunk, CHUNK, RECV_TIMEOUT_MS);

		if (!report(got >= 0, "after %lu of %lu bytes of the answer: %s", received,
			    t->bytes, vs.error))
			return false;
		if (got == 0)
			break;
		if (!prng_check(&in, chunk, got)) {
			chunk[got < MISMATCH_TEXT ? got : MISMATCH_TEXT] = 0;
			for (unsigned i = 0; chunk[i]; i++)
				if (chunk[i] < ' ' || chunk[i] > '~')
					chunk[i] = '.';
			return report(false, "the answer differs from byte %lu on: \"%s\"",
				      received, (char *)chunk);
		}
		received += got;
		if (!report(received <= t->bytes, "the answer is over %lu bytes", t->bytes))
			return false;
	}
	if (!report(received == t->bytes, "the answer has %lu bytes, expected %lu", received,
		    t->bytes))
		return false;
	t->ms = ms_since(start_tsc);
	t->credit_waits = s->credit_waits;
	t->credit_updates = s->credit_updates;
	t->peer_buf_alloc = s->peer_buf_alloc;
	return report_after(vsock_close(&vs, s, CLOSE_TIMEOUT_MS), "%s", vs.error);
}

void test_vsock_connect(void)
{
	struct transfer t = { .credit_request = true };

	if (start(true)) {
		t.bytes = params.bytes;
		if (transfer(&t))
			report_details("sent %lu received %lu peer buf_alloc %lu credit waits %lu "
				       "in %lu ms", t.bytes, t.bytes, t.peer_buf_alloc,
				       t.credit_waits, t.ms);
	}
	stop();
}

void test_vsock_slow_reader(void)
{
	struct transfer t = { 0 };

	if (start(true)) {
		t.bytes = params.bytes;
		if (transfer(&t) &&
		    report(t.credit_waits > 0, "%lu bytes went out without waiting for credit once "
			   "(peer buf_alloc %lu): the host read too fast, or the credit is not "
			   "bounded", t.bytes, t.peer_buf_alloc))
			report_details("sent %lu credit waits %lu credit updates %lu in %lu ms",
				       t.bytes, t.credit_waits, t.credit_updates, t.ms);
	}
	stop();
}

/* ---- vsock-hostile ---- */

enum case_kind { PACKET, SHORT, WRITABLE, SPLIT };

static const struct hostile_case {
	const char *what;
	enum case_kind kind;
	uint64_t src_cid;		/* 0: ours, as usual */
	bool to_self;			/* dst_cid is ours, not the host's */
	uint16_t type, op;
	uint32_t len, payload;		/* the header's len; the bytes that follow it */
	bool rst;			/* an RST must come back */
} cases[] = {
	{ "src_cid 99", PACKET, BAD_CID, false, VSOCK_TYPE_STREAM, VSOCK_OP_REQUEST, 0, 0, false },
	{ "src_cid 2", PACKET, VSOCK_HOST_CID, false, VSOCK_TYPE_STREAM, VSOCK_OP_REQUEST, 0, 0,
	  false },
	{ "dst_cid ours", PACKET, 0, true, VSOCK_TYPE_STREAM, VSOCK_OP_REQUEST, 0, 0, false },
	{ "seqpacket", PACKET, 0, false, TYPE_SEQPACKET, VSOCK_OP_REQUEST, 0, 0, false },
	{ "op 0", PACKET, 0, false, VSOCK_TYPE_STREAM, VSOCK_OP_INVALID, 0, 0, true },
	{ "op 42", PACKET, 0, false, VSOCK_TYPE_STREAM, OP_UNKNOWN, 0, 0, true },
	{ "len 1000 in 10", PACKET, 0, false, VSOCK_TYPE_STREAM, VSOCK_OP_RW, 1000, 10, false },
	{ "len 4G", PACKET, 0, false, VSOCK_TYPE_STREAM, VSOCK_OP_RW, 0xffffffff, 0, false },
	{ "20-byte chain", SHORT, 0, false, VSOCK_TYPE_STREAM, VSOCK_OP_REQUEST, 0, 0, false },
	{ "writable", WRITABLE, 0, false, VSOCK_TYPE_STREAM, VSOCK_OP_REQUEST, 0, 0, false },
	{ "split header", SPLIT, 0, false, VSOCK_TYPE_STREAM, VSOCK_OP_REQUEST, 0, 0, true },
};

#define NCASES ARRAY_SIZE(cases)

static uint8_t flood_rst[VSOCK_MAX_FLOOD / 8];
static unsigned flood_rsts, rw_rsts, case_rsts[NCASES];
static uint8_t case_pkt[NCASES][VSOCK_HDR_LEN + RW_PAYLOAD] __attribute__((aligned(16)));
static uint8_t writable_buf[64];
static uint8_t unfit_rx[2][VSOCK_PKT_SIZE];
static uint8_t far_hdr[VSOCK_HDR_LEN];

/* The RSTs the device sends for packets of no stream, by the guest port they answer. */
static void count_rst(struct vsock *v, const struct virtio_vsock_hdr *h)
{
	uint32_t port = h->dst_port;

	(void)v;
	if (h->op != VSOCK_OP_RST)
		return;
	if (port >= FLOOD_GUEST_PORT && port < FLOOD_GUEST_PORT + params.flood) {
		uint32_t i = port - FLOOD_GUEST_PORT;

		if (!(flood_rst[i / 8] & 1 << i % 8)) {
			flood_rst[i / 8] |= 1 << i % 8;
			flood_rsts++;
		}
	} else if (port >= RW_GUEST_PORT && port < RW_GUEST_PORT + RW_COUNT) {
		rw_rsts++;
	} else if (port >= CASE_GUEST_PORT && port < CASE_GUEST_PORT + NCASES) {
		case_rsts[port - CASE_GUEST_PORT]++;
	}
}

/* Queue case k on the transmit queue (outside the driver's buffers where the chain is odd). */
static bool send_case(unsigned k)
{
	const struct hostile_case *c = &cases[k];
	struct virtio_vsock_hdr h = vsock_hdr(&vs, CASE_GUEST_PORT + k, CASE_HOST_PORT + k, c->op,
					      c->len);
	uint8_t *pkt = case_pkt[k];
	struct vbuf b[2];

	if (c->src_cid)
		h.src_cid = c->src_cid;
	if (c->to_self)
		h.dst_cid = vs.cid;
	h.type = c->type;
	h.buf_alloc = VSOCK_BUF_ALLOC;
	memcpy(pkt, &h, VSOCK_HDR_LEN);
	memset(pkt + VSOCK_HDR_LEN, 'x', c->payload);
	switch (c->kind) {
	case PACKET:
		return vsock_send_raw(&vs, pkt, VSOCK_HDR_LEN + c->payload);
	case SHORT:
		return vsock_send_raw(&vs, pkt, SHORT_CHAIN);
	case WRITABLE:
		b[0] = (struct vbuf){ (uint64_t)pkt, VSOCK_HDR_LEN, false };
		b[1] = (struct vbuf){ (uint64_t)writable_buf, sizeof(writable_buf), true };
		break;
	case SPLIT:
		b[0] = (struct vbuf){ (uint64_t)pkt, SHORT_CHAIN, false };
		b[1] = (struct vbuf){ (uint64_t)pkt + SHORT_CHAIN, VSOCK_HDR_LEN - SHORT_CHAIN,
				      false };
		break;
	}
	if (virtq_add(&vs.tx, b, 2, pkt) < 0)
		return false;
	virtq_kick(&vs.tx);
	return true;
}

/* Everything of phase one goes out with no receive buffers posted; false (reported). */
static bool send_garbage(void)
{
	static uint8_t pkt[VSOCK_HDR_LEN + RW_PAYLOAD];

	for (uint32_t i = 0; i < params.flood; i++) {
		struct virtio_vsock_hdr h = vsock_hdr(&vs, FLOOD_GUEST_PORT + i,
						      FLOOD_HOST_PORT + i, VSOCK_OP_REQUEST, 0);

		h.buf_alloc = VSOCK_BUF_ALLOC;
		if (!report_after(vsock_send_raw(&vs, &h, VSOCK_HDR_LEN), "flood REQUEST %u: %s", i,
				  vs.error))
			return false;
	}
	for (uint32_t i = 0; i < RW_COUNT; i++) {
		struct virtio_vsock_hdr h = vsock_hdr(&vs, RW_GUEST_PORT + i, RW_HOST_PORT,
						      VSOCK_OP_RW, RW_PAYLOAD);

		memcpy(pkt, &h, VSOCK_HDR_LEN);
		memset(pkt + VSOCK_HDR_LEN, i, RW_PAYLOAD);
		if (!report_after(vsock_send_raw(&vs, pkt, sizeof(pkt)), "RW %u: %s", i, vs.error))
			return false;
	}
	for (unsigned k = 0; k < NCASES; k++)
		if (!report_after(send_case(k), "case %u (%s): %s", k, cases[k].what,
				  vs.error ? vs.error : "no free descriptors"))
			return false;
	return report_after(vsock_tx_drain(&vs, TX_DRAIN_MS), "%s", vs.error);
}

/* Unfit receive buffers, then the real ones; wait for the RSTs. */
static bool collect_rsts(void)
{
	struct vbuf readable = { (uint64_t)unfit_rx[0], VSOCK_PKT_SIZE, false };
	struct vbuf small = { (uint64_t)unfit_rx[1], UNFIT_RX_LEN, true };
	uint64_t idle = deadline_ms(RST_IDLE_MS), seen = 0;
	bool all = false;

	virtq_add(&vs.rx, &readable, 1, unfit_rx[0]);
	virtq_add(&vs.rx, &small, 1, unfit_rx[1]);
	vsock_post_rx(&vs);
	while (!all && !expired(idle)) {
		if (!report_after(vsock_poll(&vs), "%s", vs.error))
			return false;
		all = flood_rsts == params.flood && rw_rsts == RW_COUNT;
		for (unsigned k = 0; k < NCASES; k++)
			all &= !cases[k].rst || case_rsts[k];
		if (vs.rx_packets != seen) {
			seen = vs.rx_packets;
			idle = deadline_ms(RST_IDLE_MS);
		}
		cpu_relax();
	}
	if (!report(vs.rx_empty >= 2, "%lu unfit receive buffers came back empty, expected 2",
		    vs.rx_empty))
		return false;
	if (!report(flood_rsts == params.flood && rw_rsts == RW_COUNT, "RSTs for %u of %lu "
		    "REQUESTs to closed ports and %u of %u RWs to unknown streams (none new for "
		    "%u ms)", flood_rsts, params.flood, rw_rsts, RW_COUNT, RST_IDLE_MS))
		return false;
	for (unsigned k = 0; k < NCASES; k++)
		if (!report(!cases[k].rst || case_rsts[k], "no RST for case %u (%s)", k,
			    cases[k].what))
			return false;
	return true;
}

/* A transmit chain whose packet is at 1 TiB: its outcome, "used" or "reset" (the device is then
 * set up again), NULL (reported) otherwise. */
static const char *outside_ram(void)
{
	struct vbuf b = { OUTSIDE_RAM, VSOCK_HDR_LEN, false };
	const char *how;
	uint8_t status;

	if (!report(virtq_add(&vs.tx, &b, 1, far_hdr) >= 0, "no free transmit descriptor"))
		return NULL;
	virtq_kick(&vs.tx);
	how = virtq_await_outcome(&vs.tx, dev, OUTCOME_MS, &status);
	if (!report(how[0] != 'n', "a chain at 1 TiB: neither a used entry nor DEVICE_NEEDS_RESET "
		    "within %u ms (status 0x%02x)", OUTCOME_MS, status))
		return NULL;
	if (how[0] == 'r' &&
	    !report_after(vsock_open(&vs, dev, true), "set-up after the reset: %s", vs.error))
		return NULL;
	return how;
}

/* A live stream sent `op` (a second REQUEST, or an unknown operation) must be reset. */
static bool live_case(uint16_t op)
{
	struct vsock_stream *s = vsock_connect(&vs, params.host_port, CONNECT_TIMEOUT_MS);
	uint64_t deadline = deadline_ms(CLOSE_TIMEOUT_MS);

	if (!report(s, "connecting to host port %lu: %s", params.host_port, vs.error))
		return false;
	if (!report_after(vsock_send_ctl(&vs, s, op, 0), "%s", vs.error))
		return false;
	while (!s->reset) {
		if (!report_after(vsock_poll(&vs), "%s", vs.error))
			return false;
		if (!report(!expired(deadline), "op %u on a live stream: no RST within %u ms", op,
			    CLOSE_TIMEOUT_MS))
			return false;
		cpu_relax();
	}
	return report_after(vsock_close(&vs, s, CLOSE_TIMEOUT_MS), "%s", vs.error);
}

void test_vsock_hostile(void)
{
	struct transfer t = { .bytes = HOSTILE_BYTES };
	char outcome[160] = "";
	size_t used = 0;
	const char *far;

	memset(flood_rst, 0, sizeof(flood_rst));
	flood_rsts = rw_rsts = 0;
	memset(case_rsts, 0, sizeof(case_rsts));
	if (!start(false))
		goto out;
	vs.orphan = count_rst;
	if (!send_garbage() || !collect_rsts())
		goto out;
	for (unsigned k = 0; k < NCASES; k++)
		used += snprintf(outcome + used, sizeof(outcome) - used, " %u:%s", k,
				 case_rsts[k] ? "rst" : "none");
	far = outside_ram();
	if (!far || !live_case(OP_UNKNOWN) || !live_case(VSOCK_OP_REQUEST) || !transfer(&t))
		goto out;
	report_details("flood %u/%lu rst rw %u/%u rst cases%s 1TiB:%s op42:rst dup:rst then %lu "
		       "bytes", flood_rsts, params.flood, rw_rsts, RW_COUNT, outcome, far, t.bytes);
out:
	stop();
}
