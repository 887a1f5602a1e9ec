"""ioctl request numbers, built as <asm-generic/ioctl.h> builds them (x86_64 and aarch64 share
that encoding): direction, size, type and number in one word."""

from __future__ import annotations

IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def ioc(direction: int, ioc_type: int, nr: int, size: int = 0) -> int:
    """The kernel's _IOC(direction, type, nr, size)."""
    return (direction << 30) | (size << 16) | (ioc_type << 8) | nr
