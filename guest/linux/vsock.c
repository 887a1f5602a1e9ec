/* vsock: AF_VSOCK streams for the Linux guest's checks (guest/linux/init), which busybox lacks.
 * The kit (pyvmm/harness/kit.py) builds it static and puts it in the initramfs as /bin/vsock.
 *
 *   vsock cid                       this guest's context ID, as the vsock core has it
 *   vsock recv PORT                 take one stream on PORT and read it to its end; send back
 *                                   "BYTES CRC32 SECONDS", print that and USER SYS
 *   vsock send CID PORT BYTES WAIT  connect to CID:PORT (again and again for up to WAIT s while
 *                                   nobody listens), send BYTES of pseudo-random data, end the
 *                                   sending and read the peer's answer to the end; print
 *                                   "BYTES CRC32 SECONDS USER SYS ANSWER"
 *   vsock hold PORT                 take one stream on PORT, echo one line on it, then wait for
 *                                   the stream to end without further data; then take a second
 *                                   stream on the same listener and echo one line on it
 *   vsock hold CID PORT WAIT        the same from the connecting side: send a line, read it
 *                                   back and say so (a second line: the peer may act on the
 *                                   stream once it has it, knowing nothing is still in flight
 *                                   to us), wait for the end; then connect again, the same
 *   vsock accept PORT COUNT         take COUNT streams on PORT one after another, closing each
 *                                   at once; print "COUNT SECONDS" (the first accept to the
 *                                   last close)
 *
 * `hold` prints "listening PORT" (the listening side), "held" once the line came back, "ended
 * HOW after SECONDS s" (HOW: eof, an errno name such as ECONNRESET, or data) and "again" after
 * the second stream's line. SECONDS are wall-clock (CLOCK_MONOTONIC) from the connection to the
 * end, USER and SYS the CPU seconds this program used meanwhile (making and summing the data;
 * the kernel's vsock and virtio code); CRC32 is the common CRC-32 (zlib's, lower-case hex). An
 * error is one line on stderr and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
/* Before linux/vm_sockets.h: newer ones (the arm64 cross headers') take sizeof(struct sockaddr). */
#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
#define MAX_LINE 256
#define HOLD_LINE "pyvmm vsock hold\n"
#define HELD_LINE "pyvmm vsock held\n"
#define MAX_BYTES (1ULL << 40)
#define RETRY_NS 100000000L /* between connection attempts: 0.1 s */

static unsigned char buf[CHUNK];

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("vsock: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static const char *errno_name(int e)
{
	static char other[32];
	switch (e) {
	case ECONNRESET: return "ECONNRESET";
	case ECONNREFUSED: return "ECONNREFUSED";
	case ENOTCONN: return "ENOTCONN";
	case EPIPE: return "EPIPE";
	case ETIMEDOUT: return "ETIMEDOUT";
	case ENODEV: return "ENODEV";
	case EINTR: return "EINTR";
	}
	snprintf(other, sizeof(other), "errno %d", e);
	return other;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The CPU time this program has used: in user mode (making and summing data) and in the
 * kernel (its vsock and virtio code). */
struct cpu {
	double user, sys;
};

static struct cpu cpu(void)
{
	struct rusage u;
	getrusage(RUSAGE_SELF, &u);
	return (struct cpu){ u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6,
			     u.ru_stime.tv_sec + u.ru_stime.tv_usec / 1e6 };
}

/* "USER SYS": the CPU seconds used since `start`. */
static const char *cpu_since(struct cpu start)
{
	static char text[64];
	struct cpu end = cpu();
	snprintf(text, sizeof(text), "%.3f %.3f", end.user - start.user, end.sys - start.sys);
	return text;
}

/* A decimal argument no greater than `max`. */
static unsigned long long number(const char *s, const char *what, unsigned long long max)
{
	char *end;
	errno = 0;
	unsigned long long n = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-' || n > max)
		die("%s: '%s' is not a number from 0 to %llu", what, s, max);
	return n;
}

static unsigned u32(const char *s, const char *what)
{
	return number(s, what, UINT32_MAX);
}

/* ---- CRC-32 (reflected polynomial 0xedb88320, as zlib.crc32) ----
 * Eight bytes a step ("slicing-by-8"): crc_table[k][b] is the CRC of byte b followed by k zero
 * bytes, so the eight lookups of a step are independent: three to four times as fast as a byte
 * at a time, which keeps the checksum a small part of the guest's time. */

static uint32_t crc_table[8][256];

static void crc_init(void)
{
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[0][n] = c;
	}
	for (int k = 1; k < 8; k++)
		for (int n = 0; n < 256; n++)
			crc_table[k][n] = crc_table[0][crc_table[k - 1][n] & 0xff] ^
					  (crc_table[k - 1][n] >> 8);
}

/* crc is the value so far (0 at the start), as zlib.crc32(data, crc) takes it. x86 is
 * little-endian: the first byte is the low byte of `lo`. */
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n)
{
	uint32_t (*t)[256] = crc_table;
	crc = ~crc;
	for (; n >= 8; p += 8, n -= 8) {
		uint32_t lo, hi;
		memcpy(&lo, p, 4);
		memcpy(&hi, p + 4, 4);
		lo ^= crc;
		crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^
		      t[4][lo >> 24] ^ t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^
		      t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
	}
	while (n--)
		crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* ---- sockets ---- */

static int vsock_socket(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket(AF_VSOCK): %s", strerror(errno));
	return fd;
}

static int listen_on(unsigned port)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port,
	};
	int fd = vsock_socket();
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind to port %u: %s", port, strerror(errno));
	if (listen(fd, 4) < 0)
		die("listen on port %u: %s", port, strerror(errno));
	return fd;
}

static int accept_one(int listener, unsigned port)
{
	int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		die("accept on port %u: %s", port, strerror(errno));
	return fd;
}

/* Connect to cid:port; while the peer answers with a reset (nobody listens yet) or does not
 * answer, try again until `wait` seconds have passed. */
static int connect_to(unsigned cid, unsigned port, unsigned wait)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	struct timespec pause = { 0, RETRY_NS };
	double deadline = now() + wait;
	for (;;) {
		int fd = vsock_socket();
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			return fd;
		int e = errno;
		close(fd);
		if ((e != ECONNRESET && e != ECONNREFUSED && e != ETIMEDOUT) || now() >= deadline)
			die("connect to %u:%u: %s", cid, port, strerror(e));
		nanosleep(&pause, NULL);
	}
}

static void write_all(int fd, const void *data, size_t n, const char *what)
{
	const unsigned char *p = data;
	while (n) {
		ssize_t done = write(fd, p, n);
		if (done < 0 && errno == EINTR)
			continue;
		if (done < 0)
			die("%s: write: %s", what, strerror(errno));
		p += done;
		n -= done;
	}
}

/* One line (at most MAX_LINE - 1 bytes, its newline kept) read a byte at a time, so that
 * nothing after it is taken from the stream. */
static void read_line(int fd, char *line, const char *what)
{
	size_t n = 0;
	while (n < MAX_LINE - 1) {
		ssize_t got = read(fd, line + n, 1);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			die("%s: read: %s", what, strerror(errno));
		if (got == 0)
			die("%s: the stream ended after %zu bytes of a line", what, n);
		if (line[n++] == '\n')
			break;
	}
	line[n] = '\0';
}

/* ---- the commands ---- */

static int cmd_cid(void)
{
	unsigned cid;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("/dev/vsock: %s", strerror(errno));
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		die("IOCTL_VM_SOCKETS_GET_LOCAL_CID: %s", strerror(errno));
	printf("%u\n", cid);
	return 0;
}

static int cmd_recv(unsigned port)
{
	int listener = listen_on(port);
	printf("listening %u\n", port);
	fflush(stdout);
	int fd = accept_one(listener, port);
	close(listener);
	double start = now();
	struct cpu start_cpu = cpu();
	unsigned long long bytes = 0;
	uint32_t crc = 0;
	for (;;) {
		ssize_t got = read(fd, buf, sizeof(buf));
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			die("receiving on port %u after %llu bytes: %s", port, bytes, strerror(errno));
		if (got == 0)
			break;
		crc = crc_update(crc, buf, got);
		bytes += got;
	}
	char line[MAX_LINE];
	snprintf(line, sizeof(line), "%llu %08x %.3f", bytes, crc, now() - start);
	printf("%s %s\n", line, cpu_since(start_cpu));
	strcat(line, "\n");
	write_all(fd, line, strlen(line), "answering");
	close(fd);
	return 0;
}

static int cmd_send(unsigned cid, unsigned port, unsigned long long bytes, unsigned wait)
{
	int fd = connect_to(cid, port, wait);
	double start = now();
	struct cpu start_cpu = cpu();
	uint64_t x = 0x9e3779b97f4a7c15ull ^ bytes; /* xorshift64 state: never 0 */
	uint32_t crc = 0;
	for (unsigned long long left = bytes; left;) {
		size_t n = left < sizeof(buf) ? left : sizeof(buf);
		for (size_t i = 0; i < n; i += 8) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			memcpy(buf + i, &x, n - i < 8 ? n - i : 8);
		}
		write_all(fd, buf, n, "sending");
		crc = crc_update(crc, buf, n);
		left -= n;
	}
	if (shutdown(fd, SHUT_WR) < 0)
		die("shutdown: %s", strerror(errno));
	char answer[MAX_LINE];
	size_t n = 0;
	for (;;) {
		ssize_t got = read(fd, answer + n, sizeof(answer) - 1 - n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			die("reading the answer: %s", strerror(errno));
		if (got == 0)
			break;
		n += got;
		if (n == sizeof(answer) - 1)
			die("the answer is longer than %zu bytes", n);
	}
	double seconds = now() - start;
	answer[n] = '\0';
	answer[strcspn(answer, "\n")] = '\0';
	close(fd);
	printf("%llu %08x %.3f %s %s\n", bytes, crc, seconds, cpu_since(start_cpu), answer);
	return 0;
}

/* The line exchange: the side that connected sends, the other echoes. */
static void exchange(int fd, int connected)
{
	char line[MAX_LINE];
	if (connected) {
		write_all(fd, HOLD_LINE, strlen(HOLD_LINE), "hold");
		read_line(fd, line, "hold");
		if (strcmp(line, HOLD_LINE))
			die("hold: '%.*s' came back, not the line sent", (int)strcspn(line, "\n"),
			    line);
		write_all(fd, HELD_LINE, strlen(HELD_LINE), "hold");
	} else {
		read_line(fd, line, "hold");
		write_all(fd, line, strlen(line), "hold");
	}
}

/* Until the stream ends; how it ended. The socket's pending error first: a stream that a
 * transport reset ended before we came to wait has it (read would say ENOTCONN instead). */
static const char *wait_for_end(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	while (poll(&p, 1, -1) < 0)
		if (errno != EINTR)
			return errno_name(errno);
	int error = 0;
	socklen_t len = sizeof(error);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0)
		return errno_name(errno);
	if (error)
		return errno_name(error);
	for (;;) {
		ssize_t got = read(fd, buf, 1);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return errno_name(errno);
		return got == 0 ? "eof" : "data";
	}
}

static int cmd_hold(int connected, unsigned cid, unsigned port, unsigned wait)
{
	int listener = -1, fd;
	if (connected) {
		fd = connect_to(cid, port, wait);
	} else {
		listener = listen_on(port);
		printf("listening %u\n", port);
		fflush(stdout);
		fd = accept_one(listener, port);
	}
	exchange(fd, connected);
	printf("held\n");
	fflush(stdout);
	double start = now();
	const char *how = wait_for_end(fd);
	printf("ended %s after %.3f s\n", how, now() - start);
	fflush(stdout);
	close(fd);
	if (!strcmp(how, "data"))
		die("data came where the stream should have ended");
	fd = connected ? connect_to(cid, port, wait) : accept_one(listener, port);
	exchange(fd, connected);
	close(fd);
	printf("again\n");
	return 0;
}

static int cmd_accept(unsigned port, unsigned count)
{
	int listener = listen_on(port);
	printf("listening %u\n", port);
	fflush(stdout);
	double start = 0;
	for (unsigned i = 0; i < count; i++) {
		int fd = accept_one(listener, port);
		if (i == 0)
			start = now();
		close(fd);
	}
	close(listener);
	printf("%u %.3f\n", count, count ? now() - start : 0.0);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";
	crc_init();
	if (!strcmp(cmd, "cid") && argc == 2)
		return cmd_cid();
	if (!strcmp(cmd, "recv") && argc == 3)
		return cmd_recv(u32(argv[2], "PORT"));
	if (!strcmp(cmd, "send") && argc == 6)
		return cmd_send(u32(argv[2], "CID"), u32(argv[3], "PORT"),
				number(argv[4], "BYTES", MAX_BYTES), u32(argv[5], "WAIT"));
	if (!strcmp(cmd, "hold") && argc == 3)
		return cmd_hold(0, 0, u32(argv[2], "PORT"), 0);
	if (!strcmp(cmd, "hold") && argc == 5)
		return cmd_hold(1, u32(argv[2], "CID"), u32(argv[3], "PORT"), u32(argv[4], "WAIT"));
	if (!strcmp(cmd, "accept") && argc == 4)
		return cmd_accept(u32(argv[2], "PORT"), u32(argv[3], "COUNT"));
	fputs("usage: vsock cid | recv PORT | send CID PORT BYTES WAIT | hold PORT | "
	      "hold CID PORT WAIT | accept PORT COUNT\n", stderr);
	return 2;
}
