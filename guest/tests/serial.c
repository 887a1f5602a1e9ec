/* serial: the 16550 UART at 0x3f8 behaves as Linux's 8250 driver expects: scratch register,
 * divisor latch, IER, idle LSR, FIFO detection through IIR, and loopback mode (data and modem
 * lines). Every register it changes is restored before any check can end the test, so the
 * result line still reaches the host. */
#include "lib/probe.h"
#include "tests/tests.h"

enum uart_reg {
	UART_RBR = 0,	/* read, DLAB=0 */
	UART_THR = 0,	/* write, DLAB=0 */
	UART_DLL = 0,	/* DLAB=1 */
	UART_IER = 1,	/* DLAB=0 */
	UART_DLM = 1,	/* DLAB=1 */
	UART_IIR = 2,	/* read */
	UART_FCR = 2,	/* write */
	UART_LCR = 3,
	UART_MCR = 4,
	UART_LSR = 5,
	UART_MSR = 6,
	UART_SCR = 7,
};

#define LCR_DLAB 0x80
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define FCR_ENABLE_FIFO 0x01
#define FCR_CLEAR_RCVR 0x02
#define FCR_CLEAR_XMIT 0x04
#define IIR_FIFO_ENABLED 0xc0
#define MCR_DTR 0x01
#define MCR_RTS 0x02
#define MCR_OUT1 0x04
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10
#define MSR_CTS 0x10
#define MSR_DSR 0x20
#define MSR_RI 0x40
#define MSR_DCD 0x80
#define POLLS 1000

static uint8_t uart_in(enum uart_reg reg)
{
	return inb(COM1_BASE + reg);
}

static void uart_out(enum uart_reg reg, uint8_t value)
{
	outb(COM1_BASE + reg, value);
}

static void check_scratch(void)
{
	static const uint8_t patterns[] = { 0x00, 0x55, 0xaa, 0xff, 0x5a };

	for (size_t i = 0; i < ARRAY_SIZE(patterns); i++) {
		uint8_t got;

		uart_out(UART_SCR, patterns[i]);
		got = uart_in(UART_SCR);
		report(got == patterns[i], "scratch: wrote 0x%02x, read 0x%02x", patterns[i], got);
	}
}

static void check_divisor(void)
{
	uint8_t lcr = uart_in(UART_LCR) & ~LCR_DLAB;
	uint8_t lcr_dlab, dll, dlm, got_dll[2], got_dlm[2], lcr_after;
	static const uint8_t want_dll[2] = { 0x0c, 0x01 }, want_dlm[2] = { 0x00, 0x02 };

	uart_out(UART_LCR, lcr | LCR_DLAB);
	lcr_dlab = uart_in(UART_LCR);
	dll = uart_in(UART_DLL);
	dlm = uart_in(UART_DLM);
	for (int i = 0; i < 2; i++) {
		uart_out(UART_DLL, want_dll[i]);
		uart_out(UART_DLM, want_dlm[i]);
		got_dll[i] = uart_in(UART_DLL);
		got_dlm[i] = uart_in(UART_DLM);
	}
	uart_out(UART_DLL, dll);
	uart_out(UART_DLM, dlm);
	uart_out(UART_LCR, lcr);
	lcr_after = uart_in(UART_LCR);

	report(lcr_dlab == (lcr | LCR_DLAB), "LCR: wrote 0x%02x, read 0x%02x", lcr | LCR_DLAB,
	       lcr_dlab);
	for (int i = 0; i < 2; i++)
		report(got_dll[i] == want_dll[i] && got_dlm[i] == want_dlm[i],
		       "divisor latch: wrote DLL 0x%02x DLM 0x%02x, read 0x%02x 0x%02x",
		       want_dll[i], want_dlm[i], got_dll[i], got_dlm[i]);
	report(lcr_after == lcr, "LCR after clearing DLAB: expected 0x%02x, read 0x%02x", lcr,
	       lcr_after);
}

static void check_ier(void)
{
	static const uint8_t patterns[] = { 0x05, 0x0a, 0x00 };
	uint8_t ier = uart_in(UART_IER), got[ARRAY_SIZE(patterns)];

	for (size_t i = 0; i < ARRAY_SIZE(patterns); i++) {
		uart_out(UART_IER, patterns[i]);
		got[i] = uart_in(UART_IER);
	}
	uart_out(UART_IER, ier);
	for (size_t i = 0; i < ARRAY_SIZE(patterns); i++)
		report((got[i] & 0x0f) == patterns[i], "IER: wrote 0x%02x, read 0x%02x", patterns[i],
		       got[i]);
}

static void check_idle_lsr(void)
{
	uint8_t lsr = 0;

	for (int i = 0; i < POLLS && (lsr & (LSR_THRE | LSR_TEMT)) != (LSR_THRE | LSR_TEMT); i++)
		lsr = uart_in(UART_LSR);
	report((lsr & (LSR_THRE | LSR_TEMT)) == (LSR_THRE | LSR_TEMT),
	       "idle LSR: expected THRE and TEMT (0x60) set, read 0x%02x", lsr);
}

static void check_loopback(void)
{
	static const struct {
		uint8_t mcr, msr;
	} lines[] = {
		{ MCR_DTR, MSR_DSR },
		{ MCR_RTS, MSR_CTS },
		{ MCR_OUT1, MSR_RI },
		{ MCR_OUT2, MSR_DCD },
		{ MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2, MSR_DSR | MSR_CTS | MSR_RI | MSR_DCD },
		{ 0, 0 },
	};
	uint8_t mcr = uart_in(UART_MCR) & ~MCR_LOOP;
	uint8_t lsr = 0, rbr = 0, lsr_after, msr[ARRAY_SIZE(lines)];

	uart_out(UART_MCR, mcr | MCR_LOOP);
	for (int i = 0; i < 16 && (uart_in(UART_LSR) & LSR_DR); i++)
		uart_in(UART_RBR);	/* drain anything received before */
	uart_out(UART_THR, 0xa5);
	for (int i = 0; i < POLLS && !(lsr & LSR_DR); i++)
		lsr = uart_in(UART_LSR);
	if (lsr & LSR_DR)
		rbr = uart_in(UART_RBR);
	lsr_after = uart_in(UART_LSR);
	for (size_t i = 0; i < ARRAY_SIZE(lines); i++) {
		uart_out(UART_MCR, MCR_LOOP | lines[i].mcr);
		msr[i] = uart_in(UART_MSR);
	}
	uart_out(UART_MCR, mcr);

	report(lsr & LSR_DR, "loopback: LSR data ready never set after writing THR (LSR 0x%02x)",
	       lsr);
	report(rbr == 0xa5, "loopback: wrote 0xa5, RBR read 0x%02x", rbr);
	report(!(lsr_after & LSR_DR), "loopback: LSR DR still set after reading RBR (0x%02x)",
	       lsr_after);
	for (size_t i = 0; i < ARRAY_SIZE(lines); i++)
		report((msr[i] & 0xf0) == lines[i].msr,
		       "loopback: MCR 0x%02x should give MSR 0x%02x in bits 7:4, read 0x%02x",
		       MCR_LOOP | lines[i].mcr, lines[i].msr, msr[i]);
}

static void check_fifo(void)
{
	uint8_t iir;

	uart_out(UART_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT);
	iir = uart_in(UART_IIR);
	uart_out(UART_FCR, 0);
	report((iir & IIR_FIFO_ENABLED) == IIR_FIFO_ENABLED,
	       "FIFO: after FCR=0x07 expected IIR bits 7:6 = 11, IIR is 0x%02x", iir);
}

void test_serial(void)
{
	check_scratch();
	check_divisor();
	check_ier();
	check_idle_lsr();
	check_loopback();
	check_fifo();
}
