"""Smoke tests of tools/benchmark.py: its reference loop, FLOP counter and a tiny end-to-end run.
No timing is asserted: the numbers depend on the machine."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def correlated(n, d, positions, seed):
    """[P, N, d] float32 embeddings."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(positions, d, d)) / np.sqrt(d)
    base = rng.normal(size=(positions, n, d))
    features = np.einsum("pnk,pdk->pnd", base, mixing) + 0.5 * rng.normal(size=(positions, n, d)) + 3.0
    return features.astype(np.float32)


def test_per_patch_loop_equals_vectorised_fit_and_scoring():
    from tools.benchmark import loop_fit, loop_score, tensor_batches, vectorised_fit, vectorised_score

    train, test = correlated(40, 8, 12, seed=0), correlated(5, 8, 12, seed=1)
    positions = np.arange(12)
    loop_mean, cov = loop_fit(train.transpose(1, 2, 0), positions)        # the original's [N, d, P]
    reference = loop_score(test.transpose(1, 2, 0), loop_mean, cov, positions)
    mean, whitening = vectorised_fit(train, batch_size=16)
    distances = vectorised_score(tensor_batches(test, batch_size=4), mean, whitening)
    assert distances.shape == reference.shape == (5, 12)
    np.testing.assert_allclose(distances, reference, rtol=1e-4)
    np.testing.assert_allclose(mean.T, loop_mean, rtol=1e-5)


def test_compare_gaussian_extrapolates_a_subset_of_positions():
    from tools.benchmark import compare_gaussian

    train, test = correlated(20, 6, 30, seed=2), correlated(4, 6, 30, seed=3)
    result = compare_gaussian(train, test, loop_positions=7, batch_size=8)
    assert result["loop_positions_measured"] == 7 and result["positions"] == 30 and result["extrapolated"]
    assert result["max_relative_difference"] < 1e-4
    assert result["speedup"] > 0 and result["loop_seconds"] >= result["loop_measured_seconds"] * 0.99
    full = compare_gaussian(train, test, loop_positions=100, batch_size=8)
    assert full["loop_positions_measured"] == 30 and not full["extrapolated"]


def test_flop_counter_counts_conv_grouped_conv_and_linear():
    import paddle.nn as nn
    from tools.benchmark import count_backbone_flops, head_flops

    class Tiny(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(3, 8, 3, stride=2, padding=1)        # -> [8, 8, 8]
            self.depthwise = nn.Conv2D(8, 8, 3, padding=1, groups=8)   # -> [8, 8, 8]
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = self.depthwise(self.conv(x))
            return self.fc(y.transpose([0, 2, 3, 1]))

    counted = count_backbone_flops(Tiny(), (16, 16))
    assert counted["by_kind"]["conv"] == 2 * 8 * 8 * 8 * 3 * 3 * 3
    assert counted["by_kind"]["grouped_conv"] == 2 * 8 * 8 * 8 * 1 * 3 * 3
    assert counted["by_kind"]["linear"] == 2 * 8 * 8 * 8 * 5
    assert counted["flops"] == sum(counted["by_kind"].values())
    head = head_flops(100, (56, 56), (224, 224))
    assert head["mahalanobis"] == 3136 * 100 * 100 * 2
    assert head["smoothing"] == 2 * (224 * 56 * 56 + 224 * 56 * 224)


def test_resnet18_flops_match_the_layer_shapes():
    from models.backbones import build_backbone
    from tools.benchmark import count_backbone_flops

    macs = (112 * 112 * 64 * 3 * 49                                   # conv1
            + 4 * 56 * 56 * 64 * 64 * 9                               # layer1
            + 28 * 28 * 128 * 64 * 9 + 3 * 28 * 28 * 128 * 128 * 9 + 28 * 28 * 128 * 64      # layer2
            + 14 * 14 * 256 * 128 * 9 + 3 * 14 * 14 * 256 * 256 * 9 + 14 * 14 * 256 * 128)  # layer3
    assert count_backbone_flops(build_backbone("resnet18", "random"), (224, 224))["flops"] == 2 * macs


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from datasets.demo import generate_demo_category
    root = tmp_path_factory.mktemp("bench_demo")
    generate_demo_category(root)
    return root


def test_quick_run_prints_the_table_and_writes_json(demo_root, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "tools.benchmark", "--quick", "--data_path", str(demo_root),
               "--category", "demo", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for text in ("| section", "fit time / extracting the features alone", "per-patch loop", "GEMM-bound limit",
                 "infer.py", "predict.py", "machine:"):
        assert text in done.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) >= {"fit", "extract", "rss", "flops", "gemm", "limit", "gaussian", "eager", "static"}
    assert report["machine"]["cpus_available"] >= 1 and report["machine"]["paddle"]
    assert report["results"]["static"]["onednn_enabled"] is True
    assert report["results"]["rss"]["large"]["n_images"] == 2 * report["results"]["rss"]["small"]["n_images"]
    assert {row["status"] for row in report["table"]} <= {"", "PASS", "FAIL"}
    assert any(row["status"] for row in report["table"])
