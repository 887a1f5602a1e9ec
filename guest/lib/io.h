/* Port I/O and other one-instruction CPU helpers, usable at CPL0 and CPL3. */
#ifndef PROBE_IO_H
#define PROBE_IO_H

#include <stdint.h>

static inline void outb(uint16_t port, uint8_t value)
{
	asm volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t value;

	asm volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	asm volatile("pause" : : : "memory");
}

#define barrier() asm volatile("" : : : "memory")

/* Reads and writes the compiler may not drop or merge (memory tests, MP table, tick counter). */
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

#endif
