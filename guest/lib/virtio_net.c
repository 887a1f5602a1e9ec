/* virtio-net driver and frame helpers (see lib/virtio_net.h). */
#include "lib/virtio_net.h"
#include "lib/boot.h"
#include "lib/clock.h"
#include "lib/io.h"
#include "lib/util.h"

#define ARP_RETRY_MS 1000
#define ARP_POLL_MS 50
#define TEXT_COPIES 2
#define MAC_TEXT_LEN 18			/* "xx:xx:xx:xx:xx:xx" and the NUL */
#define IPV4_TEXT_LEN 16		/* "ddd.ddd.ddd.ddd" and the NUL */
#define IPV4_PARTS 4
#define IPV4_PART_MAX 255
#define IPV4_IHL_MASK 0x0f
#define IPV4_WORD 4			/* IHL counts 32-bit words */
#define PSEUDO_HDR_LEN 12		/* src, dst, zero, protocol, length */
#define CSUM_NONE 0
#define CSUM_ZERO 0xffff		/* a computed UDP checksum of 0, as sent */

/* Used when the device offers no VIRTIO_NET_F_MAC: a locally administered address. */
static const uint8_t local_mac[ETH_ALEN] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };
static const uint8_t broadcast_mac[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static char why[160];
static uint16_t next_ip_id;

struct virtio_dev *vnet_find(void)
{
	return virtio_find(VIRTIO_ID_NET, 0);
}

static void post_rx(struct vnet *n, uint8_t *buf)
{
	struct vbuf b = { (uint64_t)buf, n->rx_buf_size, true };

	virtq_add(&n->rx, &b, 1, buf);
	n->rx_unkicked++;
}

/* Tell the device about the receive buffers posted since the last time (if it asks). */
static void rx_kick(struct vnet *n)
{
	if (n->rx_unkicked)
		virtq_kick(&n->rx);
	n->rx_unkicked = 0;
}

static bool open_common(struct vnet *n, struct virtio_dev *v, uint32_t ip, bool mrg, bool post)
{
	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_NET_F_MAC) |
			  VIRTIO_BIT(VIRTIO_NET_F_STATUS);

	n->dev = v;
	n->ip = ip;
	n->rx_unkicked = 0;
	n->rx_frames = n->tx_frames = n->rx_merged = n->rx_truncated = n->arp_answered = 0;
	if (mrg)
		wanted |= VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
	if (!virtio_begin(v) || !virtio_negotiate(v, wanted))
		return false;
	n->mrg = v->driver_features & VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
	n->link_status = v->driver_features & VIRTIO_BIT(VIRTIO_NET_F_STATUS);
	n->rx_buf_size = n->mrg ? VNET_MRG_BUF_SIZE : VNET_RX_BUF_SIZE;
	memcpy(n->mac, local_mac, ETH_ALEN);
	if (v->driver_features & (VIRTIO_BIT(VIRTIO_NET_F_MAC) | VIRTIO_BIT(VIRTIO_NET_F_STATUS)) &&
	    (!v->device || v->device_len < VIRTIO_NET_CFG_STATUS + sizeof(uint16_t))) {
		v->error = "no device configuration (mac, status)";
		return false;
	}
	if (v->driver_features & VIRTIO_BIT(VIRTIO_NET_F_MAC))
		for (unsigned i = 0; i < ETH_ALEN; i++)
			n->mac[i] = virtio_config_read8(v, VIRTIO_NET_CFG_MAC + i);
	if (n->link_status &&
	    !(virtio_config_read8(v, VIRTIO_NET_CFG_STATUS) & VIRTIO_NET_S_LINK_UP)) {
		v->error = "the link is down (config status)";
		return false;
	}
	if (!virtq_setup(&n->rx, v, VNET_RXQ, &n->rx_area, VIRTQ_MAX_SIZE, VIRTIO_MSI_NO_VECTOR) ||
	    !virtq_setup(&n->tx, v, VNET_TXQ, &n->tx_area, VIRTQ_MAX_SIZE, VIRTIO_MSI_NO_VECTOR))
		return false;
	for (n->tx_nfree = 0; n->tx_nfree < VNET_TX_SLOTS; n->tx_nfree++)
		n->tx_free[n->tx_nfree] = VNET_TX_SLOTS - 1 - n->tx_nfree;
	virtio_driver_ok(v);
	if (post) {
		for (unsigned i = 0; i < VNET_RX_BUFS && i < n->rx.size; i++)
			post_rx(n, n->rx_buf[i]);
		rx_kick(n);
	}
	return true;
}

bool vnet_open(struct vnet *n, struct virtio_dev *v, uint32_t ip, bool mrg)
{
	return open_common(n, v, ip, mrg, true);
}

bool vnet_open_empty(struct vnet *n, struct virtio_dev *v, uint32_t ip, bool mrg)
{
	return open_common(n, v, ip, mrg, false);
}

/* Take back the transmit slots of every frame the device is done with. */
static bool tx_reclaim(struct vnet *n)
{
	void *token;

	while (virtq_poll(&n->tx, &token, NULL))
		n->tx_free[n->tx_nfree++] = ((uint8_t *)token - n->tx_buf[0]) / VNET_TX_BUF_SIZE;
	if (n->tx.bad_used) {
		n->dev->error = "the device returned a transmit chain that was not outstanding";
		return false;
	}
	return true;
}

bool vnet_send(struct vnet *n, const void *frame, uint32_t len)
{
	uint64_t deadline = deadline_ms(VNET_TX_TIMEOUT_MS);
	struct vbuf b;
	uint8_t *buf;

	if (len > VNET_TX_BUF_SIZE - VNET_HDR_LEN) {
		snprintf(why, sizeof(why), "a %u-byte frame is over the %lu-byte transmit buffer",
			 len, VNET_TX_BUF_SIZE - VNET_HDR_LEN);
		n->dev->error = why;
		return false;
	}
	for (;;) {
		if (!tx_reclaim(n))
			return false;
		if (n->tx_nfree)
			break;
		if (expired(deadline)) {
			snprintf(why, sizeof(why), "no transmit buffer came back within %u ms %s",
				 VNET_TX_TIMEOUT_MS, virtq_state(&n->tx));
			n->dev->error = why;
			return false;
		}
		cpu_relax();
	}
	buf = n->tx_buf[n->tx_free[--n->tx_nfree]];
	memset(buf, 0, VNET_HDR_LEN);	/* flags 0: the checksums are complete */
	memcpy(buf + VNET_HDR_LEN, frame, len);
	b = (struct vbuf){ (uint64_t)buf, VNET_HDR_LEN + len, false };
	virtq_add(&n->tx, &b, 1, buf);
	virtq_kick(&n->tx);
	n->tx_frames++;
	return true;
}

/* The next used receive buffer and its length: 1, or 0 if none came by the deadline, or
 * VNET_ERROR (error set) if the device returned something impossible. Before it waits, the
 * device hears of the buffers posted since the last kick. */
static int rx_take(struct vnet *n, uint8_t **buf, uint32_t *len, uint64_t deadline)
{
	void *token;
	bool taken;

	while (!(taken = virtq_poll(&n->rx, &token, len)) && !n->rx.bad_used) {
		rx_kick(n);
		if (expired(deadline))
			return 0;
		cpu_relax();
	}
	if (n->rx.bad_used) {
		n->dev->error = "the device returned a receive buffer that was not outstanding";
		return VNET_ERROR;
	}
	if (*len > n->rx_buf_size) {
		snprintf(why, sizeof(why), "used length %u for a %u-byte receive buffer", *len,
			 n->rx_buf_size);
		n->dev->error = why;
		return VNET_ERROR;
	}
	*buf = token;
	return taken;
}

/* Copy the frame that starts in buf (used bytes, header included) and goes on in the next
 * num_buffers - 1 used buffers (MRG_RXBUF) into frame, cut to size, and post the buffers
 * again. Its length, or VNET_ERROR. */
static int rx_frame(struct vnet *n, uint8_t *buf, uint32_t used, uint8_t *frame, uint32_t size)
{
	uint64_t deadline = deadline_ms(VNET_MERGE_TIMEOUT_MS);
	struct virtio_net_hdr_v1 hdr;
	uint32_t offset = VNET_HDR_LEN, total = 0, copied = 0;
	uint16_t buffers;
	int rc = 0;

	if (used < VNET_HDR_LEN) {
		snprintf(why, sizeof(why), "a receive buffer came back with %u bytes, less than "
			 "the %lu-byte header", used, VNET_HDR_LEN);
		goto fail;
	}
	memcpy(&hdr, buf, VNET_HDR_LEN);
	buffers = n->mrg ? hdr.num_buffers : 1;
	if (!n->mrg && hdr.num_buffers != 1) {
		snprintf(why, sizeof(why), "num_buffers %u without MRG_RXBUF (must be 1)",
			 hdr.num_buffers);
		goto fail;
	}
	if (buffers == 0 || buffers > VNET_RX_BUFS) {
		snprintf(why, sizeof(why), "num_buffers %u with %u receive buffers posted", buffers,
			 VNET_RX_BUFS);
		goto fail;
	}
	for (uint16_t k = 1;; k++) {
		uint32_t part = used - offset, chunk = part < size - copied ? part : size - copied;

		memcpy(frame + copied, buf + offset, chunk);
		copied += chunk;
		total += part;
		post_rx(n, buf);
		if (k == buffers)
			break;
		rc = rx_take(n, &buf, &used, deadline);
		if (rc == 0)
			snprintf(why, sizeof(why), "buffer %u of a %u-buffer frame did not come "
				 "within %u ms", k + 1, buffers, VNET_MERGE_TIMEOUT_MS);
		if (rc <= 0) {
			rx_kick(n);
			if (rc == 0)
				n->dev->error = why;
			return VNET_ERROR;
		}
		offset = 0;
	}
	if (n->rx_unkicked >= VNET_RX_KICK_BATCH)
		rx_kick(n);
	n->rx_frames++;
	n->rx_merged += buffers > 1;
	n->rx_truncated += total > size;
	return copied;
fail:
	post_rx(n, buf);
	rx_kick(n);
	n->dev->error = why;
	return VNET_ERROR;
}

/* Answer frame if it is an ARP request for our address; whether it was one. */
static bool answer_arp(struct vnet *n, const uint8_t *frame, uint32_t len)
{
	uint8_t reply[ETH_HLEN + ARP_LEN];
	struct arp_info a;

	if (!n->ip || !arp_parse(frame, len, &a) || a.op != ARP_OP_REQUEST || a.tpa != n->ip)
		return false;
	/* Should the reply not go out, the requester asks again: nothing to report here. */
	if (vnet_send(n, reply, arp_build(reply, ARP_OP_REPLY, n->mac, n->ip, a.sha, a.spa)))
		n->arp_answered++;
	return true;
}

int vnet_recv(struct vnet *n, void *frame, uint32_t size, uint64_t timeout_ms)
{
	uint64_t deadline = deadline_ms(timeout_ms);

	for (;;) {
		uint8_t *buf;
		uint32_t used;
		int rc = rx_take(n, &buf, &used, deadline);

		if (rc <= 0)
			return rc == 0 ? VNET_TIMEOUT : rc;
		rc = rx_frame(n, buf, used, frame, size);
		if (rc < 0 || !answer_arp(n, frame, rc))
			return rc;
	}
}

bool vnet_arp_resolve(struct vnet *n, uint32_t ip, uint8_t *mac, uint64_t timeout_ms)
{
	static uint8_t frame[ETH_FRAME_MAX];
	static const uint8_t unknown[ETH_ALEN];
	uint64_t deadline = deadline_ms(timeout_ms);
	struct arp_info a;

	while (!expired(deadline)) {
		uint64_t again = deadline_ms(ARP_RETRY_MS);
		size_t len = arp_build(frame, ARP_OP_REQUEST, n->mac, n->ip, unknown, ip);

		if (!vnet_send(n, frame, len))
			return false;
		while (!expired(again) && !expired(deadline)) {
			int got = vnet_recv(n, frame, sizeof(frame), ARP_POLL_MS);

			if (got == VNET_ERROR)
				return false;
			if (got > 0 && arp_parse(frame, got, &a) && a.op == ARP_OP_REPLY &&
			    a.spa == ip) {
				memcpy(mac, a.sha, ETH_ALEN);
				return true;
			}
		}
	}
	snprintf(why, sizeof(why), "no ARP reply from %s within %lu ms", ipv4_text(ip),
		 timeout_ms);
	n->dev->error = why;
	return false;
}

/* ---- Transmitting without waiting (benchmarks) ---- */

bool vnet_tx_fill(struct vnet *n, const void *frame, uint32_t len)
{
	if (len > VNET_TX_BUF_SIZE - VNET_HDR_LEN) {
		snprintf(why, sizeof(why), "a %u-byte frame is over the %lu-byte transmit buffer",
			 len, VNET_TX_BUF_SIZE - VNET_HDR_LEN);
		n->dev->error = why;
		return false;
	}
	for (unsigned i = 0; i < VNET_TX_SLOTS; i++) {
		memset(n->tx_buf[i], 0, VNET_HDR_LEN);	/* flags 0: the checksums are complete */
		memcpy(n->tx_buf[i] + VNET_HDR_LEN, frame, len);
	}
	return true;
}

bool vnet_tx_post(struct vnet *n, uint32_t len)
{
	struct vbuf b;
	uint8_t *buf;

	if (!n->tx_nfree)
		return false;
	buf = n->tx_buf[n->tx_free[--n->tx_nfree]];
	b = (struct vbuf){ (uint64_t)buf, VNET_HDR_LEN + len, false };
	virtq_add(&n->tx, &b, 1, buf);
	n->tx_frames++;
	return true;
}

bool vnet_tx_reclaim(struct vnet *n)
{
	return tx_reclaim(n);
}

/* ---- Byte order and the Internet checksum ---- */

uint32_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (i < len)
		sum += (uint32_t)p[i] << 8;
	return sum;
}

uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

uint16_t inet_checksum(const void *data, size_t len)
{
	return csum_fold(csum_add(0, data, len));
}

bool parse_ipv4(const char *s, size_t len, uint32_t *ip)
{
	uint32_t value = 0, part = 0;
	unsigned parts = 0, digits = 0;

	for (size_t i = 0; i <= len; i++) {
		if (i == len || s[i] == '.') {
			if (!digits || ++parts > IPV4_PARTS)
				return false;
			value = value << 8 | part;
			part = digits = 0;
		} else if (s[i] >= '0' && s[i] <= '9') {
			part = part * 10 + (s[i] - '0');
			if (++digits > 3 || part > IPV4_PART_MAX)
				return false;
		} else {
			return false;
		}
	}
	if (parts != IPV4_PARTS)
		return false;
	*ip = value;
	return true;
}

const char *mac_text(const uint8_t *mac)
{
	static char text[TEXT_COPIES][MAC_TEXT_LEN];
	static unsigned turn;
	char *t = text[turn++ % TEXT_COPIES];

	snprintf(t, MAC_TEXT_LEN, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2],
		 mac[3], mac[4], mac[5]);
	return t;
}

const char *ipv4_text(uint32_t ip)
{
	static char text[TEXT_COPIES][IPV4_TEXT_LEN];
	static unsigned turn;
	char *t = text[turn++ % TEXT_COPIES];

	snprintf(t, IPV4_TEXT_LEN, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff,
		 ip & 0xff);
	return t;
}

/* ---- Frames ---- */

static void eth_build(uint8_t *frame, const uint8_t *dst, const uint8_t *src, uint16_t type)
{
	struct eth_hdr *eth = (struct eth_hdr *)frame;

	memcpy(eth->dst, dst, ETH_ALEN);
	memcpy(eth->src, src, ETH_ALEN);
	eth->type = htons(type);
}

size_t arp_build(uint8_t *frame, uint16_t op, const uint8_t *sha, uint32_t spa,
		 const uint8_t *tha, uint32_t tpa)
{
	struct arp_pkt *arp = (struct arp_pkt *)(frame + ETH_HLEN);

	eth_build(frame, op == ARP_OP_REQUEST ? broadcast_mac : tha, sha, ETH_P_ARP);
	arp->htype = htons(ARP_HTYPE_ETHER);
	arp->ptype = htons(ETH_P_IP);
	arp->hlen = ETH_ALEN;
	arp->plen = sizeof(uint32_t);
	arp->op = htons(op);
	memcpy(arp->sha, sha, ETH_ALEN);
	arp->spa = htonl(spa);
	memcpy(arp->tha, tha, ETH_ALEN);
	arp->tpa = htonl(tpa);
	return ETH_HLEN + ARP_LEN;
}

size_t ipv4_build(uint8_t *frame, const struct net_ends *e, uint8_t proto, size_t payload_len)
{
	struct ipv4_hdr *ip = (struct ipv4_hdr *)(frame + ETH_HLEN);

	eth_build(frame, e->dst_mac, e->src_mac, ETH_P_IP);
	*ip = (struct ipv4_hdr){
		.version_ihl = IPV4_VERSION << 4 | IPV4_HLEN / IPV4_WORD,
		.total_len = htons(IPV4_HLEN + payload_len),
		.id = htons(next_ip_id++),
		.ttl = IPV4_TTL,
		.proto = proto,
		.src = htonl(e->src_ip),
		.dst = htonl(e->dst_ip),
	};
	ip->csum = htons(inet_checksum(ip, IPV4_HLEN));
	return ETH_HLEN + IPV4_HLEN;
}

size_t icmp_echo_build(uint8_t *frame, const struct net_ends *e, uint8_t type, uint16_t id,
		       uint16_t seq, const void *data, size_t len)
{
	size_t at = ipv4_build(frame, e, IPPROTO_ICMP, ICMP_ECHO_HLEN + len);
	struct icmp_echo_hdr *icmp = (struct icmp_echo_hdr *)(frame + at);

	*icmp = (struct icmp_echo_hdr){ .type = type, .id = htons(id), .seq = htons(seq) };
	memcpy(frame + at + ICMP_ECHO_HLEN, data, len);
	icmp->csum = htons(inet_checksum(icmp, ICMP_ECHO_HLEN + len));
	return at + ICMP_ECHO_HLEN + len;
}

/* The sum of the IPv4 pseudo-header for a transport checksum. */
static uint32_t pseudo_sum(uint32_t src, uint32_t dst, uint8_t proto, size_t len)
{
	uint8_t ph[PSEUDO_HDR_LEN] = { src >> 24, src >> 16, src >> 8, src, dst >> 24, dst >> 16,
				       dst >> 8, dst, 0, proto, len >> 8, len };

	return csum_add(0, ph, sizeof(ph));
}

size_t udp_build(uint8_t *frame, const struct net_ends *e, uint16_t sport, uint16_t dport,
		 const void *data, size_t len)
{
	size_t at = ipv4_build(frame, e, IPPROTO_UDP, UDP_HLEN + len);
	struct udp_hdr *udp = (struct udp_hdr *)(frame + at);
	uint16_t csum;

	*udp = (struct udp_hdr){ .sport = htons(sport), .dport = htons(dport),
				 .len = htons(UDP_HLEN + len) };
	memcpy(frame + at + UDP_HLEN, data, len);
	csum = csum_fold(csum_add(pseudo_sum(e->src_ip, e->dst_ip, IPPROTO_UDP, UDP_HLEN + len),
				  udp, UDP_HLEN + len));
	udp->csum = htons(csum == CSUM_NONE ? CSUM_ZERO : csum);
	return at + UDP_HLEN + len;
}

bool arp_parse(const uint8_t *frame, size_t len, struct arp_info *out)
{
	const struct eth_hdr *eth = (const struct eth_hdr *)frame;
	const struct arp_pkt *arp = (const struct arp_pkt *)(frame + ETH_HLEN);

	if (len < ETH_HLEN + ARP_LEN || ntohs(eth->type) != ETH_P_ARP ||
	    ntohs(arp->htype) != ARP_HTYPE_ETHER || ntohs(arp->ptype) != ETH_P_IP ||
	    arp->hlen != ETH_ALEN || arp->plen != sizeof(uint32_t))
		return false;
	out->op = ntohs(arp->op);
	memcpy(out->sha, arp->sha, ETH_ALEN);
	memcpy(out->tha, arp->tha, ETH_ALEN);
	out->spa = ntohl(arp->spa);
	out->tpa = ntohl(arp->tpa);
	return true;
}

bool ipv4_parse(const uint8_t *frame, size_t len, struct ipv4_info *out)
{
	const struct eth_hdr *eth = (const struct eth_hdr *)frame;
	const struct ipv4_hdr *ip = (const struct ipv4_hdr *)(frame + ETH_HLEN);
	size_t hlen, total;

	if (len < ETH_HLEN + IPV4_HLEN || ntohs(eth->type) != ETH_P_IP ||
	    ip->version_ihl >> 4 != IPV4_VERSION)
		return false;
	hlen = (ip->version_ihl & IPV4_IHL_MASK) * IPV4_WORD;
	total = ntohs(ip->total_len);
	if (hlen < IPV4_HLEN || total < hlen || total > len - ETH_HLEN ||
	    inet_checksum(ip, hlen) != 0 || ntohs(ip->frag) & IPV4_FRAG_MASK)
		return false;
	out->src = ntohl(ip->src);
	out->dst = ntohl(ip->dst);
	out->proto = ip->proto;
	out->payload = frame + ETH_HLEN + hlen;
	out->len = total - hlen;
	return true;
}

bool icmp_echo_parse(const struct ipv4_info *ip, struct icmp_echo_info *out)
{
	const struct icmp_echo_hdr *icmp = (const struct icmp_echo_hdr *)ip->payload;

	if (ip->proto != IPPROTO_ICMP || ip->len < ICMP_ECHO_HLEN ||
	    (icmp->type != ICMP_ECHO_REPLY && icmp->type != ICMP_ECHO_REQUEST) ||
	    inet_checksum(icmp, ip->len) != 0)
		return false;
	out->type = icmp->type;
	out->code = icmp->code;
	out->id = ntohs(icmp->id);
	out->seq = ntohs(icmp->seq);
	out->data = ip->payload + ICMP_ECHO_HLEN;
	out->len = ip->len - ICMP_ECHO_HLEN;
	return true;
}

bool udp_parse(const struct ipv4_info *ip, struct udp_info *out)
{
	const struct udp_hdr *udp = (const struct udp_hdr *)ip->payload;
	size_t len;

	if (ip->proto != IPPROTO_UDP || ip->len < UDP_HLEN)
		return false;
	len = ntohs(udp->len);
	if (len < UDP_HLEN || len > ip->len)
		return false;
	if (udp->csum != CSUM_NONE &&
	    csum_fold(csum_add(pseudo_sum(ip->src, ip->dst, IPPROTO_UDP, len), udp, len)) != 0)
		return false;
	out->sport = ntohs(udp->sport);
	out->dport = ntohs(udp->dport);
	out->data = ip->payload + UDP_HLEN;
	out->len = len - UDP_HLEN;
	return true;
}

/* ---- The probe.net.* parameters the network tests share ---- */

const char *vnet_read_params(struct vnet_params *p)
{
	const char *value;
	size_t len;

	*p = (struct vnet_params){ VNET_DEFAULT_IP, VNET_DEFAULT_HOST, VNET_DEFAULT_PORT, 0 };
	if (cmdline_find("probe.net.ip", &value, &len) && !parse_ipv4(value, len, &p->ip))
		return "probe.net.ip is not an address A.B.C.D";
	if (cmdline_find("probe.net.host", &value, &len) && !parse_ipv4(value, len, &p->host))
		return "probe.net.host is not an address A.B.C.D";
	if (cmdline_find("probe.net.port", &value, &len) &&
	    !(parse_u64(value, len, &p->port) && p->port && p->port <= VNET_MAX_PORT)) {
		snprintf(why, sizeof(why), "probe.net.port is not a number from 1 to %u",
			 VNET_MAX_PORT);
		return why;
	}
	if (cmdline_find("probe.net.mrg", &value, &len) &&
	    !(parse_u64(value, len, &p->mrg) && p->mrg <= 1))
		return "probe.net.mrg is not 0 or 1";
	return NULL;
}
