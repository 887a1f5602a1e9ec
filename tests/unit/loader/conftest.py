"""Fixtures for the loader tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.arch.x86_64.layout import ram_ranges
from pyvmm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """64 MiB of guest RAM, filled with 0xff so that zero-filling shows."""
    m = GuestMemory(ram_ranges(64 * MiB))
    for r in m.regions:
        r.mapping[:] = b"\xff" * r.size
    yield m
    m.close()
