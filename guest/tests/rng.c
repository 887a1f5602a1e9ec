/* rng: the virtio-rng device, with its queue on MSI-X vector 0 (table entry 0 -> this CPU's
 * local APIC, vector MSI_VECTOR, counted by msi_irq). Two 4096-byte reads, one request each
 * (more if the device returns less): the data is not constant and the two differ; the MSI-X
 * interrupt count goes up. `PROBE rng ok <interrupts> irqs`. */
#include "lib/clock.h"
#include "lib/cpu.h"
#include "lib/probe.h"
#include "lib/virtio.h"
#include "tests/tests.h"

#define RNG_BYTES 4096
#define MAX_REQUESTS 64		/* per 4096 bytes, if the device gives less each time */
#define TIMEOUT_MS 5000
#define IRQ_WAIT_MS 1000

static struct virtq_area area;
static struct virtq vq;
static uint8_t data[2][RNG_BYTES] __attribute__((aligned(4096)));

/* Fill buf completely; false (reported) on a timeout or an impossible length. */
static bool fill(uint8_t *buf, unsigned *requests)
{
	uint32_t have = 0;

	while (have < RNG_BYTES) {
		struct vbuf b = { (uint64_t)buf + have, RNG_BYTES - have, true };
		uint32_t len;

		if (!report(++*requests <= MAX_REQUESTS, "more than %u requests for %u bytes",
			    MAX_REQUESTS, RNG_BYTES))
			return false;
		virtq_add(&vq, &b, 1, buf);
		virtq_kick(&vq);
		if (!report(virtq_wait(&vq, NULL, &len, TIMEOUT_MS),
			    "no completion within %u ms (after %u bytes)", TIMEOUT_MS, have))
			return false;
		if (!report(len > 0 && len <= RNG_BYTES - have,
			    "used length %u for a %u-byte buffer", len, RNG_BYTES - have))
			return false;
		have += len;
	}
	return true;
}

static bool constant(const uint8_t *buf)
{
	for (unsigned i = 1; i < RNG_BYTES; i++)
		if (buf[i] != buf[0])
			return false;
	return true;
}

void test_rng(void)
{
	struct virtio_dev *v = virtio_find(VIRTIO_ID_RNG, 0);
	unsigned requests = 0;
	uint32_t before;
	uint64_t deadline;

	if (!report(v, "no virtio-rng device"))
		return;
	if (!report_after(virtio_begin(v) && virtio_negotiate(v, VIRTIO_BIT(VIRTIO_F_VERSION_1)),
			  "set-up: %s", v->error))
		goto out;
	if (!report_after(virtio_msix_enable(v, 0, MSI_VECTOR), "MSI-X: %s", v->error))
		goto out;
	*(volatile uint16_t *)(v->common + VIRTIO_COMMON_MSIX) = VIRTIO_MSI_NO_VECTOR;
	if (!report_after(virtq_setup(&vq, v, 0, &area, VIRTQ_MAX_SIZE, 0), "queue 0: %s", v->error))
		goto out;
	virtio_driver_ok(v);

	before = READ_ONCE(msi_count);
	if (!fill(data[0], &requests) || !fill(data[1], &requests))
		goto out;
	deadline = deadline_ms(IRQ_WAIT_MS);
	while (READ_ONCE(msi_count) == before && !expired(deadline))
		cpu_relax();
	report(!constant(data[0]) && !constant(data[1]), "the data is constant (0x%02x/0x%02x)",
	       data[0][0], data[1][0]);
	report(memcmp(data[0], data[1], RNG_BYTES), "the two reads returned the same bytes");
	report(READ_ONCE(msi_count) != before,
	       "no MSI-X interrupt (vector 0x%x) within %u ms of %u completed requests",
	       MSI_VECTOR, IRQ_WAIT_MS, requests);
	report_details("%u irqs", READ_ONCE(msi_count) - before);
out:
	virtio_reset(v);
	virtio_msix_disable(v);
}
