"""glibc malloc settings for a process that allocates and frees the same large tensors per batch.

glibc serves a request above its mmap threshold (at most 32 MiB with its adaptive default) with a
fresh mmap and returns it to the kernel on free, so every batch pays a page fault per 4 KiB of
every large tensor it writes: a [3136, 32, 100] float32 tensor is 40 MB, some ten thousand
pages. Raising the mmap and trim thresholds keeps freed blocks in the heap, where the next batch
reuses them without faulting them in again.

val.py, predict.py, infer.py and export_model.py do this (utils.cli.run_cli); train.py does not:
there Paddle Inference's allocation pattern grew the heap over the fit's first batches before it
levelled off, so the fit's peak RSS would follow small training sets (the benchmark's RSS check;
logs/benchmark_demo_resnet18_fit_malloc_kept.log is a fit run with the thresholds raised).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20          # requests above this still get their own mmap (a WR50 Gaussian)
TRIM_THRESHOLD = 512 << 20          # free memory at the top of the heap kept for reuse
CAPPED_MMAP_THRESHOLD = 32 << 20   # some glibc versions refuse more (half their heap size)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied = []


def keep_large_buffers(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); True if they were set.

    Does nothing (False) off Linux, on a C library without ``mallopt`` (musl), or when the user
    set glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables.
    """
    if _applied:
        return _applied[0]
    _applied.append(_set_thresholds(mmap_threshold, trim_threshold))
    return _applied[0]


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)):
        mmap_threshold = min(int(mmap_threshold), CAPPED_MMAP_THRESHOLD)
        if not mallopt(M_MMAP_THRESHOLD, mmap_threshold):
            return False
    return bool(mallopt(M_TRIM_THRESHOLD, max(int(trim_threshold), 2 * int(mmap_threshold))))
