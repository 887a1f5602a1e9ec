/* virtio-vsock on top of lib/virtio.h (virtio 1.2, 5.10): stream sockets between the guest
 * and the host (CID 2), polled like the other drivers.
 *
 * Queues: receive (0) holds VSOCK_RX_BUFS buffers of VSOCK_PKT_SIZE bytes, each taking one
 * packet (the 44-byte header and its payload); transmit (1) sends packets from VSOCK_TX_SLOTS
 * buffers of the same size, one descriptor each; event (2) holds a few 4-byte event buffers
 * (TRANSPORT_RESET drops every stream).
 *
 * Credit (5.10.6.3), both ways, in every header we send: buf_alloc is the stream's receive
 * buffer (VSOCK_BUF_ALLOC) and fwd_cnt the bytes its reader has taken out of it. We send at
 * most peer_buf_alloc - (tx_cnt - peer_fwd_cnt) bytes, waiting for the peer's CREDIT_UPDATE
 * (or any packet of the stream) when that is 0, and send a CREDIT_UPDATE ourselves once the
 * reader has taken VSOCK_CREDIT_THRESHOLD bytes since the peer last heard our fwd_cnt. A peer
 * that sends past the credit we gave is a protocol violation: the stream is reset and the
 * driver fails (vs->error).
 *
 * Every wait is bounded by a timeout in milliseconds. Functions that fail leave the reason in
 * vs->error; the first device misbehaviour is sticky (vs->failed). */
#ifndef PROBE_VIRTIO_VSOCK_H
#define PROBE_VIRTIO_VSOCK_H

#include "lib/util.h"
#include "lib/virtio.h"

#define VIRTIO_ID_VSOCK 19
#define VSOCK_RXQ 0
#define VSOCK_TXQ 1
#define VSOCK_EVQ 2
#define VSOCK_CFG_GUEST_CID 0		/* le64 */

#define VSOCK_HOST_CID 2
#define VSOCK_TYPE_STREAM 1
#define VSOCK_SHUTDOWN_RCV 1		/* the sender will receive no more */
#define VSOCK_SHUTDOWN_SEND 2		/* the sender will send no more */
#define VSOCK_SHUTDOWN_BOTH (VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND)
#define VSOCK_EVENT_TRANSPORT_RESET 0

enum vsock_op {
	VSOCK_OP_INVALID = 0,
	VSOCK_OP_REQUEST = 1,
	VSOCK_OP_RESPONSE = 2,
	VSOCK_OP_RST = 3,
	VSOCK_OP_SHUTDOWN = 4,
	VSOCK_OP_RW = 5,
	VSOCK_OP_CREDIT_UPDATE = 6,
	VSOCK_OP_CREDIT_REQUEST = 7,
};

/* In front of every packet, both ways (little-endian fields). */
struct virtio_vsock_hdr {
	uint64_t src_cid;
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;
	uint16_t type;
	uint16_t op;
	uint32_t flags;
	uint32_t buf_alloc;
	uint32_t fwd_cnt;
} __attribute__((packed));

#define VSOCK_HDR_LEN sizeof(struct virtio_vsock_hdr)	/* 44 */

#define VSOCK_PKT_SIZE 4096		/* each receive and transmit buffer */
#define VSOCK_PAYLOAD_MAX (VSOCK_PKT_SIZE - VSOCK_HDR_LEN)
#define VSOCK_RX_BUFS 128
#define VSOCK_TX_SLOTS 64
#define VSOCK_EVENT_BUFS 4
#define VSOCK_MAX_STREAMS 20
#define VSOCK_MAX_LISTEN 4
#define VSOCK_BUF_ALLOC (64 * 1024)	/* each stream's receive buffer: the credit we give */
#define VSOCK_CREDIT_THRESHOLD (VSOCK_BUF_ALLOC / 4)
#define VSOCK_TX_TIMEOUT_MS 1000	/* for a transmit buffer to come back */
#define VSOCK_FIRST_EPHEMERAL 49152	/* local ports of streams we connect */
#define VSOCK_TIMEOUT (-1)		/* vsock_recv: nothing in time */
#define VSOCK_ERROR (-2)		/* vsock_recv, vsock_send_some: the stream is broken */

enum vsock_state {
	VSOCK_FREE = 0,
	VSOCK_CONNECTING,		/* our REQUEST is out */
	VSOCK_ESTABLISHED,
	VSOCK_CLOSING,		/* we sent SHUTDOWN both ways: waiting for the peer's RST */
	VSOCK_CLOSED,		/* reset (RST, or TRANSPORT_RESET): what was received may be
				 * read, then vsock_close frees it */
};

struct vsock_stream {
	enum vsock_state state;
	uint32_t local_port, peer_port;
	bool incoming, accepted;	/* from a peer's REQUEST; handed out by vsock_accept */
	bool reset;			/* the peer reset it (RST) */
	uint8_t peer_shutdown;		/* VSOCK_SHUTDOWN_* the peer said */
	uint8_t shutdown;		/* VSOCK_SHUTDOWN_* we said */
	/* Receiving: buf holds bytes rx_cnt - fwd_cnt (counters mod 2^32, as on the wire). */
	uint32_t rx_cnt, fwd_cnt, fwd_cnt_told;
	/* Sending: what the peer last said of its receive buffer. */
	uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;
	bool stalled;			/* the last send found no credit */
	uint64_t credit_waits;		/* times a send had data and no credit */
	uint64_t credit_updates;	/* CREDIT_UPDATE packets received */
	uint8_t buf[VSOCK_BUF_ALLOC] __attribute__((aligned(4096)));
};

struct vsock;
/* Called for each packet (after its checks) that belongs to no stream, before the driver answers
 * it (hostile tests count the device's RSTs this way). */
typedef void (*vsock_orphan_fn)(struct vsock *vs, const struct virtio_vsock_hdr *hdr);

/* One open device: its queues, buffers and streams (a static in the test, in .bss). */
struct vsock {
	struct virtq_area rx_area, tx_area, ev_area;
	uint8_t rx_buf[VSOCK_RX_BUFS][VSOCK_PKT_SIZE] __attribute__((aligned(4096)));
	uint8_t tx_buf[VSOCK_TX_SLOTS][VSOCK_PKT_SIZE] __attribute__((aligned(4096)));
	uint32_t events[VSOCK_EVENT_BUFS];
	struct vsock_stream streams[VSOCK_MAX_STREAMS];
	struct virtio_dev *dev;
	struct virtq rx, tx, ev;
	uint64_t cid;			/* the guest's, from the configuration */
	uint32_t listening[VSOCK_MAX_LISTEN];	/* ports; 0: a free entry */
	uint16_t tx_free[VSOCK_TX_SLOTS];	/* free transmit slots, a stack */
	unsigned tx_nfree;
	unsigned rx_unkicked, tx_unkicked;	/* buffers made available since the last kick */
	uint32_t next_port;		/* for vsock_connect */
	vsock_orphan_fn orphan;
	const char *error;		/* why the last call failed */
	bool failed;			/* the device misbehaved (error says how) */
	uint64_t rx_packets, tx_packets, rx_bytes, tx_bytes;
	uint64_t rx_empty;		/* receive buffers that came back with used length 0 */
	uint64_t foreign_tx;		/* transmit chains a hostile test made */
	uint64_t orphan_rsts;		/* RSTs for no stream */
	uint64_t transport_resets;
};

/* The first virtio-vsock device, or NULL. */
struct virtio_dev *vsock_find(void);
/* Reset and set up the device: VERSION_1 (and EVENT_IDX if offered), the CID, the three queues
 * polled, event buffers, receive buffers unless !post_rx, DRIVER_OK. Forgets every stream and
 * listening port. false (vs->error) on failure. */
bool vsock_open(struct vsock *vs, struct virtio_dev *v, bool post_rx);
/* Post every receive buffer (after vsock_open(..., false)). */
void vsock_post_rx(struct vsock *vs);
/* Reset the device. */
void vsock_stop(struct vsock *vs);

/* Handle what the device returned: received packets (answering them), transmit buffers,
 * events. false once the device has misbehaved (vs->error). Never waits but for a transmit
 * buffer to answer with. */
bool vsock_poll(struct vsock *vs);

/* Accept streams to `port` (REQUESTs are answered at once; vsock_accept hands them out). */
bool vsock_listen(struct vsock *vs, uint32_t port);
/* The next accepted stream to `port`, waiting up to timeout_ms (0: only look); NULL if none. */
struct vsock_stream *vsock_accept(struct vsock *vs, uint32_t port, uint64_t timeout_ms);
/* Connect to the host's `port`; NULL (vs->error: refused or no answer) on failure. */
struct vsock_stream *vsock_connect(struct vsock *vs, uint32_t port, uint64_t timeout_ms);

/* Bytes the peer's credit allows now. */
uint32_t vsock_credit(const struct vsock_stream *s);
/* Send what credit and free transmit buffers allow now of data[0, len): the bytes taken (0
 * when there is no credit), VSOCK_ERROR if the stream can send no more. */
int64_t vsock_send_some(struct vsock *vs, struct vsock_stream *s, const void *data, size_t len);
/* Send all of data, waiting for credit; false (vs->error) on failure or if a wait for credit
 * passes timeout_ms. */
bool vsock_send_all(struct vsock *vs, struct vsock_stream *s, const void *data, size_t len,
		    uint64_t timeout_ms);
/* Receive up to len bytes, waiting up to timeout_ms (0: only look) for the first: how many,
 * 0 at the end of the stream (the peer shut down sending or reset it), VSOCK_TIMEOUT, or
 * VSOCK_ERROR (vs->error). */
int64_t vsock_recv(struct vsock *vs, struct vsock_stream *s, void *buf, size_t len,
		   uint64_t timeout_ms);
/* Tell the peer we will send (VSOCK_SHUTDOWN_SEND) or receive no more. */
bool vsock_shutdown(struct vsock *vs, struct vsock_stream *s, uint8_t flags);
/* Ask the peer for its credit (CREDIT_REQUEST) and wait for the CREDIT_UPDATE. */
bool vsock_credit_request(struct vsock *vs, struct vsock_stream *s, uint64_t timeout_ms);
/* Close: SHUTDOWN both ways and wait up to timeout_ms for the peer's RST (none: we send one and
 * return false, vs->error); the stream is freed either way. A reset stream is just freed. */
bool vsock_close(struct vsock *vs, struct vsock_stream *s, uint64_t timeout_ms);

/* A control packet (no payload) of a stream, its header filled as for any packet of it. */
bool vsock_send_ctl(struct vsock *vs, struct vsock_stream *s, uint16_t op, uint32_t flags);
/* Transmit exactly len bytes as one packet, whatever they say (hostile tests); false if they do
 * not fit a transmit buffer or none came back in time. */
bool vsock_send_raw(struct vsock *vs, const void *bytes, uint32_t len);
/* Wait until every transmit buffer is back; false (vs->error) if not within timeout_ms. */
bool vsock_tx_drain(struct vsock *vs, uint64_t timeout_ms);

/* A header from us (our CID, to the host) with the given fields and no credit information. */
struct virtio_vsock_hdr vsock_hdr(const struct vsock *vs, uint32_t src_port, uint32_t dst_port,
				  uint16_t op, uint32_t len);

/* ---- The probe.vsock.* parameters and data the vsock tests share ---- */

#define VSOCK_DEFAULT_PORT 1234		/* the guest listens here (vsock-echo, vsock-many) */
#define VSOCK_DEFAULT_HOST_PORT 5678	/* the host listens at <uds>_<port> */
#define VSOCK_DEFAULT_BYTES (1 * MiB)	/* vsock-connect, vsock-slow-reader */
#define VSOCK_MAX_BYTES (64 * MiB)
#define VSOCK_DEFAULT_STREAMS 16	/* vsock-many */
#define VSOCK_DEFAULT_FLOOD 1000	/* vsock-hostile's REQUESTs */
#define VSOCK_MAX_FLOOD 8192
#define VSOCK_MAX_PORT 0xfffffffeu

struct vsock_params {
	uint64_t port, host_port, bytes, streams, flood;
};

/* probe.vsock.port, .host_port, .bytes, .streams, .flood (or their defaults) into p: NULL, or
 * why not (one is malformed). */
const char *vsock_read_params(struct vsock_params *p);

/* The PRNG byte stream the tests and the host agree on: little-endian 64-bit words of
 * splitmix64, the k-th (from 1) being mix(seed + k * 0x9e3779b97f4a7c15). */
#define VSOCK_SEED_GUEST 0x70726f6265207673ULL	/* what the guest sends */
#define VSOCK_SEED_HOST 0x686f737420726570ULL	/* what the host answers */

struct prng_stream {
	uint64_t seed, k;
	uint8_t word[8];
	unsigned used;			/* bytes of word already given out */
};

void prng_start(struct prng_stream *p, uint64_t seed);
/* The next len bytes of the stream. */
void prng_fill(struct prng_stream *p, uint8_t *out, size_t len);
/* Whether the next len bytes of the stream are `data` (advances it either way). */
bool prng_check(struct prng_stream *p, const uint8_t *data, size_t len);

#endif
