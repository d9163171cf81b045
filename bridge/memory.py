"""Hand freed heap memory back to the system, so a node's resident set follows what it holds.

A node's threads (the gateway's worker pool, the sender, the dispatcher) each allocate 64 KiB
bodies, frames and their copies, a batch at a time. glibc gives each thread an arena of its own
and keeps what is freed there for later use by that arena, and below the mmap threshold (128 KiB
and up) it returns memory to the system only from the top of a heap. So after a few batches a
node's RSS was the sum of several threads' busiest moments, not the busiest moment itself.
``malloc_trim(0)`` releases the free pages of every arena (glibc >= 2.8 also inside heaps, with
``MADV_DONTNEED``); the node runs it every :data:`TRIM_EVERY_S` (measured: bench/README.md,
"Peak RSS"). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

#: how often a node trims its heap, seconds (a trim with nothing to release takes a few µs)
TRIM_EVERY_S = 0.2


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_trim = _malloc_trim()


def trim_heap() -> bool:
    """Release the heap's free pages to the system; True if any were released."""
    return bool(_trim(0)) if _trim is not None else False
