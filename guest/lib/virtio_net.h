/* virtio-net on top of lib/virtio.h: finding the NIC, setting it up with a polled receive queue
 * (0) and transmit queue (1), sending and receiving Ethernet frames (each behind the 12-byte
 * virtio_net_hdr_v1; with VIRTIO_NET_F_MRG_RXBUF a received frame may span several buffers),
 * answering ARP requests for the guest's own address on the way, and building and parsing the
 * few frames the tests use (Ethernet, ARP, IPv4, ICMP echo, UDP; big-endian on the wire). */
#ifndef PROBE_VIRTIO_NET_H
#define PROBE_VIRTIO_NET_H

#include <stddef.h>

#include "lib/virtio.h"

#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_CFG_MAC 0		/* 6 bytes */
#define VIRTIO_NET_CFG_STATUS 6		/* le16, with VIRTIO_NET_F_STATUS */
#define VIRTIO_NET_S_LINK_UP 1
#define VNET_RXQ 0
#define VNET_TXQ 1

#define VNET_RX_BUFS 256		/* receive buffers posted (at most the queue's size) */
/* Buffers given back are announced in batches of this many (or when the ring runs dry). */
#define VNET_RX_KICK_BATCH 32
#define VNET_RX_BUF_SIZE 2048		/* each: a whole frame and its header */
/* With MRG_RXBUF the buffers are this small, so that ICMP and UDP frames span two. */
#define VNET_MRG_BUF_SIZE 64
#define VNET_TX_SLOTS 64		/* frames in flight on the transmit queue */
#define VNET_TX_BUF_SIZE 2048
#define VNET_TX_TIMEOUT_MS 1000		/* for a transmit slot to come back */
#define VNET_MERGE_TIMEOUT_MS 1000	/* for the rest of a frame's buffers */
#define VNET_TIMEOUT (-1)		/* vnet_recv: nothing in time */
#define VNET_ERROR (-2)			/* vnet_recv: the device misbehaved (error set) */

#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_DATA_MAX 1500
#define ETH_FRAME_MAX (ETH_HLEN + ETH_DATA_MAX)
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ARP_HTYPE_ETHER 1
#define ARP_OP_REQUEST 1
#define ARP_OP_REPLY 2
#define ARP_LEN 28			/* for Ethernet and IPv4 */
#define IPV4_VERSION 4
#define IPV4_HLEN 20			/* without options */
#define IPV4_TTL 64
#define IPV4_FRAG_MASK 0x3fff		/* more-fragments and offset: we take no fragments */
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMP_ECHO_HLEN 8
#define UDP_HLEN 8

/* The header in front of every frame on both queues (little-endian fields). */
struct virtio_net_hdr_v1 {
	uint8_t flags;
	uint8_t gso_type;
	uint16_t hdr_len;
	uint16_t gso_size;
	uint16_t csum_start;
	uint16_t csum_offset;
	uint16_t num_buffers;
} __attribute__((packed));

#define VNET_HDR_LEN sizeof(struct virtio_net_hdr_v1)

/* One open NIC: both queues, their memory and buffers (a static in the test, in .bss). */
struct vnet {
	struct virtq_area rx_area, tx_area;
	uint8_t rx_buf[VNET_RX_BUFS][VNET_RX_BUF_SIZE] __attribute__((aligned(4096)));
	uint8_t tx_buf[VNET_TX_SLOTS][VNET_TX_BUF_SIZE] __attribute__((aligned(4096)));
	struct virtio_dev *dev;
	struct virtq rx, tx;
	uint8_t mac[ETH_ALEN];		/* the device's (VIRTIO_NET_F_MAC), else local */
	uint32_t ip;			/* ARP requests for it are answered (host byte order) */
	bool mrg;			/* VIRTIO_NET_F_MRG_RXBUF negotiated */
	bool link_status;		/* VIRTIO_NET_F_STATUS negotiated */
	uint32_t rx_buf_size;		/* VNET_RX_BUF_SIZE, or VNET_MRG_BUF_SIZE with mrg */
	uint16_t tx_free[VNET_TX_SLOTS];	/* free transmit slots, a stack */
	unsigned tx_nfree;
	unsigned rx_unkicked;		/* receive buffers posted since the last kick */
	uint64_t rx_frames, tx_frames;
	uint64_t rx_merged;		/* frames that spanned more than one buffer */
	uint64_t rx_truncated;		/* frames cut to the caller's buffer */
	uint64_t arp_answered;		/* requests for ip answered by the receive path */
};

/* The first virtio-net device, or NULL. */
struct virtio_dev *vnet_find(void);
/* Negotiate VERSION_1 plus MAC and STATUS (as offered) and MRG_RXBUF (if `mrg` and offered),
 * read the MAC, set up both queues polled, post the receive buffers, DRIVER_OK. `ip`: the
 * guest's address, for ARP. false (v->error) on failure. */
bool vnet_open(struct vnet *n, struct virtio_dev *v, uint32_t ip, bool mrg);
/* The same with no receive buffers posted (for tests that place their own). */
bool vnet_open_empty(struct vnet *n, struct virtio_dev *v, uint32_t ip, bool mrg);

/* Queue one frame (Ethernet header onward; a zeroed virtio-net header goes in front) and kick.
 * false (error set) if it is too long or no transmit slot came back in time. */
bool vnet_send(struct vnet *n, const void *frame, uint32_t len);
/* The next frame that is not an ARP request for n->ip (those are answered here), copied into
 * frame (cut to size): its length, or VNET_TIMEOUT, or VNET_ERROR (n->dev->error). */
int vnet_recv(struct vnet *n, void *frame, uint32_t size, uint64_t timeout_ms);
/* ARP for `ip` (the request repeated every second) until the reply: its sender's MAC. */
bool vnet_arp_resolve(struct vnet *n, uint32_t ip, uint8_t *mac, uint64_t timeout_ms);

/* ---- Transmitting without waiting (benchmarks) ---- */

/* Write a virtio-net header and `frame` into every transmit slot, to be sent again and again by
 * vnet_tx_post (all slots must be free: right after vnet_open, or once all came back). false
 * (error set) if it is too long. */
bool vnet_tx_fill(struct vnet *n, const void *frame, uint32_t len);
/* Make a free slot, as vnet_tx_fill left it (len bytes of frame), available without a kick;
 * false if no slot is free. */
bool vnet_tx_post(struct vnet *n, uint32_t len);
/* Take back the slots of every frame the device is done with (into n->tx_nfree); false (error
 * set) if the device returned one that was not outstanding. */
bool vnet_tx_reclaim(struct vnet *n);

/* ---- Byte order and the Internet checksum ---- */

static inline uint16_t htons(uint16_t x)
{
	return __builtin_bswap16(x);
}

static inline uint32_t htonl(uint32_t x)
{
	return __builtin_bswap32(x);
}

#define ntohs htons
#define ntohl htonl

/* Add len bytes (big-endian 16-bit words, an odd last byte padded) to a running sum. */
uint32_t csum_add(uint32_t sum, const void *data, size_t len);
/* Fold a running sum into the 16-bit one's complement checksum (in host order). */
uint16_t csum_fold(uint32_t sum);
/* The checksum of len bytes. */
uint16_t inet_checksum(const void *data, size_t len);

/* "A.B.C.D" of exactly len characters, into host byte order. */
bool parse_ipv4(const char *s, size_t len, uint32_t *ip);
/* "xx:xx:xx:xx:xx:xx" of a MAC and "A.B.C.D" of an address (host order), in static buffers
 * (two of each, used in turn). */
const char *mac_text(const uint8_t *mac);
const char *ipv4_text(uint32_t ip);

/* ---- Frames ---- */

struct eth_hdr {
	uint8_t dst[ETH_ALEN];
	uint8_t src[ETH_ALEN];
	uint16_t type;
} __attribute__((packed));

struct arp_pkt {
	uint16_t htype, ptype;
	uint8_t hlen, plen;
	uint16_t op;
	uint8_t sha[ETH_ALEN];
	uint32_t spa;
	uint8_t tha[ETH_ALEN];
	uint32_t tpa;
} __attribute__((packed));

struct ipv4_hdr {
	uint8_t version_ihl;
	uint8_t tos;
	uint16_t total_len;
	uint16_t id;
	uint16_t frag;
	uint8_t ttl;
	uint8_t proto;
	uint16_t csum;
	uint32_t src, dst;
} __attribute__((packed));

struct icmp_echo_hdr {
	uint8_t type, code;
	uint16_t csum;
	uint16_t id, seq;
} __attribute__((packed));

struct udp_hdr {
	uint16_t sport, dport;
	uint16_t len;
	uint16_t csum;
} __attribute__((packed));

/* Who a frame is from and to (addresses in host byte order). */
struct net_ends {
	uint8_t src_mac[ETH_ALEN], dst_mac[ETH_ALEN];
	uint32_t src_ip, dst_ip;
};

/* Builders write a whole frame into `frame` (room for ETH_FRAME_MAX) and return its length. */
size_t arp_build(uint8_t *frame, uint16_t op, const uint8_t *sha, uint32_t spa,
		 const uint8_t *tha, uint32_t tpa);
/* The Ethernet and IPv4 headers (checksum done, IDs counting up) of a datagram of `proto`
 * with payload_len bytes after them; returns where the payload starts. */
size_t ipv4_build(uint8_t *frame, const struct net_ends *e, uint8_t proto, size_t payload_len);
size_t icmp_echo_build(uint8_t *frame, const struct net_ends *e, uint8_t type, uint16_t id,
		       uint16_t seq, const void *data, size_t len);
size_t udp_build(uint8_t *frame, const struct net_ends *e, uint16_t sport, uint16_t dport,
		 const void *data, size_t len);

/* What parsers found; addresses and numbers in host byte order, data points into the frame. */
struct arp_info {
	uint16_t op;
	uint8_t sha[ETH_ALEN], tha[ETH_ALEN];
	uint32_t spa, tpa;
};

struct ipv4_info {
	uint32_t src, dst;
	uint8_t proto;
	const uint8_t *payload;
	size_t len;
};

struct icmp_echo_info {
	uint8_t type, code;
	uint16_t id, seq;
	const uint8_t *data;
	size_t len;
};

struct udp_info {
	uint16_t sport, dport;
	const uint8_t *data;
	size_t len;
};

/* Each is false unless the frame is one of its kind, well formed, checksums right (a UDP
 * checksum of 0 means none). */
bool arp_parse(const uint8_t *frame, size_t len, struct arp_info *out);
bool ipv4_parse(const uint8_t *frame, size_t len, struct ipv4_info *out);
bool icmp_echo_parse(const struct ipv4_info *ip, struct icmp_echo_info *out);
bool udp_parse(const struct ipv4_info *ip, struct udp_info *out);

/* ---- The probe.net.* parameters the network tests share ---- */

#define VNET_IPV4(a, b, c, d) ((uint32_t)(a) << 24 | (b) << 16 | (c) << 8 | (d))
#define VNET_DEFAULT_IP VNET_IPV4(192, 0, 2, 2)
#define VNET_DEFAULT_HOST VNET_IPV4(192, 0, 2, 1)
#define VNET_DEFAULT_PORT 5555
#define VNET_MAX_PORT 65534		/* port + 1 is the guest's */

struct vnet_params {
	uint32_t ip, host;		/* the guest's and the host's addresses (host order) */
	uint64_t port;			/* the host's UDP port; the guest's is port + 1 */
	uint64_t mrg;			/* negotiate VIRTIO_NET_F_MRG_RXBUF */
};

/* probe.net.ip, probe.net.host, probe.net.port and probe.net.mrg (or their defaults) into p:
 * NULL, or why not (one is malformed). */
const char *vnet_read_params(struct vnet_params *p);

#endif
