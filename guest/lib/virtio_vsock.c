/* virtio-vsock driver (see lib/virtio_vsock.h). */
#include "lib/virtio_vsock.h"
#include "lib/boot.h"
#include "lib/clock.h"
#include "lib/io.h"

#define GOLDEN_GAMMA 0x9e3779b97f4a7c15ULL
#define EVENT_SIZE sizeof(uint32_t)	/* struct virtio_vsock_event: le32 id */
#define NO_VECTOR VIRTIO_MSI_NO_VECTOR	/* the queues are polled */

static char why[200];

static void set_error(struct vsock *vs, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static bool fail(struct vsock *vs, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A call failed (a refused connect, a timeout): the reason, unless the device failed before. */
static void set_error(struct vsock *vs, const char *fmt, ...)
{
	va_list ap;

	if (vs->failed)
		return;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	vs->error = why;
}

/* The device misbehaved: the first reason sticks. Returns false. */
static bool fail(struct vsock *vs, const char *fmt, ...)
{
	va_list ap;

	if (vs->failed)
		return false;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	vs->error = why;
	vs->failed = true;
	return false;
}

static uint32_t min32(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

struct virtio_dev *vsock_find(void)
{
	return virtio_find(VIRTIO_ID_VSOCK, 0);
}

struct virtio_vsock_hdr vsock_hdr(const struct vsock *vs, uint32_t src_port, uint32_t dst_port,
				  uint16_t op, uint32_t len)
{
	return (struct virtio_vsock_hdr){
		.src_cid = vs->cid,
		.dst_cid = VSOCK_HOST_CID,
		.src_port = src_port,
		.dst_port = dst_port,
		.len = len,
		.type = VSOCK_TYPE_STREAM,
		.op = op,
	};
}

/* ---- Buffers ---- */

static void post_rx(struct vsock *vs, uint8_t *buf)
{
	struct vbuf b = { (uint64_t)buf, VSOCK_PKT_SIZE, true };

	virtq_add(&vs->rx, &b, 1, buf);
	vs->rx_unkicked++;
}

void vsock_post_rx(struct vsock *vs)
{
	for (unsigned i = 0; i < VSOCK_RX_BUFS && vs->rx.num_free; i++)
		post_rx(vs, vs->rx_buf[i]);
	virtq_kick(&vs->rx);
	vs->rx_unkicked = 0;
}

static void post_event(struct vsock *vs, uint32_t *event)
{
	struct vbuf b = { (uint64_t)event, EVENT_SIZE, true };

	virtq_add(&vs->ev, &b, 1, event);
}

static void tx_flush(struct vsock *vs)
{
	if (vs->tx_unkicked)
		virtq_kick(&vs->tx);
	vs->tx_unkicked = 0;
}

/* Take back the transmit buffers the device is done with. */
static bool tx_reclaim(struct vsock *vs)
{
	void *token;

	while (virtq_poll(&vs->tx, &token, NULL)) {
		uint8_t *buf = token;

		if (buf >= vs->tx_buf[0] && buf < vs->tx_buf[VSOCK_TX_SLOTS])
			vs->tx_free[vs->tx_nfree++] = (buf - vs->tx_buf[0]) / VSOCK_PKT_SIZE;
		else
			vs->foreign_tx++;
	}
	if (vs->tx.bad_used)
		return fail(vs, "the device returned a transmit chain that was not outstanding");
	return true;
}

/* A free transmit buffer, waiting (bounded) for one to come back; NULL (failed) if none. */
static uint8_t *tx_slot(struct vsock *vs)
{
	uint64_t deadline = deadline_ms(VSOCK_TX_TIMEOUT_MS);

	for (;;) {
		if (!tx_reclaim(vs))
			return NULL;
		if (vs->tx_nfree)
			return vs->tx_buf[vs->tx_free[--vs->tx_nfree]];
		tx_flush(vs);
		if (expired(deadline)) {
			fail(vs, "no transmit buffer came back within %u ms %s",
			     VSOCK_TX_TIMEOUT_MS, virtq_state(&vs->tx));
			return NULL;
		}
		cpu_relax();
	}
}

/* Queue one packet (kicked by tx_flush): a header and len bytes of payload. */
static bool xmit(struct vsock *vs, const struct virtio_vsock_hdr *h, const void *payload,
		 uint32_t len)
{
	uint8_t *buf = tx_slot(vs);
	struct vbuf b;

	if (!buf)
		return false;
	memcpy(buf, h, VSOCK_HDR_LEN);
	if (len)
		memcpy(buf + VSOCK_HDR_LEN, payload, len);
	b = (struct vbuf){ (uint64_t)buf, VSOCK_HDR_LEN + len, false };
	virtq_add(&vs->tx, &b, 1, buf);
	vs->tx_unkicked++;
	vs->tx_packets++;
	vs->tx_bytes += len;
	return true;
}

bool vsock_send_raw(struct vsock *vs, const void *bytes, uint32_t len)
{
	uint8_t *buf;
	struct vbuf b;

	if (len > VSOCK_PKT_SIZE) {
		set_error(vs, "a %u-byte packet is over the %u-byte transmit buffer", len,
			  VSOCK_PKT_SIZE);
		return false;
	}
	buf = tx_slot(vs);
	if (!buf)
		return false;
	memcpy(buf, bytes, len);
	b = (struct vbuf){ (uint64_t)buf, len, false };
	virtq_add(&vs->tx, &b, 1, buf);
	vs->tx_unkicked++;
	tx_flush(vs);
	return true;
}

bool vsock_tx_drain(struct vsock *vs, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);

	tx_flush(vs);
	while (vs->tx.num_free < vs->tx.size) {
		if (!tx_reclaim(vs))
			return false;
		if (expired(deadline))
			return fail(vs, "transmit chains not back within %lu ms %s", timeout_ms,
				    virtq_state(&vs->tx));
		cpu_relax();
	}
	return tx_reclaim(vs);
}

/* ---- Streams ---- */

static struct vsock_stream *stream_find(struct vsock *vs, uint32_t local, uint32_t peer)
{
	for (unsigned i = 0; i < VSOCK_MAX_STREAMS; i++) {
		struct vsock_stream *s = &vs->streams[i];

		if (s->state != VSOCK_FREE && s->state != VSOCK_CLOSED && s->local_port == local &&
		    s->peer_port == peer)
			return s;
	}
	return NULL;
}

static struct vsock_stream *stream_new(struct vsock *vs, uint32_t local, uint32_t peer,
				       enum vsock_state state)
{
	for (unsigned i = 0; i < VSOCK_MAX_STREAMS; i++) {
		struct vsock_stream *s = &vs->streams[i];

		if (s->state != VSOCK_FREE)
			continue;
		memset(s, 0, offsetof(struct vsock_stream, buf));
		s->state = state;
		s->local_port = local;
		s->peer_port = peer;
		return s;
	}
	return NULL;
}

static bool local_port_used(struct vsock *vs, uint32_t port)
{
	for (unsigned i = 0; i < VSOCK_MAX_STREAMS; i++)
		if (vs->streams[i].state != VSOCK_FREE && vs->streams[i].local_port == port)
			return true;
	return false;
}

uint32_t vsock_credit(const struct vsock_stream *s)
{
	uint32_t in_flight = s->tx_cnt - s->peer_fwd_cnt;

	return in_flight < s->peer_buf_alloc ? s->peer_buf_alloc - in_flight : 0;
}

/* A packet of stream s: its ports, and our credit information (which the peer now knows). */
static struct virtio_vsock_hdr stream_hdr(struct vsock *vs, struct vsock_stream *s, uint16_t op,
					  uint32_t flags, uint32_t len)
{
	struct virtio_vsock_hdr h = vsock_hdr(vs, s->local_port, s->peer_port, op, len);

	h.flags = flags;
	h.buf_alloc = VSOCK_BUF_ALLOC;
	h.fwd_cnt = s->fwd_cnt;
	s->fwd_cnt_told = s->fwd_cnt;
	return h;
}

bool vsock_send_ctl(struct vsock *vs, struct vsock_stream *s, uint16_t op, uint32_t flags)
{
	struct virtio_vsock_hdr h = stream_hdr(vs, s, op, flags, 0);

	return xmit(vs, &h, NULL, 0);
}

/* An RST for a packet that has no stream (ports swapped). */
static void send_rst_for(struct vsock *vs, const struct virtio_vsock_hdr *in)
{
	struct virtio_vsock_hdr h = vsock_hdr(vs, in->dst_port, in->src_port, VSOCK_OP_RST, 0);

	xmit(vs, &h, NULL, 0);
}

/* Reset s ourselves (a protocol violation by the peer, or no answer): RST, and it is closed. */
static void stream_reset(struct vsock *vs, struct vsock_stream *s)
{
	vsock_send_ctl(vs, s, VSOCK_OP_RST, 0);
	s->state = VSOCK_CLOSED;
}

static bool is_listening(struct vsock *vs, uint32_t port)
{
	for (unsigned i = 0; i < VSOCK_MAX_LISTEN; i++)
		if (vs->listening[i] == port && port)
			return true;
	return false;
}

/* A packet for no stream: a REQUEST to a listening port is accepted, RSTs are counted,
 * anything else is answered with RST. */
static void rx_orphan(struct vsock *vs, const struct virtio_vsock_hdr *h)
{
	struct vsock_stream *s;

	if (vs->orphan)
		vs->orphan(vs, h);
	if (h->op == VSOCK_OP_RST) {
		vs->orphan_rsts++;
		return;
	}
	if (h->op == VSOCK_OP_REQUEST && is_listening(vs, h->dst_port) &&
	    (s = stream_new(vs, h->dst_port, h->src_port, VSOCK_ESTABLISHED))) {
		s->incoming = true;
		s->peer_buf_alloc = h->buf_alloc;
		s->peer_fwd_cnt = h->fwd_cnt;
		vsock_send_ctl(vs, s, VSOCK_OP_RESPONSE, 0);
		return;
	}
	send_rst_for(vs, h);
}

/* Payload for s: into its receive buffer, within the credit we gave. */
static void rx_data(struct vsock *vs, struct vsock_stream *s, const uint8_t *data, uint32_t len)
{
	uint32_t held = s->rx_cnt - s->fwd_cnt, at, first;

	if (s->state == VSOCK_CLOSING) {	/* we shut down receiving: dropped */
		s->rx_cnt += len;
		s->fwd_cnt += len;
		return;
	}
	if (s->state != VSOCK_ESTABLISHED || s->peer_shutdown & VSOCK_SHUTDOWN_SEND) {
		fail(vs, "%u bytes on stream %u:%u after %s", len, s->local_port, s->peer_port,
		     s->state == VSOCK_CONNECTING ? "our REQUEST (no RESPONSE)" : "its SHUTDOWN");
		stream_reset(vs, s);
		return;
	}
	if (len > VSOCK_BUF_ALLOC - held) {
		fail(vs, "stream %u:%u: a %u-byte RW with %u bytes of credit (buf_alloc %u, "
		     "fwd_cnt %u, received %u)", s->local_port, s->peer_port, len,
		     VSOCK_BUF_ALLOC - held, VSOCK_BUF_ALLOC, s->fwd_cnt, s->rx_cnt);
		stream_reset(vs, s);
		return;
	}
	at = s->rx_cnt % VSOCK_BUF_ALLOC;
	first = min32(len, VSOCK_BUF_ALLOC - at);
	memcpy(s->buf + at, data, first);
	memcpy(s->buf, data + first, len - first);
	s->rx_cnt += len;
}

/* One received packet (the device wrote `used` bytes of buf). */
static void rx_packet(struct vsock *vs, const uint8_t *buf, uint32_t used)
{
	struct virtio_vsock_hdr h;
	struct vsock_stream *s;

	if (used < VSOCK_HDR_LEN || used > VSOCK_PKT_SIZE) {
		fail(vs, "a receive buffer came back with %u bytes (header %lu, buffer %u)", used,
		     VSOCK_HDR_LEN, VSOCK_PKT_SIZE);
		return;
	}
	memcpy(&h, buf, VSOCK_HDR_LEN);
	if (h.len != used - VSOCK_HDR_LEN || h.src_cid != VSOCK_HOST_CID ||
	    h.dst_cid != vs->cid || h.type != VSOCK_TYPE_STREAM) {
		fail(vs, "bad packet: op %u len %u in %u bytes, from %lu:%u to %lu:%u type %u "
		     "(expected from CID %u to CID %lu, stream)", h.op, h.len, used, h.src_cid,
		     h.src_port, h.dst_cid, h.dst_port, h.type, VSOCK_HOST_CID, vs->cid);
		return;
	}
	vs->rx_packets++;
	vs->rx_bytes += h.len;
	s = stream_find(vs, h.dst_port, h.src_port);
	if (!s) {
		rx_orphan(vs, &h);
		return;
	}
	s->peer_buf_alloc = h.buf_alloc;	/* every packet carries the peer's credit */
	s->peer_fwd_cnt = h.fwd_cnt;
	switch (h.op) {
	case VSOCK_OP_RESPONSE:
		if (s->state == VSOCK_CONNECTING)
			s->state = VSOCK_ESTABLISHED;
		else
			stream_reset(vs, s);
		break;
	case VSOCK_OP_RW:
		rx_data(vs, s, buf + VSOCK_HDR_LEN, h.len);
		break;
	case VSOCK_OP_CREDIT_UPDATE:
		s->credit_updates++;
		break;
	case VSOCK_OP_CREDIT_REQUEST:
		vsock_send_ctl(vs, s, VSOCK_OP_CREDIT_UPDATE, 0);
		break;
	case VSOCK_OP_SHUTDOWN:
		s->peer_shutdown |= h.flags & VSOCK_SHUTDOWN_BOTH;
		if (s->peer_shutdown == VSOCK_SHUTDOWN_BOTH)
			stream_reset(vs, s);	/* both ways: the RST that ends it is ours */
		break;
	case VSOCK_OP_RST:
		s->reset = true;
		s->state = VSOCK_CLOSED;
		break;
	default:	/* a REQUEST on a live stream, or no operation at all */
		stream_reset(vs, s);
		break;
	}
}

static void transport_reset(struct vsock *vs)
{
	vs->transport_resets++;
	for (unsigned i = 0; i < VSOCK_MAX_STREAMS; i++) {
		struct vsock_stream *s = &vs->streams[i];

		if (s->state != VSOCK_FREE) {
			s->state = VSOCK_CLOSED;
			s->reset = true;
		}
	}
	vs->cid = virtio_config_read64(vs->dev, VSOCK_CFG_GUEST_CID);
}

bool vsock_poll(struct vsock *vs)
{
	void *token;
	uint32_t len;

	while (!vs->failed && virtq_poll(&vs->rx, &token, &len)) {
		uint8_t *buf = token;

		if (buf < vs->rx_buf[0] || buf >= vs->rx_buf[VSOCK_RX_BUFS]) {
			/* A buffer a hostile test made: it must come back empty. */
			if (len)
				fail(vs, "the device wrote %u bytes into an unfit receive buffer",
				     len);
			vs->rx_empty++;
			continue;
		}
		if (len)
			rx_packet(vs, buf, len);
		else
			vs->rx_empty++;
		post_rx(vs, buf);
	}
	if (vs->rx.bad_used)
		fail(vs, "the device returned a receive buffer that was not outstanding");
	if (vs->rx_unkicked) {
		virtq_kick(&vs->rx);
		vs->rx_unkicked = 0;
	}
	while (virtq_poll(&vs->ev, &token, &len)) {
		uint32_t *event = token;

		if (len >= EVENT_SIZE && *event == VSOCK_EVENT_TRANSPORT_RESET)
			transport_reset(vs);
		post_event(vs, event);
		virtq_kick(&vs->ev);
	}
	tx_reclaim(vs);
	tx_flush(vs);
	return !vs->failed;
}

/* ---- Set-up ---- */

bool vsock_open(struct vsock *vs, struct virtio_dev *v, bool post_rx)
{
	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_F_EVENT_IDX);

	for (unsigned i = 0; i < VSOCK_MAX_STREAMS; i++)
		vs->streams[i].state = VSOCK_FREE;
	memset(vs->listening, 0, sizeof(vs->listening));
	vs->dev = v;
	vs->error = NULL;
	vs->failed = false;
	vs->orphan = NULL;
	vs->rx_unkicked = vs->tx_unkicked = 0;
	vs->next_port = VSOCK_FIRST_EPHEMERAL;
	vs->rx_packets = vs->tx_packets = vs->rx_bytes = vs->tx_bytes = 0;
	vs->rx_empty = vs->foreign_tx = vs->orphan_rsts = vs->transport_resets = 0;
	if (!virtio_begin(v) || !virtio_negotiate(v, wanted)) {
		set_error(vs, "%s", v->error);
		return false;
	}
	if (!v->device || v->device_len < sizeof(uint64_t)) {
		set_error(vs, "no device configuration (guest_cid)");
		return false;
	}
	vs->cid = virtio_config_read64(v, VSOCK_CFG_GUEST_CID);
	if (!virtq_setup(&vs->rx, v, VSOCK_RXQ, &vs->rx_area, VIRTQ_MAX_SIZE, NO_VECTOR) ||
	    !virtq_setup(&vs->tx, v, VSOCK_TXQ, &vs->tx_area, VIRTQ_MAX_SIZE, NO_VECTOR) ||
	    !virtq_setup(&vs->ev, v, VSOCK_EVQ, &vs->ev_area, VIRTQ_MAX_SIZE, NO_VECTOR)) {
		set_error(vs, "%s", v->error);
		return false;
	}
	for (vs->tx_nfree = 0; vs->tx_nfree < VSOCK_TX_SLOTS; vs->tx_nfree++)
		vs->tx_free[vs->tx_nfree] = VSOCK_TX_SLOTS - 1 - vs->tx_nfree;
	virtio_driver_ok(v);
	for (unsigned i = 0; i < VSOCK_EVENT_BUFS; i++)
		post_event(vs, &vs->events[i]);
	virtq_kick(&vs->ev);
	if (post_rx)
		vsock_post_rx(vs);
	return true;
}

void vsock_stop(struct vsock *vs)
{
	if (vs->dev)
		virtio_reset(vs->dev);
}

/* ---- Sockets ---- */

bool vsock_listen(struct vsock *vs, uint32_t port)
{
	for (unsigned i = 0; i < VSOCK_MAX_LISTEN; i++) {
		if (!vs->listening[i]) {
			vs->listening[i] = port;
			return true;
		}
	}
	set_error(vs, "no room to listen on port %u", port);
	return false;
}

struct vsock_stream *vsock_accept(struct vsock *vs, uint32_t port, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);

	for (;;) {
		if (!vsock_poll(vs))
			return NULL;
		for (unsigned i = 0; i < VSOCK_MAX_STREAMS; i++) {
			struct vsock_stream *s = &vs->streams[i];

			if (s->state != VSOCK_FREE && s->incoming && !s->accepted &&
			    s->local_port == port) {
				s->accepted = true;
				return s;
			}
		}
		if (expired(deadline)) {
			if (timeout_ms)
				set_error(vs, "no connection to port %u within %lu ms", port,
					  timeout_ms);
			return NULL;
		}
		cpu_relax();
	}
}

struct vsock_stream *vsock_connect(struct vsock *vs, uint32_t port, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);
	struct vsock_stream *s;
	uint32_t local;

	do
		local = vs->next_port++;
	while (local_port_used(vs, local));
	s = stream_new(vs, local, port, VSOCK_CONNECTING);
	if (!s) {
		set_error(vs, "no free stream (%u in use)", VSOCK_MAX_STREAMS);
		return NULL;
	}
	if (!vsock_send_ctl(vs, s, VSOCK_OP_REQUEST, 0))
		goto out;
	tx_flush(vs);
	for (;;) {
		if (!vsock_poll(vs))
			goto out;
		if (s->state == VSOCK_ESTABLISHED)
			return s;
		if (s->state == VSOCK_CLOSED) {
			set_error(vs, "host port %u refused (RST)", port);
			goto out;
		}
		if (expired(deadline)) {
			set_error(vs, "no answer from host port %u within %lu ms", port,
				  timeout_ms);
			vsock_send_ctl(vs, s, VSOCK_OP_RST, 0);
			tx_flush(vs);
			goto out;
		}
		cpu_relax();
	}
out:
	s->state = VSOCK_FREE;
	return NULL;
}

/* Whether s may send: false (vs->error) if not. */
static bool can_send(struct vsock *vs, struct vsock_stream *s)
{
	if (s->state == VSOCK_ESTABLISHED && !(s->peer_shutdown & VSOCK_SHUTDOWN_RCV) &&
	    !(s->shutdown & VSOCK_SHUTDOWN_SEND))
		return true;
	set_error(vs, "stream %u:%u cannot send (state %u, peer shutdown %u, reset %u)",
		  s->local_port, s->peer_port, s->state, s->peer_shutdown, s->reset);
	return false;
}

int64_t vsock_send_some(struct vsock *vs, struct vsock_stream *s, const void *data, size_t len)
{
	const uint8_t *p = data;
	size_t sent = 0;

	if (!vsock_poll(vs) || !can_send(vs, s))
		return VSOCK_ERROR;
	while (sent < len) {
		uint32_t chunk = min32(min32(len - sent, vsock_credit(s)), VSOCK_PAYLOAD_MAX);
		struct virtio_vsock_hdr h;

		if (!chunk || !tx_reclaim(vs) || !vs->tx_nfree)
			break;
		h = stream_hdr(vs, s, VSOCK_OP_RW, 0, chunk);
		if (!xmit(vs, &h, p + sent, chunk))
			break;
		s->tx_cnt += chunk;
		sent += chunk;
	}
	tx_flush(vs);
	if (vs->failed)
		return VSOCK_ERROR;
	/* One wait counted per time the credit ran out with data left to send. */
	if (sent < len && !vsock_credit(s)) {
		if (!s->stalled)
			s->credit_waits++;
		s->stalled = true;
	} else {
		s->stalled = false;
	}
	return sent;
}

bool vsock_send_all(struct vsock *vs, struct vsock_stream *s, const void *data, size_t len,
		    uint64_t timeout_ms)
{
	const uint8_t *p = data;
	uint64_t deadline = deadline_ms(timeout_ms);
	size_t sent = 0;

	while (sent < len) {
		int64_t n = vsock_send_some(vs, s, p + sent, len - sent);

		if (n < 0)
			return false;
		if (n > 0) {
			sent += n;
			deadline = deadline_ms(timeout_ms);
			continue;
		}
		if (expired(deadline)) {
			set_error(vs, "stream %u:%u: no credit for %lu ms after %lu of %lu bytes "
				  "(peer buf_alloc %u fwd_cnt %u, sent %u)", s->local_port,
				  s->peer_port, timeout_ms, sent, len, s->peer_buf_alloc,
				  s->peer_fwd_cnt, s->tx_cnt);
			return false;
		}
		cpu_relax();
	}
	return true;
}

int64_t vsock_recv(struct vsock *vs, struct vsock_stream *s, void *buf, size_t len,
		   uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);

	for (;;) {
		uint32_t held, n, at, first;

		if (!vsock_poll(vs))
			return VSOCK_ERROR;
		held = s->rx_cnt - s->fwd_cnt;
		if (held) {
			n = min32(held, len);
			at = s->fwd_cnt % VSOCK_BUF_ALLOC;
			first = min32(n, VSOCK_BUF_ALLOC - at);
			memcpy(buf, s->buf + at, first);
			memcpy((uint8_t *)buf + first, s->buf, n - first);
			s->fwd_cnt += n;
			/* Room made: tell the peer once it is a good part of the buffer. */
			if (s->state == VSOCK_ESTABLISHED &&
			    !(s->peer_shutdown & VSOCK_SHUTDOWN_SEND) &&
			    s->fwd_cnt - s->fwd_cnt_told >= VSOCK_CREDIT_THRESHOLD) {
				vsock_send_ctl(vs, s, VSOCK_OP_CREDIT_UPDATE, 0);
				tx_flush(vs);
			}
			return n;
		}
		if (s->state == VSOCK_CLOSED || s->peer_shutdown & VSOCK_SHUTDOWN_SEND)
			return 0;
		if (s->state != VSOCK_ESTABLISHED) {
			set_error(vs, "stream %u:%u cannot receive (state %u)", s->local_port,
				  s->peer_port, s->state);
			return VSOCK_ERROR;
		}
		if (expired(deadline)) {
			if (timeout_ms)
				set_error(vs, "stream %u:%u: nothing within %lu ms", s->local_port,
					  s->peer_port, timeout_ms);
			return VSOCK_TIMEOUT;
		}
		cpu_relax();
	}
}

bool vsock_shutdown(struct vsock *vs, struct vsock_stream *s, uint8_t flags)
{
	s->shutdown |= flags;
	if (!vsock_send_ctl(vs, s, VSOCK_OP_SHUTDOWN, flags))
		return false;
	tx_flush(vs);
	return true;
}

bool vsock_credit_request(struct vsock *vs, struct vsock_stream *s, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms), before = s->credit_updates;

	if (!vsock_send_ctl(vs, s, VSOCK_OP_CREDIT_REQUEST, 0))
		return false;
	tx_flush(vs);
	while (s->credit_updates == before) {
		if (!vsock_poll(vs))
			return false;
		if (expired(deadline) || s->state != VSOCK_ESTABLISHED) {
			set_error(vs, "no CREDIT_UPDATE for our CREDIT_REQUEST within %lu ms "
				  "(state %u)", timeout_ms, s->state);
			return false;
		}
		cpu_relax();
	}
	return true;
}

bool vsock_close(struct vsock *vs, struct vsock_stream *s, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);
	bool ok = true;

	if (s->state == VSOCK_CONNECTING) {
		vsock_send_ctl(vs, s, VSOCK_OP_RST, 0);
	} else if (s->state == VSOCK_ESTABLISHED) {
		s->state = VSOCK_CLOSING;
		s->shutdown = VSOCK_SHUTDOWN_BOTH;
		if (!vsock_send_ctl(vs, s, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH))
			ok = false;
		tx_flush(vs);
		while (ok && s->state == VSOCK_CLOSING) {
			if (!vsock_poll(vs)) {
				ok = false;
			} else if (expired(deadline)) {
				set_error(vs, "stream %u:%u: no RST for our SHUTDOWN within %lu ms",
					  s->local_port, s->peer_port, timeout_ms);
				vsock_send_ctl(vs, s, VSOCK_OP_RST, 0);
				ok = false;
			}
			cpu_relax();
		}
	}
	tx_flush(vs);
	s->state = VSOCK_FREE;
	return ok;
}

/* ---- Parameters and the PRNG stream ---- */

const char *vsock_read_params(struct vsock_params *p)
{
	static const struct {
		const char *key;
		uint64_t lo, hi;
	} keys[] = {
		{ "probe.vsock.port", 1, VSOCK_MAX_PORT },
		{ "probe.vsock.host_port", 1, VSOCK_MAX_PORT },
		{ "probe.vsock.bytes", 1, VSOCK_MAX_BYTES },
		{ "probe.vsock.streams", 1, VSOCK_MAX_STREAMS },
		{ "probe.vsock.flood", 1, VSOCK_MAX_FLOOD },
	};
	uint64_t *values[] = { &p->port, &p->host_port, &p->bytes, &p->streams, &p->flood };
	static char text[120];

	*p = (struct vsock_params){ VSOCK_DEFAULT_PORT, VSOCK_DEFAULT_HOST_PORT,
				    VSOCK_DEFAULT_BYTES, VSOCK_DEFAULT_STREAMS,
				    VSOCK_DEFAULT_FLOOD };
	for (unsigned i = 0; i < ARRAY_SIZE(keys); i++) {
		const char *value;
		size_t len;

		if (cmdline_find(keys[i].key, &value, &len) &&
		    !(parse_u64(value, len, values[i]) && *values[i] >= keys[i].lo &&
		      *values[i] <= keys[i].hi)) {
			snprintf(text, sizeof(text), "%s is not a number from %lu to %lu",
				 keys[i].key, keys[i].lo, keys[i].hi);
			return text;
		}
	}
	return NULL;
}

static uint64_t splitmix64_mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

void prng_start(struct prng_stream *p, uint64_t seed)
{
	p->seed = seed;
	p->k = 0;
	p->used = sizeof(p->word);
}

static uint8_t prng_byte(struct prng_stream *p)
{
	if (p->used == sizeof(p->word)) {
		uint64_t w = splitmix64_mix(p->seed + ++p->k * GOLDEN_GAMMA);

		memcpy(p->word, &w, sizeof(w));	/* x86: little-endian */
		p->used = 0;
	}
	return p->word[p->used++];
}

void prng_fill(struct prng_stream *p, uint8_t *out, size_t len)
{
	for (size_t i = 0; i < len; i++)
		out[i] = prng_byte(p);
}

bool prng_check(struct prng_stream *p, const uint8_t *data, size_t len)
{
	bool same = true;

	for (size_t i = 0; i < len; i++)
		same &= data[i] == prng_byte(p);
	return same;
}
