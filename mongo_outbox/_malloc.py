"""Keep big event buffers out of the C allocator's arenas (glibc), so freed memory goes back.

glibc serves an allocation above its mmap threshold with mmap and unmaps it on free, but the
first free of such a block raises the threshold to that block's size (up to 32 MiB): from then
on 10 MB event buffers come from per-thread arenas and stay there when freed. A relay group
member, whose partitions publish from several threads, peaked at 4x one relay that way. A fixed
threshold (glibc then stops adjusting it) keeps the peak at what is in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB and more: event payloads and their messages
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process, unless the
    ``MALLOC_MMAP_THRESHOLD_`` environment variable already chose one; True if it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD)))
