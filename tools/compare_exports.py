"""A/B two exported graphs on the same machine, at the same time: static throughput of each,
measured in alternation (so that a slower spell of a shared machine hits both), and the largest
difference between their anomaly maps.

    python -m tools.compare_exports --a OLD_EXPORT_DIR --b NEW_EXPORT_DIR [--batch_size 32] [--rounds 8]

Each folder is what export_model.py writes (model.json + model.pdiparams). Typical use: export
one model file with two commits of this repository (e.g. a `git worktree` of the older one) and
compare; the input is random (speed does not depend on the pixels).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


import numpy as np  # noqa: E402

import utils  # noqa: E402,F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="first export folder (model.json + model.pdiparams)")
    parser.add_argument("--b", required=True, help="second export folder")
    parser.add_argument("--batch_size", type=int, default=32, help="images per run (default: 32)")
    parser.add_argument("--rounds", type=int, default=8, help="timed runs of each graph, alternating (default: 8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--enable_mkldnn", type=int, choices=(0, 1), default=1, help="oneDNN on (1, default) or off")
    return parser


def load(folder: str, args):
    from models.deploy import GRAPH_NAME, PIR_SUFFIX, InferenceSettings, PaddleInferenceModel, load_metadata

    graph = Path(folder) / (GRAPH_NAME + PIR_SUFFIX)
    settings = InferenceSettings(enable_mkldnn=bool(args.enable_mkldnn), cpu_threads=args.threads,
                                 batch_size=args.batch_size)
    return PaddleInferenceModel(graph, settings=settings, meta=load_metadata(graph)), load_metadata(graph)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    (model_a, meta), (model_b, _) = load(args.a, args), load(args.b, args)
    height, width = meta["crop_size"]
    images = np.random.default_rng(0).normal(size=(args.batch_size, 3, height, width)).astype(np.float32)
    models = {"a": model_a, "b": model_b}
    maps = {name: model(images)[0] for name, model in models.items()}   # warm-up, and the outputs
    for model in models.values():
        model(images)
    rates = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            tick = time.perf_counter()
            model(images)
            rates[name].append(args.batch_size / (time.perf_counter() - tick))
    for name, folder in (("a", args.a), ("b", args.b)):
        print(f"{name}: {folder}: median {np.median(rates[name]):.1f} img/s, best {max(rates[name]):.1f} img/s "
              f"(batch {args.batch_size}, {args.rounds} runs)")
    print(f"b / a, medians: {np.median(rates['b']) / np.median(rates['a']):.3f}")
    difference = np.abs(maps["a"] - maps["b"]).max() / max(float(np.abs(maps["a"]).max()), 1e-12)
    print(f"anomaly maps, max difference relative to the largest value: {difference:.2e}")
    return 0


if __name__ == "__main__":
    run_cli(main)
