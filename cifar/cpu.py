"""The host CPU: whether it has bf16 instructions, and glibc's malloc told to keep freed memory for training."""

import ctypes
import functools
import os
import sys
from pathlib import Path


@functools.cache
def has_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (x86 AVX512-BF16 or AMX, Arm BF16), by Linux's /proc/cpuinfo; None
    where it cannot tell. Without them bf16 is emulated: on an AVX2 AMD EPYC, a fast.yaml step 16x slower than
    32-bit, bf16 matmuls 37x (bench/RESULTS.md)."""
    try:
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(Path("/proc/cpuinfo").read_text().split()))
    except OSError:
        return None


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
