/* The first virtio-net NIC (lib/virtio_net.h), talking to the host kernel on the other side of
 * its TAP. Parameters: probe.net.ip=A.B.C.D (the guest's address, default 192.0.2.2),
 * probe.net.host=A.B.C.D (the host's, default 192.0.2.1), probe.net.port=N (default 5555),
 * probe.net.count=N (net-udp's datagrams, default 1000), probe.net.mrg=0|1 (negotiate
 * VIRTIO_NET_F_MRG_RXBUF, with 64-byte receive buffers so that ICMP and UDP frames span two;
 * default 0). ARP requests for the guest's address are answered whenever frames are received.
 * Each test resets the NIC at its end.
 *
 * net-arp: an ARP request "who has <host>" from the guest's MAC and address; the reply within
 * 5 s. `PROBE net-arp ok <host MAC>`.
 *
 * net-ping: ARP for the host, then 3 ICMP echo requests (id 0x7072, seq 1 to 3, 56 bytes of
 * data, byte i being (seq + i) & 0xff), each answered within 2 s by a reply with the same id,
 * seq and data. `PROBE net-ping ok 3 replies`.
 *
 * net-udp: ARP for the host, then `count` datagrams from guest port port+1 to host:port, each
 * 64 bytes: a big-endian sequence number (0 to count-1), then 60 bytes (seq + i) & 0xff. Then
 * datagrams to the guest's address and port port+1 (64 bytes, the sequence number first) until
 * all `count` numbers have come or 10 s pass with none new. `PROBE net-udp ok sent <count>
 * received <count>`, FAIL with how many came otherwise.
 *
 * net-hostile: invalid chains, one at a time on a NIC set up afresh with no receive buffers:
 * transmit (1) a chain whose frame descriptor is at 1 TiB, outside RAM, (2) a chain with a
 * device-writable descriptor after the frame, (3) a 4-byte chain, shorter than the header;
 * receive (4) a device-readable buffer, (5) a buffer at 1 TiB. Within ~1 s the device must
 * either return the chain with used length 0 or set DEVICE_NEEDS_RESET; then the NIC is reset
 * and set up again, and an ARP for the host must be answered.
 * `PROBE net-hostile ok 1:<used|reset> 2:... 5:...` (how each case ended). */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_net.h"
#include "tests/tests.h"

#define DEFAULT_COUNT 1000
#define MAX_COUNT (1u << 20)
#define ARP_TIMEOUT_MS 5000
#define POLL_MS 50
#define PING_ID 0x7072
#define PING_COUNT 3
#define PING_DATA 56
#define PING_TIMEOUT_MS 2000
#define UDP_PAYLOAD 64
#define UDP_SEQ_LEN 4
#define UDP_IDLE_MS 10000
#define CASE_TIMEOUT_MS 1000
#define OUTSIDE_RAM (1ULL << 40)	/* 1 TiB */
#define SHORT_LEN 4
#define HOSTILE_CASES 5

static struct vnet net;
static struct virtio_dev *dev;
static struct vnet_params params;
static uint64_t count;			/* probe.net.count */
static struct net_ends ends;		/* guest to host */
static uint8_t frame[ETH_FRAME_MAX];
static uint8_t seen[MAX_COUNT / 8];

/* The probe.net.* parameters into params and count; false (reported) if one is malformed. */
static bool read_params(void)
{
	const char *value, *why = vnet_read_params(&params);
	size_t len;

	if (!report(!why, "%s", why))
		return false;
	count = DEFAULT_COUNT;
	if (cmdline_find("probe.net.count", &value, &len) &&
	    !report(parse_u64(value, len, &count) && count && count <= MAX_COUNT,
		    "probe.net.count is not a number from 1 to %u", MAX_COUNT))
		return false;
	return true;
}

/* Set the NIC up (receive buffers posted) and learn the host's MAC into ends. */
static bool open_and_arp(void)
{
	/* Each call before its report(): the arguments would read dev->error before it is set. */
	bool ok = vnet_open(&net, dev, params.ip, params.mrg);

	if (!report(ok, "set-up of %02x:%02x.%x: %s", dev->pci.bus, dev->pci.dev, dev->pci.fn,
		    dev->error))
		return false;
	memcpy(ends.src_mac, net.mac, ETH_ALEN);
	ends.src_ip = params.ip;
	ends.dst_ip = params.host;
	ok = vnet_arp_resolve(&net, params.host, ends.dst_mac, ARP_TIMEOUT_MS);
	return report(ok, "%s", dev->error);
}

/* Parameters, the NIC, ARP for the host: false (reported) on failure. */
static bool net_start(void)
{
	if (!read_params())
		return false;
	dev = vnet_find();
	if (!report(dev, "no virtio-net device"))
		return false;
	return open_and_arp();
}

static void net_stop(void)
{
	if (dev)
		virtio_reset(dev);
	dev = NULL;
}

/* With MRG_RXBUF the buffers are too small for ICMP and UDP frames: some must have spanned. */
static void check_merged(void)
{
	if (net.mrg)
		report(net.rx_merged, "MRG_RXBUF: no frame spanned more than one %u-byte buffer "
		       "(%lu frames)", net.rx_buf_size, net.rx_frames);
}

void test_net_arp(void)
{
	if (net_start())
		report_details("%s", mac_text(ends.dst_mac));
	net_stop();
}

/* Wait for the echo reply to seq; false (reported) if none came or it is wrong. */
static bool ping_reply(uint16_t seq, const uint8_t *data)
{
	uint64_t deadline = deadline_ms(PING_TIMEOUT_MS);
	struct ipv4_info ip;
	struct icmp_echo_info echo;

	while (!expired(deadline)) {
		int len = vnet_recv(&net, frame, sizeof(frame), POLL_MS);

		if (!report(len != VNET_ERROR, "waiting for echo reply %u: %s", seq, dev->error))
			return false;
		if (len <= 0 || !ipv4_parse(frame, len, &ip) || ip.src != params.host ||
		    ip.dst != params.ip || !icmp_echo_parse(&ip, &echo) ||
		    echo.type != ICMP_ECHO_REPLY)
			continue;
		if (!report(echo.id == PING_ID && echo.seq == seq,
			    "echo reply id 0x%x seq %u, expected id 0x%x seq %u", echo.id, echo.seq,
			    PING_ID, seq))
			return false;
		return report(echo.len == PING_DATA && !memcmp(echo.data, data, PING_DATA),
			      "echo reply %u: %lu bytes of data, not the %u sent", seq, echo.len,
			      PING_DATA);
	}
	return report(false, "no echo reply %u from %s within %u ms", seq, ipv4_text(params.host),
		      PING_TIMEOUT_MS);
}

void test_net_ping(void)
{
	static uint8_t data[PING_DATA];
	unsigned replies = 0;

	if (!net_start())
		goto out;
	for (uint16_t seq = 1; seq <= PING_COUNT; seq++) {
		for (unsigned i = 0; i < PING_DATA; i++)
			data[i] = (seq + i) & 0xff;
		bool sent = vnet_send(&net, frame, icmp_echo_build(frame, &ends, ICMP_ECHO_REQUEST,
								   PING_ID, seq, data, PING_DATA));

		if (!report(sent, "echo request %u: %s", seq, dev->error))
			goto out;
		if (!ping_reply(seq, data))
			goto out;
		replies++;
	}
	check_merged();
	report_details("%u replies", replies);
out:
	net_stop();
}

static bool udp_send_all(void)
{
	uint8_t payload[UDP_PAYLOAD];

	for (uint32_t seq = 0; seq < count; seq++) {
		payload[0] = seq >> 24;
		payload[1] = seq >> 16;
		payload[2] = seq >> 8;
		payload[3] = seq;
		for (unsigned i = UDP_SEQ_LEN; i < UDP_PAYLOAD; i++)
			payload[i] = (seq + i - UDP_SEQ_LEN) & 0xff;
		bool sent = vnet_send(&net, frame, udp_build(frame, &ends, params.port + 1,
							     params.port, payload, UDP_PAYLOAD));

		if (!report(sent, "datagram %u: %s", seq, dev->error))
			return false;
	}
	return true;
}

/* Datagrams to our port until all count sequence numbers came or none new for UDP_IDLE_MS:
 * how many distinct ones came, or -1 (reported) on an error or a malformed datagram. */
static int64_t udp_receive_all(void)
{
	uint64_t idle = deadline_ms(UDP_IDLE_MS), received = 0;
	struct ipv4_info ip;
	struct udp_info udp;

	memset(seen, 0, sizeof(seen));
	while (received < count && !expired(idle)) {
		int len = vnet_recv(&net, frame, sizeof(frame), POLL_MS);
		uint32_t seq;

		if (!report(len != VNET_ERROR, "after %lu datagrams: %s", received, dev->error))
			return -1;
		if (len <= 0 || !ipv4_parse(frame, len, &ip) || ip.dst != params.ip ||
		    !udp_parse(&ip, &udp) || udp.dport != params.port + 1)
			continue;
		if (!report(udp.len == UDP_PAYLOAD, "a %lu-byte datagram from %s:%u, expected %u "
			    "bytes", udp.len, ipv4_text(ip.src), udp.sport, UDP_PAYLOAD))
			return -1;
		seq = (uint32_t)udp.data[0] << 24 | udp.data[1] << 16 | udp.data[2] << 8 |
		      udp.data[3];
		if (!report(seq < count, "sequence number %u is not below the count %lu",
			    seq, count))
			return -1;
		if (!(seen[seq / 8] & 1 << seq % 8)) {
			seen[seq / 8] |= 1 << seq % 8;
			received++;
			idle = deadline_ms(UDP_IDLE_MS);
		}
	}
	return received;
}

void test_net_udp(void)
{
	int64_t received;

	if (!net_start() || !udp_send_all())
		goto out;
	received = udp_receive_all();
	if (received < 0)
		goto out;
	report(received == (int64_t)count, "received %lu of %lu datagrams (none new for "
	       "%u ms)", received, count, UDP_IDLE_MS);
	check_merged();
	report_details("sent %lu received %lu", count, received);
out:
	net_stop();
}

static const char *const case_names[] = {
	NULL, "tx descriptor outside RAM", "tx device-writable descriptor", "tx 4-byte chain",
	"rx device-readable buffer", "rx buffer outside RAM",
};

/* Lay out case n at descriptor 0 (and 1) of its queue, make it available, kick; the queue. */
static struct virtq *build_case(int n)
{
	static struct virtio_net_hdr_v1 hdr;
	static uint8_t arp[VNET_HDR_LEN + ETH_HLEN + ARP_LEN];
	static const uint8_t unknown[ETH_ALEN];
	struct virtq *vq = n <= 3 ? &net.tx : &net.rx;
	struct virtq_desc *d = vq->area->desc;

	memset(&hdr, 0, sizeof(hdr));
	memset(arp, 0, VNET_HDR_LEN);
	arp_build(arp + VNET_HDR_LEN, ARP_OP_REQUEST, net.mac, params.ip, unknown, params.host);
	switch (n) {
	case 1:
		d[0] = (struct virtq_desc){ (uint64_t)&hdr, sizeof(hdr), VIRTQ_DESC_F_NEXT, 1 };
		d[1] = (struct virtq_desc){ OUTSIDE_RAM, ETH_HLEN + ARP_LEN, 0, 0 };
		break;
	case 2:
		d[0] = (struct virtq_desc){ (uint64_t)arp, sizeof(arp), VIRTQ_DESC_F_NEXT, 1 };
		d[1] = (struct virtq_desc){ (uint64_t)frame, sizeof(frame), VIRTQ_DESC_F_WRITE, 0 };
		break;
	case 3:
		d[0] = (struct virtq_desc){ (uint64_t)&hdr, SHORT_LEN, 0, 0 };
		break;
	case 4:
		d[0] = (struct virtq_desc){ (uint64_t)net.rx_buf[0], VNET_RX_BUF_SIZE, 0, 0 };
		break;
	case 5:
		d[0] = (struct virtq_desc){ OUTSIDE_RAM, VNET_RX_BUF_SIZE, VIRTQ_DESC_F_WRITE, 0 };
		break;
	}
	virtq_publish(vq, 0);
	virtq_kick(vq);
	return vq;
}

/* Run case n; NULL if the device behaved and recovered, else why not. `how` gets the outcome. */
static const char *run_case(int n, const char **how)
{
	static char why[160];
	uint8_t dev_status;
	struct virtq *vq;

	*how = "none";
	if (!vnet_open_empty(&net, dev, params.ip, params.mrg)) {
		snprintf(why, sizeof(why), "case %d (%s): set-up failed: %s", n, case_names[n],
			 dev->error);
		return why;
	}
	vq = build_case(n);
	*how = virtq_await_outcome(vq, dev, CASE_TIMEOUT_MS, &dev_status);
	if ((*how)[0] == 'u') {
		struct virtq_used_elem e = vq->used->ring[vq->last_used % vq->size];

		if (e.id != 0 || e.len != 0) {
			snprintf(why, sizeof(why), "case %d (%s): used id %u length %u, "
				 "expected id 0 length 0", n, case_names[n], e.id, e.len);
			return why;
		}
	} else if ((*how)[0] == 'n') {
		snprintf(why, sizeof(why), "case %d (%s): neither a used entry nor "
			 "DEVICE_NEEDS_RESET within %u ms (device status 0x%02x)", n,
			 case_names[n], CASE_TIMEOUT_MS, dev_status);
		return why;
	}
	if (!vnet_open(&net, dev, params.ip, params.mrg)) {
		snprintf(why, sizeof(why), "case %d (%s): set-up after reset failed: %s", n,
			 case_names[n], dev->error);
		return why;
	}
	if (!vnet_arp_resolve(&net, params.host, ends.dst_mac, ARP_TIMEOUT_MS)) {
		snprintf(why, sizeof(why), "case %d (%s): then after a reset: %s", n,
			 case_names[n], dev->error);
		return why;
	}
	return NULL;
}

void test_net_hostile(void)
{
	char outcome[80] = "";
	size_t used = 0;

	if (!read_params())
		return;
	dev = vnet_find();
	if (!report(dev, "no virtio-net device"))
		return;
	for (int n = 1; n <= HOSTILE_CASES; n++) {
		const char *how, *why = run_case(n, &how);

		used += snprintf(outcome + used, sizeof(outcome) - used, " %d:%s", n, how);
		report(!why, "%s", why);
	}
	report_details("%s", outcome + 1);
	net_stop();
}
