"""Process memory housekeeping."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim``; elsewhere nothing).

    Freed blocks in the middle of the heap otherwise stay in the process: the outgrown buffers of
    a FAISS build, a saved index's metadata table.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:  # glibc only
        trim(0)
