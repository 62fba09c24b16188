import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message="No ccache found")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def run_script(script, *args, env=None, cwd=None):
    """Run one of the project's scripts as a user would, capturing its output."""
    merged = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(Path(ROOT) / script), *map(str, args)], capture_output=True,
                          text=True, env=merged, cwd=cwd or ROOT, timeout=600)


def run_scripts(calls, at_once: int = 4):
    """``run_script(*call)`` for every call (a tuple: script, args...), several at a time: most
    of a failing run is Python and Paddle starting, which overlaps well. Results in call order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda call: run_script(*call), calls))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The default demo category, generated once for the whole test session."""
    from datasets.demo import generate_demo_category
    root = tmp_path_factory.mktemp("demo_data")
    generate_demo_category(root)
    return root


@pytest.fixture(scope="session")
def trained(demo_root, tmp_path_factory):
    """train.py (with its built-in val) on the demo category with the ImageNet MobileNetV2, once per
    session: (save_path, the CompletedProcess)."""
    out = tmp_path_factory.mktemp("out")
    result = run_script("train.py", "--data_path", demo_root, "--category", "demo", "--backbone", "mobilenet_v2",
                        "--save_path", out, "--save_picture", "False")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
