/* Output on the first 16550 UART (COM1, port 0x3f8): the probe's only channel to the host. */
#ifndef PROBE_CONSOLE_H
#define PROBE_CONSOLE_H

#define COM1_BASE 0x3f8

void console_write(const char *s);
void console_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
