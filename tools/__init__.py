"""Developer tools run from the repository root, e.g. ``python tools/benchmark.py``."""
