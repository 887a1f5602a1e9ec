/* The first virtio-balloon device (lib/virtio_balloon.h). Parameters: probe.balloon.mib=N (the
 * pool, default 64, 4 to 65536, at most what RAM allows), probe.balloon.wait=S (seconds for
 * each wait on the host, default 60).
 *
 * The pool: N MiB of free RAM above the probe's image, starting 2 MiB-aligned, each 4 KiB page
 * filled with the pattern address ^ PATTERN (non-zero: PATTERN has bits above any address), so
 * the host must back every page. Only pool pages are ever given to the balloon. The balloon
 * holds the top of the pool: inflating takes the highest free pages first, deflating gives
 * back the lowest ballooned pages (the last taken) first.
 *
 * balloon: negotiates VERSION_1, STATS_VQ (required), REPORTING and DEFLATE_ON_OOM (if
 * offered), posts the stats buffer (all 10 tags: total_memory the e820 RAM in bytes,
 * free_memory and available_memory the pool's bytes not in the balloon, minor_faults the stats
 * requests answered so far, every other stat its own tag number: swap_in 0, swap_out 1,
 * major_faults 2, disk_caches 7, hugetlb_allocations 8, hugetlb_failures 9), fills the pool and
 * prints `PROBE balloon ready <pool_mib> MiB`. Then, halting between looks (the local APIC
 * timer wakes it every POLL_MS), it answers stats requests and follows num_pages:
 * - num_pages > actual: PFNs on the inflate queue, 256 a buffer, each waited for, actual
 *   written after each; `PROBE balloon inflated <actual> pages`. A num_pages over the pool
 *   is capped at it: `PROBE balloon capped <num_pages> to <pool pages> pages` (once per value).
 * - num_pages < actual: the same on the deflate queue; then every deflated page must read all
 *   zeros (the host gave the memory back), and takes the pattern again and keeps it;
 *   `PROBE balloon deflated <actual> pages zero <zero pages>/<deflated pages>`.
 * It ends once a target > 0 has been reached and a deflate has brought actual back to 0. With
 * REPORTING, the first 4 MiB of the pool (2 MiB-aligned, pattern written again) are then
 * reported as free (one chain of two 2 MiB device-writable descriptors), which must come back
 * and read all zeros (then take the pattern again). `PROBE balloon ok inflated <max actual>
 * deflated <pages deflated in all> stats <requests answered> zero ok report <ok|not offered>`.
 * Every buffer must come back within BUFFER_TIMEOUT_MS; the host must change num_pages within
 * `wait` seconds each time (and finish within 2 * `wait`).
 *
 * balloon-hostile: VERSION_1 only; with the target left at 0, single inflate buffers the device
 * must refuse: (a) 16 PFNs from 1 GiB beyond the end of RAM, (b) 16 PFNs in the PCI hole (8 at
 * 0xd0000000, 8 at 0xe0000000), (c) PFN 0xffffffff, (d) 18 bytes: 4 PFNs of the pool and 2
 * stray bytes; then (e) the buffer of (a) 1000 times, as many at once as the queue holds. Each
 * must come back on the used ring within HOSTILE_MS (for (e): no HOSTILE_MS without one coming
 * back); DEVICE_NEEDS_RESET or nothing fails. Then 16 other pool pages are inflated (actual 16)
 * and deflated (actual 0) and must read zero and take the pattern again.
 * `PROBE balloon-hostile ok beyond-ram:used pci-hole:used pfn-ffffffff:used odd-length:used
 * repeat-1000:used then 16 pages zero 16/16`. */
#include "lib/clock.h"
#include "lib/cpu.h"
#include "lib/probe.h"
#include "lib/virtio_balloon.h"
#include "tests/tests.h"

#define PAGE_SIZE VBALLOON_PAGE_SIZE
#define PAGE_SHIFT VBALLOON_PAGE_SHIFT
#define PATTERN UINT64_C(0xba11005a00000000)	/* no address below 64 GiB xors it to 0 */
#define MAPPED_LIMIT (64 * GiB)			/* what lib/setup.c maps */
#define POOL_ALIGN (2 * MiB)
#define DEFAULT_POOL_MIB 64
#define MIN_POOL_MIB 4				/* the reported range */
#define MAX_POOL_MIB 65536
#define DEFAULT_WAIT_S 60
#define MAX_WAIT_S 3600
#define BUFFER_TIMEOUT_MS 5000
#define POLL_MS 10		/* how often num_pages is read while waiting */
#define REPORT_BYTES (4 * MiB)
#define REPORT_CHUNK (2 * MiB)
#define NO_TARGET UINT64_MAX	/* no num_pages seen yet */

#define HOSTILE_MS 1000
#define HOSTILE_PAGES 16	/* the normal inflate after the cases */
#define HOSTILE_POOL_PAGES 64
#define HOSTILE_PFNS 16
#define HOSTILE_REPEAT 1000
#define ODD_PFNS 4
#define ODD_LEN (ODD_PFNS * 4 + 2)
#define BEYOND_RAM GiB
#define HOLE_LOW_PFN 0xd0000	/* 0xd0000000 */
#define HOLE_HIGH_PFN 0xe0000	/* 0xe0000000: where pyvmm's PCI hole (3.5-4 GiB) starts */
#define MAX_PFN 0xffffffffu

static struct vballoon bal;
static uint32_t pfns[VBALLOON_PFNS_MAX];
static uint64_t pool_addr, pool_pages;	/* the pool: [pool_addr, + pool_pages pages) */
static uint64_t ram_bytes;		/* usable RAM in the e820 map */
static uint32_t actual;			/* pages in the balloon: the pool's top `actual` pages */
static uint64_t stats_answered;

/* ---- The pool ---- */

static uint64_t page_addr(uint64_t index)
{
	return pool_addr + index * PAGE_SIZE;
}

static uint32_t page_pfn(uint64_t index)
{
	return page_addr(index) >> PAGE_SHIFT;
}

static void fill_page(uint64_t addr)
{
	volatile uint64_t *p = (volatile uint64_t *)addr;

	for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
		p[i] = (addr + i * 8) ^ PATTERN;
}

/* The offset of the first qword of the page that is not `zero ? 0 : the pattern`, or -1.
 * Volatile, so that a read-back right after fill_page really reads memory. */
static int page_differs(uint64_t addr, bool zero, uint64_t *got)
{
	const volatile uint64_t *p = (const volatile uint64_t *)addr;

	for (unsigned i = 0; i < PAGE_SIZE / 8; i++) {
		uint64_t want = zero ? 0 : (addr + i * 8) ^ PATTERN;

		uint64_t value = p[i];

		if (value != want) {
			*got = value;
			return i * 8;
		}
	}
	return -1;
}

/* Place a pool of up to `bytes` (2 MiB-aligned, above the image) in the e820 RAM range with the
 * most room; false (reported) if there is less than MIN_POOL_MIB. */
static bool pool_place(uint64_t bytes)
{
	uint64_t image_end = ((uint64_t)_end + POOL_ALIGN - 1) & ~(POOL_ALIGN - 1);
	uint64_t best_lo = 0, best_room = 0;

	ram_bytes = 0;
	for (uint32_t i = 0; i < boot.e820_count; i++) {
		const struct e820_entry *e = &boot.e820[i];
		uint64_t lo = (e->addr + POOL_ALIGN - 1) & ~(POOL_ALIGN - 1);
		uint64_t hi = (e->addr + e->size) & ~(uint64_t)(PAGE_SIZE - 1);

		if (e->type != E820_RAM)
			continue;
		ram_bytes += e->size;
		if (lo < image_end)
			lo = image_end;
		if (hi > MAPPED_LIMIT)
			hi = MAPPED_LIMIT;
		if (hi > lo && hi - lo > best_room) {
			best_lo = lo;
			best_room = hi - lo;
		}
	}
	if (!report(best_room >= MIN_POOL_MIB * MiB, "no %u MiB of RAM above the probe (at 0x%lx)"
		    " for the pool", MIN_POOL_MIB, image_end))
		return false;
	if (bytes > best_room)
		bytes = best_room & ~(MiB - 1);
	pool_addr = best_lo;
	pool_pages = bytes / PAGE_SIZE;
	return true;
}

static void pool_fill(uint64_t first, uint64_t count)
{
	for (uint64_t i = first; i < first + count; i++)
		fill_page(page_addr(i));
}

/* Pages [first, first + count) must read zero (counted in *zero; the first that does not is
 * reported), then take the pattern and keep it. false (reported) on any mismatch. */
static bool check_given_back(uint64_t first, uint64_t count, uint64_t *zero)
{
	uint64_t got = 0, bad_addr = 0, bad_got = 0;
	int bad_off = -1;

	*zero = 0;
	for (uint64_t i = first; i < first + count; i++) {
		int off = page_differs(page_addr(i), true, &got);

		if (off < 0) {
			++*zero;
		} else if (bad_off < 0) {
			bad_off = off;
			bad_addr = page_addr(i);
			bad_got = got;
		}
	}
	for (uint64_t i = first; i < first + count; i++) {
		uint64_t addr = page_addr(i);
		int off;

		fill_page(addr);
		off = page_differs(addr, false, &got);
		if (!report(off < 0, "page 0x%lx, given back, did not keep the pattern: +0x%x "
			    "read 0x%lx, expected 0x%lx", addr, off, got,
			    (addr + off) ^ PATTERN))
			return false;
	}
	return report(*zero == count, "%lu of %lu pages given back do not read zero: the first, "
		      "page 0x%lx, has 0x%lx at +0x%x (the host kept the memory)",
		      count - *zero, count, bad_addr, bad_got, bad_off);
}

/* ---- balloon ---- */

struct balloon_params {
	uint64_t mib, wait_s;
};

/* probe.balloon.mib and probe.balloon.wait (or their defaults): NULL, or why not. */
static const char *read_params(struct balloon_params *p)
{
	static const struct {
		const char *key;
		uint64_t lo, hi;
	} keys[] = {
		{ "probe.balloon.mib", MIN_POOL_MIB, MAX_POOL_MIB },
		{ "probe.balloon.wait", 1, MAX_WAIT_S },
	};
	uint64_t *values[] = { &p->mib, &p->wait_s };
	static char text[120];

	*p = (struct balloon_params){ DEFAULT_POOL_MIB, DEFAULT_WAIT_S };
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

static void stats_refresh(void)
{
	uint64_t free_bytes = (pool_pages - actual) * PAGE_SIZE;

	for (unsigned tag = 0; tag < VBALLOON_S_NR; tag++)
		bal.stats[tag].val = tag;
	bal.stats[VBALLOON_S_MINFLT].val = stats_answered;
	bal.stats[VBALLOON_S_MEMFREE].val = free_bytes;
	bal.stats[VBALLOON_S_MEMTOT].val = ram_bytes;
	bal.stats[VBALLOON_S_AVAIL].val = free_bytes;
}

/* Answer every stats request the device has made; false (reported) on failure. */
static bool serve_stats(void)
{
	while (vballoon_stats_wanted(&bal)) {
		stats_answered++;
		stats_refresh();
		if (!report_after(vballoon_post_stats(&bal), "stats: %s", bal.error))
			return false;
	}
	return report(!bal.failed, "stats: %s", bal.error);
}

/* Inflate until the balloon holds target pages: the highest free pool pages first. */
static bool inflate_to(uint32_t target)
{
	while (actual < target) {
		unsigned n = target - actual < VBALLOON_PFNS_MAX ? target - actual
								 : VBALLOON_PFNS_MAX;

		for (unsigned i = 0; i < n; i++)
			pfns[i] = page_pfn(pool_pages - actual - 1 - i);
		if (!report_after(vballoon_inflate(&bal, pfns, n, BUFFER_TIMEOUT_MS),
				  "inflating from %u pages: %s", actual, bal.error))
			return false;
		actual += n;
		vballoon_set_actual(&bal, actual);
	}
	return true;
}

/* Deflate until the balloon holds target pages (the last taken first), then check them. */
static bool deflate_to(uint32_t target, uint64_t *deflated)
{
	uint64_t first = pool_pages - actual, count = actual - target, zero;
	bool ok;

	while (actual > target) {
		unsigned n = actual - target < VBALLOON_PFNS_MAX ? actual - target
								 : VBALLOON_PFNS_MAX;

		for (unsigned i = 0; i < n; i++)
			pfns[i] = page_pfn(pool_pages - actual + i);
		if (!report_after(vballoon_deflate(&bal, pfns, n, BUFFER_TIMEOUT_MS),
				  "deflating from %u pages: %s", actual, bal.error))
			return false;
		actual -= n;
		vballoon_set_actual(&bal, actual);
	}
	ok = check_given_back(first, count, &zero);
	console_printf("PROBE balloon deflated %u pages zero %lu/%lu\n", actual, zero, count);
	*deflated += count;
	return ok;
}

/* The report of the pool's first 4 MiB: back, and reading zero. */
static bool report_range(void)
{
	uint64_t pages = REPORT_BYTES / PAGE_SIZE, zero;

	pool_fill(0, pages);
	if (!report_after(vballoon_report(&bal, pool_addr, REPORT_BYTES, REPORT_CHUNK,
					  BUFFER_TIMEOUT_MS), "reporting: %s", bal.error))
		return false;
	return check_given_back(0, pages, &zero);
}

/* Follow num_pages until a target > 0 was reached and a deflate brought actual back to 0. */
static bool follow(const struct balloon_params *p, uint32_t *max_actual, uint64_t *deflated)
{
	uint64_t wait_ms = p->wait_s * 1000, start = rdtsc(), changed = start, last = NO_TARGET;
	bool reached = false;

	for (;;) {
		uint32_t seen = READ_ONCE(msi_count), num_pages, target;

		if (!serve_stats())
			return false;
		num_pages = vballoon_num_pages(&bal);
		target = num_pages < pool_pages ? num_pages : pool_pages;
		if (num_pages != last) {
			if (num_pages > pool_pages)
				console_printf("PROBE balloon capped %u to %lu pages\n", num_pages,
					       pool_pages);
			last = num_pages;
			changed = rdtsc();
		}
		if (target > actual) {
			if (!inflate_to(target))
				return false;
			console_printf("PROBE balloon inflated %u pages\n", actual);
			if (actual > *max_actual)
				*max_actual = actual;
		} else if (target < actual) {
			if (!deflate_to(target, deflated))
				return false;
			if (reached && !actual)
				return true;
		}
		if (actual && actual == target)
			reached = true;
		if (!report(ms_since(changed) < wait_ms && ms_since(start) < 2 * wait_ms,
			    "num_pages %u (actual %u) unchanged for %lu ms (%lu ms since ready), "
			    "waiting for %s", num_pages, actual, ms_since(changed), ms_since(start),
			    reached ? "a return to 0" : "a target > 0"))
			return false;
		irq_wait(seen);
	}
}

void test_balloon(void)
{
	uint64_t wanted = VIRTIO_BIT(VIRTIO_BALLOON_F_STATS_VQ) |
			  VIRTIO_BIT(VIRTIO_BALLOON_F_REPORTING) |
			  VIRTIO_BIT(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
	struct balloon_params p;
	const char *why = read_params(&p);
	struct virtio_dev *v;
	uint32_t max_actual = 0;
	uint64_t deflated = 0;
	bool reported;

	if (!report(!why, "%s", why) || !pool_place(p.mib * MiB))
		return;
	v = vballoon_find();
	if (!report(v, "no virtio-balloon device"))
		return;
	if (!report_after(vballoon_open(&bal, v, wanted), "set-up of %02x:%02x.%x: %s", v->pci.bus,
			  v->pci.dev, v->pci.fn, bal.error))
		goto out;
	if (!report(bal.has_stats, "VIRTIO_BALLOON_F_STATS_VQ not offered (features 0x%lx)",
		    v->features))
		goto out;
	actual = 0;
	stats_answered = 0;
	vballoon_set_actual(&bal, 0);
	stats_refresh();
	if (!report_after(vballoon_post_stats(&bal), "stats: %s", bal.error))
		goto out;
	pool_fill(0, pool_pages);
	console_printf("PROBE balloon ready %lu MiB\n", pool_pages * PAGE_SIZE / MiB);
	lapic_timer_periodic(POLL_MS);
	if (!follow(&p, &max_actual, &deflated))
		goto out;
	reported = bal.has_reporting && report_range();
	if (report_failed())
		goto out;
	report_details("inflated %u deflated %lu stats %lu zero ok report %s", max_actual,
		       deflated, stats_answered, reported ? "ok" : "not offered");
out:
	lapic_timer_periodic(0);
	vballoon_stop(&bal);
}

/* ---- balloon-hostile ---- */

static uint32_t beyond_ram[HOSTILE_PFNS], hole[HOSTILE_PFNS], max_pfn[1];
static uint32_t odd[ODD_PFNS + 1];

/* One inflate buffer of len bytes at pfn_bytes: it must come back (used) within HOSTILE_MS.
 * The outcome is appended to out. */
static bool hostile_case(const char *name, const void *pfn_bytes, uint32_t len, char *out,
			 size_t size)
{
	struct vbuf buf = { (uint64_t)pfn_bytes, len, false };
	const char *how;
	uint8_t status;

	if (!report(virtq_add(&bal.inflate, &buf, 1, NULL) >= 0, "%s: no free descriptor", name))
		return false;
	virtq_kick(&bal.inflate);
	how = virtq_await_outcome(&bal.inflate, bal.dev, HOSTILE_MS, &status);
	snprintf(out + strlen(out), size - strlen(out), " %s:%s", name, how);
	if (!report(how[0] == 'u', "%s: %s within %u ms (device status 0x%02x), not a used "
		    "entry", name, how[0] == 'r' ? "DEVICE_NEEDS_RESET" : "nothing came back",
		    HOSTILE_MS, status))
		return false;
	virtq_poll(&bal.inflate, NULL, NULL);
	return report(!bal.inflate.bad_used, "%s: the device returned a buffer that was not "
		      "outstanding", name);
}

/* The beyond-RAM buffer HOSTILE_REPEAT times, as many at once as the queue holds: each batch
 * must come back with no gap of HOSTILE_MS. */
static bool hostile_repeat(char *out, size_t size)
{
	const char *name = "repeat-1000";
	struct vbuf buf = { (uint64_t)beyond_ram, sizeof(beyond_ram), false };
	unsigned sent = 0, back = 0;
	const char *how = "used";
	uint8_t status = 0;

	while (back < HOSTILE_REPEAT) {
		uint64_t gap;

		while (sent < HOSTILE_REPEAT && virtq_add(&bal.inflate, &buf, 1, NULL) >= 0)
			sent++;
		virtq_kick(&bal.inflate);
		gap = deadline_ms(HOSTILE_MS);
		while (back < sent) {
			if (virtq_poll(&bal.inflate, NULL, NULL)) {
				back++;
				gap = deadline_ms(HOSTILE_MS);
			} else if (expired(gap)) {
				status = virtio_get_status(bal.dev);
				how = status & VIRTIO_STATUS_NEEDS_RESET ? "reset" : "none";
				break;
			} else {
				cpu_relax();
			}
		}
		if (how[0] != 'u')
			break;
	}
	snprintf(out + strlen(out), size - strlen(out), " %s:%s", name, how);
	if (!report(how[0] == 'u', "%s: %u of %u sent came back, then %s within %u ms (device "
		    "status 0x%02x)", name, back, sent, how[0] == 'r' ? "DEVICE_NEEDS_RESET" :
		    "nothing", HOSTILE_MS, status))
		return false;
	return report(!bal.inflate.bad_used, "%s: the device returned a buffer that was not "
		      "outstanding", name);
}

void test_balloon_hostile(void)
{
	struct virtio_dev *v = vballoon_find();
	uint64_t beyond = (e820_ram_top() + BEYOND_RAM) >> PAGE_SHIFT, zero;
	uint8_t *odd_tail = (uint8_t *)&odd[ODD_PFNS];
	char out[160] = "";

	if (!report(v, "no virtio-balloon device") || !pool_place(HOSTILE_POOL_PAGES * PAGE_SIZE))
		return;
	pool_pages = HOSTILE_POOL_PAGES;
	if (!report_after(vballoon_open(&bal, v, 0), "set-up of %02x:%02x.%x: %s", v->pci.bus,
			  v->pci.dev, v->pci.fn, bal.error))
		goto out;
	pool_fill(0, pool_pages);
	for (unsigned i = 0; i < HOSTILE_PFNS; i++) {
		beyond_ram[i] = beyond + i;
		hole[i] = i < HOSTILE_PFNS / 2 ? HOLE_LOW_PFN + i
					       : HOLE_HIGH_PFN + i - HOSTILE_PFNS / 2;
	}
	max_pfn[0] = MAX_PFN;
	/* (d): whole PFNs of pool pages the normal inflate below does not use, 2 stray bytes. */
	for (unsigned i = 0; i < ODD_PFNS; i++)
		odd[i] = page_pfn(pool_pages - 1 - i);
	odd_tail[0] = odd_tail[1] = 0xff;
	if (!hostile_case("beyond-ram", beyond_ram, sizeof(beyond_ram), out, sizeof(out)) ||
	    !hostile_case("pci-hole", hole, sizeof(hole), out, sizeof(out)) ||
	    !hostile_case("pfn-ffffffff", max_pfn, sizeof(max_pfn), out, sizeof(out)) ||
	    !hostile_case("odd-length", odd, ODD_LEN, out, sizeof(out)) ||
	    !hostile_repeat(out, sizeof(out)))
		goto out;
	for (unsigned i = 0; i < HOSTILE_PAGES; i++)
		pfns[i] = page_pfn(i);
	if (!report_after(vballoon_inflate(&bal, pfns, HOSTILE_PAGES, BUFFER_TIMEOUT_MS),
			  "then inflating %u pages: %s", HOSTILE_PAGES, bal.error))
		goto out;
	vballoon_set_actual(&bal, HOSTILE_PAGES);
	if (!report_after(vballoon_deflate(&bal, pfns, HOSTILE_PAGES, BUFFER_TIMEOUT_MS),
			  "then deflating %u pages: %s", HOSTILE_PAGES, bal.error))
		goto out;
	vballoon_set_actual(&bal, 0);
	if (!check_given_back(0, HOSTILE_PAGES, &zero))
		goto out;
	report_details("%s then %u pages zero %lu/%u", out + 1, HOSTILE_PAGES, zero,
		       HOSTILE_PAGES);
out:
	vballoon_stop(&bal);
}
