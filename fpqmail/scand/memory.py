"""Giving memory back after big messages.

glibc's malloc serves a large allocation with mmap (returned to the system at free)
only until the first such block is freed; from then on it raises its threshold and
serves blocks of that size from the arenas of the worker threads, which keep freed
memory. A daemon that decoded a few big messages in 8 threads then stayed ~15 MB
above its baseline. Fixing the threshold (mallopt M_MMAP_THRESHOLD) keeps every
allocation of 128 KiB or more out of the arenas: the daemon returns to its baseline.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


def give_back_big_blocks():
    """Make glibc map every allocation of THRESHOLD bytes or more; False where that
    is not possible (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
