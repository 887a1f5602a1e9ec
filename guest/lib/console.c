/* Serial console output. Every port access from CPL3 is a VM exit (~66 us on PVM), so this
 * polls LSR once per byte (bounded) and callers keep their lines short. */
#include "lib/console.h"
#include "lib/io.h"
#include "lib/util.h"

#define UART_THR 0
#define UART_LSR 5
#define UART_LSR_THRE 0x20
#define THRE_POLLS 1000

static void console_putc(char c)
{
	for (int i = 0; i < THRE_POLLS && !(inb(COM1_BASE + UART_LSR) & UART_LSR_THRE); i++)
		cpu_relax();
	outb(COM1_BASE + UART_THR, (uint8_t)c);
}

void console_write(const char *s)
{
	while (*s)
		console_putc(*s++);
}

void console_printf(const char *fmt, ...)
{
	static char line[2304];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	console_write(line);
}
