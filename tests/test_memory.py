"""utils/memory.py: with the thresholds raised, a large buffer freed and allocated again comes back
from the heap without page faults; with glibc's defaults every allocation faults its pages anew.
Each case runs in a fresh interpreter (mallopt changes the whole process)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, resource, sys
import numpy as np
from utils.memory import keep_large_buffers
applied = keep_large_buffers() if sys.argv[1] == "kept" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 64 << 20                       # 64 MiB: above glibc's adaptive mmap threshold (<= 32 MiB)
for _ in range(2):                 # warm-up: the first round may grow the heap
    buffer = np.empty(n, dtype=np.uint8); buffer.fill(1); del buffer
before = faults()
for _ in range(4):
    buffer = np.empty(n, dtype=np.uint8); buffer.fill(1); del buffer
print(json.dumps({"applied": applied, "faults_per_round": (faults() - before) / 4, "pages": n // 4096}))
"""


def probe(mode: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_are_reused_without_page_faults():
    default = probe("default")
    kept = probe("kept")
    assert kept["applied"] is True
    # glibc's default: a fresh mmap per allocation, i.e. about one fault per 4 KiB page
    # (or per 2 MiB with transparent huge pages); kept: the heap's pages are reused
    assert default["faults_per_round"] >= 16
    assert kept["faults_per_round"] <= default["faults_per_round"] / 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_user_malloc_settings_are_left_alone():
    import os

    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="131072")
    assert probe("kept", env)["applied"] is False

