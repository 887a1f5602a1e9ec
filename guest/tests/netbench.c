/* netbench: UDP packet rate through the first virtio-net NIC, no verification beyond counting.
 * probe.net.dir=tx|rx (default tx), probe.net.size=N (UDP payload bytes, 1 to 1472, default 64),
 * probe.net.count=N (datagrams, default 100000), and net.c's probe.net.ip, probe.net.host and
 * probe.net.port (probe.net.mrg is ignored: 2 KiB receive buffers, one frame each). dir, size
 * and count may each be a comma-separated list: the k-th netbench in probe= takes the k-th item
 * (the last one when the list is shorter), so that one boot can run several
 * (`probe=netbench,netbench probe.net.dir=tx,rx`). Each run resets the NIC at its end.
 *
 * tx: ARP for the host, print `PROBE netbench start tx <size>`, then send `count` datagrams
 * from guest port port+1 to host:port as fast as the transmit queue takes them: the frame is
 * written into every transmit slot once, and slots go back on the ring as the device returns
 * them, one kick per batch, never waiting on one packet. Once all have come back:
 * `PROBE netbench ok tx <count> packets`. The host counts what arrives.
 *
 * rx: ARP for the host (the NIC set up, its 256 receive buffers posted), print
 * `PROBE netbench start rx <size>`, then count datagrams of `size` bytes to the guest's address
 * and port port+1 until `count` have come or 2 s pass with none, answering ARP requests on the
 * way. `PROBE netbench ok rx <n> packets <us> us`: how many came, and the guest's own time
 * (TSC) from the first to the last. Frames are looked at in their receive buffers (not copied),
 * which go back on the ring at once and are announced in batches of 32, so the ring stays full.
 * This receive path is its own, not vnet_recv's: it takes a num_buffers of 0 as well as 1 (QEMU
 * 7.2 leaves it 0 without MRG_RXBUF, where virtio 1.x says 1), as it only counts. */
#include "lib/clock.h"
#include "lib/probe.h"
#include "lib/virtio_net.h"
#include "tests/tests.h"

#define DEFAULT_COUNT 100000
#define MAX_COUNT UINT32_MAX
#define DEFAULT_SIZE 64
#define MAX_SIZE (ETH_DATA_MAX - IPV4_HLEN - UDP_HLEN)
#define ARP_TIMEOUT_MS 5000
#define RX_IDLE_MS 2000
#define ARP_RETRY_MS 1000
#define US_PER_MS 1000
#define RX_ERROR (-1)

enum direction { TX, RX };

static struct vnet net;
static struct virtio_dev *dev;
static struct vnet_params params;
static struct net_ends ends;		/* guest to host */
static uint8_t frame[ETH_FRAME_MAX];
static unsigned runs;			/* netbench runs so far in this boot */
static unsigned rx_unkicked;		/* receive buffers posted since the last kick */

/* Item `index` of a comma-separated parameter (the last item if there are fewer): false if the
 * parameter is not on the command line. */
static bool list_item(const char *key, unsigned index, const char **item, size_t *len)
{
	const char *value;
	size_t all, start = 0;

	if (!cmdline_find(key, &value, &all))
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

/* The number in item `index` of `key` into *out (left alone if the key is absent): false
 * (reported) unless it is from 1 to max. */
static bool number_item(const char *key, unsigned index, uint64_t max, uint64_t *out)
{
	const char *value;
	size_t len;

	if (!list_item(key, index, &value, &len))
		return true;
	return report(parse_u64(value, len, out) && *out && *out <= max,
		      "%s is not a number from 1 to %lu", key, max);
}

/* Tell the device about the receive buffers posted since the last kick (if it asks). */
static void rx_kick(void)
{
	if (rx_unkicked)
		virtq_kick(&net.rx);
	rx_unkicked = 0;
}

/* Give a receive buffer back to the device; announced every VNET_RX_KICK_BATCH buffers. */
static void rx_repost(uint8_t *buf)
{
	struct vbuf b = { (uint64_t)buf, VNET_RX_BUF_SIZE, true };

	virtq_add(&net.rx, &b, 1, buf);
	if (++rx_unkicked >= VNET_RX_KICK_BATCH)
		rx_kick();
}

/* The next received frame, in its buffer (*buf; back to the device with rx_repost): its
 * length after the virtio-net header, 0 if none has come, or RX_ERROR (reported). ARP
 * requests for our address are answered and reposted here (0). */
static int rx_next(uint8_t **buf)
{
	struct virtio_net_hdr_v1 *hdr;
	struct arp_info a;
	uint8_t reply[ETH_HLEN + ARP_LEN];
	uint32_t used;
	void *token;
	int len;

	if (!virtq_poll(&net.rx, &token, &used)) {
		if (!report(!net.rx.bad_used, "the device returned a receive buffer that was not "
			    "outstanding"))
			return RX_ERROR;
		rx_kick();
		return 0;
	}
	*buf = token;
	hdr = token;
	if (!report(used >= VNET_HDR_LEN && used <= VNET_RX_BUF_SIZE && hdr->num_buffers <= 1,
		    "a receive buffer came back with %u bytes, num_buffers %u", used,
		    hdr->num_buffers))
		return RX_ERROR;
	len = used - VNET_HDR_LEN;
	if (arp_parse(*buf + VNET_HDR_LEN, len, &a) && a.op == ARP_OP_REQUEST &&
	    a.tpa == params.ip) {
		rx_repost(*buf);
		return report_after(vnet_send(&net, reply, arp_build(reply, ARP_OP_REPLY, net.mac,
								     params.ip, a.sha, a.spa)),
				    "answering ARP: %s", dev->error) ? 0 : RX_ERROR;
	}
	return len;
}

/* Open the NIC (2 KiB receive buffers posted) and learn the host's MAC into ends. */
static bool open_and_arp(void)
{
	static const uint8_t unknown[ETH_ALEN];
	uint64_t deadline = deadline_ms(ARP_TIMEOUT_MS), again = 0;
	struct arp_info a;

	dev = vnet_find();
	if (!report(dev, "no virtio-net device") ||
	    !report_after(vnet_open(&net, dev, params.ip, false), "set-up of %02x:%02x.%x: %s",
			  dev->pci.bus, dev->pci.dev, dev->pci.fn, dev->error))
		return false;
	rx_unkicked = 0;
	memcpy(ends.src_mac, net.mac, ETH_ALEN);
	ends.src_ip = params.ip;
	ends.dst_ip = params.host;
	while (!expired(deadline)) {
		uint8_t *buf;
		int len;

		if (expired(again)) {
			len = arp_build(frame, ARP_OP_REQUEST, net.mac, params.ip, unknown,
					params.host);
			if (!report_after(vnet_send(&net, frame, len), "ARP: %s", dev->error))
				return false;
			again = deadline_ms(ARP_RETRY_MS);
		}
		len = rx_next(&buf);
		if (len == RX_ERROR)
			return false;
		if (!len) {
			cpu_relax();
			continue;
		}
		bool reply = arp_parse(buf + VNET_HDR_LEN, len, &a) && a.op == ARP_OP_REPLY &&
			     a.spa == params.host;

		if (reply)
			memcpy(ends.dst_mac, a.sha, ETH_ALEN);
		rx_repost(buf);
		if (reply)
			return true;
	}
	return report(false, "no ARP reply from %s within %u ms", ipv4_text(params.host),
		      ARP_TIMEOUT_MS);
}

/* Send `count` copies of one datagram, refilling the ring from the slots that came back. */
static void bench_tx(uint64_t size, uint64_t count)
{
	static uint8_t payload[MAX_SIZE];
	uint64_t posted = 0, deadline;
	uint32_t len;

	for (unsigned i = 0; i < size; i++)
		payload[i] = i & 0xff;
	len = udp_build(frame, &ends, params.port + 1, params.port, payload, size);
	/* The ARP requests' slots come back before every slot is written. */
	deadline = deadline_ms(VNET_TX_TIMEOUT_MS);
	while (net.tx_nfree < VNET_TX_SLOTS) {
		if (!report_after(vnet_tx_reclaim(&net), "%s", dev->error) ||
		    !report(!expired(deadline), "the ARP requests' transmit slots did not come "
			    "back within %u ms", VNET_TX_TIMEOUT_MS))
			return;
		cpu_relax();
	}
	if (!report_after(vnet_tx_fill(&net, frame, len), "%s", dev->error))
		return;
	console_printf("PROBE netbench start tx %lu\n", size);
	deadline = deadline_ms(VNET_TX_TIMEOUT_MS);
	while (posted < count || net.tx_nfree < VNET_TX_SLOTS) {
		unsigned was_free = net.tx_nfree, batch = 0;

		if (!report_after(vnet_tx_reclaim(&net), "after %lu datagrams: %s", posted,
				  dev->error))
			return;
		if (net.tx_nfree != was_free)
			deadline = deadline_ms(VNET_TX_TIMEOUT_MS);
		while (posted < count && vnet_tx_post(&net, len)) {
			posted++;
			batch++;
		}
		if (batch) {
			virtq_kick(&net.tx);
		} else if (expired(deadline)) {
			report(false, "no transmit slot came back within %u ms after %lu of %lu "
			       "datagrams %s", VNET_TX_TIMEOUT_MS, posted, count,
			       virtq_state(&net.tx));
			return;
		} else {
			cpu_relax();
		}
	}
	report_details("tx %lu packets", count);
}

/* Count datagrams of `size` bytes to our port until `count` came or none for RX_IDLE_MS. */
static void bench_rx(uint64_t size, uint64_t count)
{
	uint64_t received = 0, first = 0, last = 0, idle;
	struct ipv4_info ip;
	struct udp_info udp;

	console_printf("PROBE netbench start rx %lu\n", size);
	idle = deadline_ms(RX_IDLE_MS);
	while (received < count && !expired(idle)) {
		uint8_t *buf;
		int len = rx_next(&buf);

		if (len == RX_ERROR)
			return;
		if (!len) {
			cpu_relax();
			continue;
		}
		if (ipv4_parse(buf + VNET_HDR_LEN, len, &ip) && ip.dst == params.ip &&
		    udp_parse(&ip, &udp) && udp.dport == params.port + 1 && udp.len == size) {
			last = rdtsc();
			if (!received++)
				first = last;
			idle = deadline_ms(RX_IDLE_MS);
		}
		rx_repost(buf);
	}
	if (!report(received, "no %lu-byte datagram to %s:%lu within %u ms", size,
		    ipv4_text(params.ip), params.port + 1, RX_IDLE_MS))
		return;
	report_details("rx %lu packets %lu us", received,
		       (last - first) * US_PER_MS / tsc_per_ms());
}

void test_netbench(void)
{
	unsigned run = runs++;
	uint64_t size = DEFAULT_SIZE, count = DEFAULT_COUNT;
	enum direction dir = TX;
	const char *value, *why;
	size_t len;

	why = vnet_read_params(&params);
	if (!report(!why, "%s", why))
		return;
	if (list_item("probe.net.dir", run, &value, &len)) {
		dir = word_is(value, len, "rx") ? RX : TX;
		if (!report(dir == RX || word_is(value, len, "tx"), "probe.net.dir: expected tx "
			    "or rx"))
			return;
	}
	if (!number_item("probe.net.size", run, MAX_SIZE, &size) ||
	    !number_item("probe.net.count", run, MAX_COUNT, &count))
		return;
	if (open_and_arp()) {
		if (dir == TX)
			bench_tx(size, count);
		else
			bench_rx(size, count);
	}
	if (dev)
		virtio_reset(dev);
}
