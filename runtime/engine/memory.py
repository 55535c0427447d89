"""Process memory: the resident set size, and handing freed heap back to the system.

Owned here, below the agent, because the engine releases its load-time temporaries itself and
the agent's model manager releases whole models after unloading them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable

__all__ = ["process_rss_bytes", "release_memory"]


def process_rss_bytes() -> int:
    """The process's resident set size, from ``/proc/self/statm`` (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Hand freed memory back to the system: collect reference cycles, then ask glibc to
    return the free parts of its heaps (blocking; run it off the event loop).

    numpy's big arrays are mmapped and go back on free, but the many mid-sized temporaries of a
    model load or unload stay in glibc's arenas and keep the RSS up without this."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
