"""Small numeric and machine helpers used by the library, the scripts and the tools."""
from __future__ import annotations

import os

import numpy as np


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def max_relative_difference(actual, expected) -> float:
    """max |actual - expected| / |expected| elementwise (anomaly maps are positive distances)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} differs from {expected.shape}")
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-12)))
