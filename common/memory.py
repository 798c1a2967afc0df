"""Keeping a long-running process's resident memory flat (glibc malloc).

Two glibc habits make a coordinator's RSS creep over rounds although nothing is retained:

- The mmap threshold is dynamic. A freed mmapped block (say a 19.6 MB upload) raises the
  threshold to its size, so the next blocks of that size come from a heap arena instead, and
  a heap only shrinks from its top: pages stay resident behind any live allocation above them.
- Every thread that allocates gets an arena of its own (up to 8 per core); worker threads
  (asyncio.to_thread, gRPC's pollers) each keep their freed pages.

`tune_allocator()` fixes the threshold (large blocks are always mmapped, hence returned to
the system when freed) and caps the arenas; `release_memory()` trims what the heaps hold.
Both are no-ops where the C library is not glibc. See docs/SCALING.md for the measurements."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@functools.cache
def _libc() -> Any:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt  # noqa: B018 (glibc only)
        lib.malloc_trim  # noqa: B018
        return lib
    except (OSError, AttributeError):
        return None


def tune_allocator(mmap_threshold: int = 4 << 20, arenas: int = 2, trim_threshold: int = 8 << 20) -> bool:
    """Blocks of `mmap_threshold` bytes or more always mmapped (and unmapped when freed), at
    most `arenas` malloc arenas, heap tops above `trim_threshold` given back. Call early, before
    worker threads start. Returns False where glibc's mallopt is not available.

    4 MiB, not 1 MiB: gRPC's 1 MiB transfer messages (and the buffers they are copied into)
    then come from the heap and are reused, instead of being mapped, page-faulted in and
    unmapped once per chunk; adapter-sized blocks are still mapped. Measured side by side
    (benchmarks/README.md): coordinator CPU per round at K = 2 down 12-18%, peak RSS over 100
    rounds no higher."""
    lib = _libc()
    if lib is None:
        return False
    ok = lib.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok &= lib.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    ok &= lib.mallopt(M_ARENA_MAX, int(arenas)) == 1
    return bool(ok)


def release_memory(collect: bool = True) -> None:
    """Hand freed heap memory back to the operating system (every arena)."""
    if collect:
        gc.collect()
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
