"""Small numeric and machine helpers used by the library, the scripts and the tools."""
from __future__ import annotations

import os

import numpy as np


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), shared out among
    the processes that paddle.distributed.launch started on this machine (PADDLE_LOCAL_SIZE),
    so that ranks side by side do not oversubscribe the cores."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    try:
        processes = int(os.environ.get("PADDLE_LOCAL_SIZE", "") or 1)
    except ValueError:
        processes = 1
    return max(1, cpus // max(1, processes))


def max_relative_difference(actual, expected) -> float:
    """max |actual - expected| / |expected| elementwise (anomaly maps are positive distances)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} differs from {expected.shape}")
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-12)))


def max_difference_of_largest(actual, expected) -> float:
    """max |actual - expected| / max |expected|: a difference relative to the array's scale, for
    arrays with entries near zero (a whitening matrix) where an elementwise ratio means nothing."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} differs from {expected.shape}")
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-300))
