"""glibc's malloc told to keep freed memory: CPU training steps at large batches stop faulting pages in."""

import ctypes
import os
import sys


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse; returns whether it did (not on other C libraries, nor over
    the user's own GLIBC_TUNABLES / MALLOC_* settings).

    By default it maps every block over 32 MB fresh and unmaps it on free, so at large batches each CPU training
    step faults in and zeroes gigabytes of new pages: faster steps for a higher peak RSS (bench/RESULTS.md). Called
    once the data is read: its tensors keep their own pages, and the heap does not grow around them.
    """
    if sys.platform != "linux" or any(k == "GLIBC_TUNABLES" or k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    # No mmap'ed blocks, and give the heap's free top back only past 2 GB (mallopt takes a C int).
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
