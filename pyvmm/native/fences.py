"""Memory ordering between pyvmm and the guest's drivers: the one place fences are made.

Virtqueues live in guest RAM that a driver on another CPU reads and writes at the same time
(virtio 1.2, 2.7). x86-64 keeps loads and stores in order except a store followed by a load;
aarch64 may reorder all four ways. The queue code says which orderings the spec needs:

- `acquire()`: loads before it are done before any load or store after it. After reading an
  index the other side publishes, before reading what that index publishes.
- `release()`: loads and stores before it are done before any store after it. After writing
  what an index publishes, before publishing the index.
- `full()`: both, and stores before it are visible before loads after it. Between publishing
  something and reading the other side's request about it (notification suppression).

They are C11 fences in a compiled helper (fences.c, built by `python -m pyvmm.native`), called
through cffi's ABI mode. Importing this module opens the helper for this machine: a missing or
out-of-date one is a `HelperError` saying how to build it, never a weaker fallback.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.cdecl import declare
from pyvmm.native.helpers import Helper

CDEF = """
void pyvmm_fence_acquire(void);
void pyvmm_fence_release(void);
void pyvmm_fence_full(void);
"""

_lib = Helper("fences").open(declare("fences", CDEF))

acquire: Callable[[], None] = _lib.pyvmm_fence_acquire
release: Callable[[], None] = _lib.pyvmm_fence_release
full: Callable[[], None] = _lib.pyvmm_fence_full
