"""anomalib's PaDiM (PyTorch, CPU) on the same images with the same preprocessing, measured the
way tools/benchmark.py measures ours, for a side-by-side table.

It needs a Python with torch and anomalib, which this project does not install:

    python -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install torch torchvision anomalib==2.7.0   # CPU wheels
    /tmp/anomalib-venv/bin/python -m tools.compare_anomalib --data_path ../shared/data/mvtec \\
        --category bottle --json logs/anomalib_bottle_resnet18.json

Measured (ResNet18 layer1-3, d=100, 224, random weights as in the benchmark: no download):
  fit        decode + feature extraction + anomalib's Gaussian fit (memory bank of all
             embeddings, per-position covariance loop, batched inverse), images/s, peak RSS,
             and peak RSS with --rss_scale times more images (fresh processes);
  gaussian   the Gaussian fit alone and its scoring (anomalib's compute_distance) on the test
             embeddings;
  eager      PadimModel in eval mode: latency at batch 1 and throughput at batch 32, preprocessing
             excluded, on the test images.
Images are read and preprocessed by this project's datasets.mvtec (no Paddle needed), so both
implementations see identical arrays.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from datasets.mvtec import MVTecDataset, iterate_batches  # noqa: E402

BATCH = 32
RESULT_TAG = "ANOMALIB_RESULT "


def import_anomalib():
    """PadimModel. A torchvision wheel built for CUDA beside a CPU-only torch cannot load its C
    ops, and its fake-kernel registrations then fail on import; PaDiM needs none of those ops,
    so they are skipped in that case only."""
    import torch
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401,F811
    from anomalib.models.image.padim.torch_model import PadimModel
    return torch, PadimModel


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(torch, PadimModel, seed: int = 0):
    torch.manual_seed(seed)
    return PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100)


def train_and_test_sets(args):
    train = MVTecDataset(args.data_path, args.category, "train", 256, 224)
    test = MVTecDataset(args.data_path, args.category, "test", 256, 224)
    return train, test


def fit_worker(args, repeat: int) -> dict:
    """anomalib's training loop for PaDiM on the CPU: forward in train mode (fills the memory
    bank), then fit(); timed with decoding, as train.py is."""
    torch, PadimModel = import_anomalib()
    torch.set_num_threads(args.threads)
    train, _ = train_and_test_sets(args)
    train.samples = train.samples * repeat
    rss_after_import = peak_rss_bytes()
    tick = time.perf_counter()
    model = build_model(torch, PadimModel)
    model.train()
    extraction = 0.0
    with torch.no_grad():
        for batch in iterate_batches(train, BATCH, args.num_workers):
            start = time.perf_counter()
            model(torch.from_numpy(batch.images))
            extraction += time.perf_counter() - start
    start = time.perf_counter()
    model.fit()
    gaussian = time.perf_counter() - start
    return {"n_images": len(train), "seconds": time.perf_counter() - tick, "extraction_seconds": extraction,
            "gaussian_seconds": gaussian, "peak_rss": peak_rss_bytes(), "rss_after_import": rss_after_import}


def spawn(args, repeat: int) -> dict:
    command = [sys.executable, "-m", "tools.compare_anomalib", "--worker", str(repeat), "--data_path", args.data_path,
               "--category", args.category, "--threads", str(args.threads), "--num_workers", str(args.num_workers)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def measure_in_process(args) -> dict:
    torch, PadimModel = import_anomalib()
    torch.set_num_threads(args.threads)
    train, test = train_and_test_sets(args)
    model = build_model(torch, PadimModel)
    model.train()
    with torch.no_grad():
        for batch in iterate_batches(train, BATCH, args.num_workers):
            model(torch.from_numpy(batch.images))
        train_embeddings = torch.vstack(model.memory_bank)
        model.fit()
        model.eval()
        test_images = np.concatenate([b.images for b in iterate_batches(test, BATCH, args.num_workers)])
        test_embeddings = torch.vstack([model.generate_embedding(model.feature_extractor(torch.from_numpy(
            test_images[s:s + BATCH]))) for s in range(0, len(test_images), BATCH)])

        # the Gaussian stage alone: fit on the train embeddings, distances of the test embeddings
        tick = time.perf_counter()
        model.gaussian.fit(train_embeddings)
        gaussian_fit = time.perf_counter() - tick
        stats = [model.gaussian.mean, model.gaussian.inv_covariance]
        generator = model.anomaly_map_generator
        tick = time.perf_counter()
        for s in range(0, len(test_embeddings), BATCH):
            generator.compute_distance(test_embeddings[s:s + BATCH], stats)
        gaussian_score = time.perf_counter() - tick

        # eager scoring, preprocessing excluded
        one = torch.from_numpy(test_images[:1])
        for _ in range(3):
            model(one)
        latencies = []
        for _ in range(10):
            tick = time.perf_counter()
            model(one)
            latencies.append(time.perf_counter() - tick)
        batch = torch.from_numpy(np.stack([test_images[i % len(test_images)] for i in range(BATCH)]))
        model(batch)
        rates = []
        for _ in range(args.throughput_batches):
            tick = time.perf_counter()
            model(batch)
            rates.append(BATCH / (time.perf_counter() - tick))
    return {"n_train": len(train), "n_test": len(test),
            "gaussian_fit_seconds": gaussian_fit, "gaussian_score_seconds": gaussian_score,
            "gaussian_seconds": gaussian_fit + gaussian_score,
            "eager_latency_b1_ms": 1e3 * float(np.median(latencies)),
            "eager_throughput_b32": float(np.median(rates))}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="MVTec AD root (the folder holding the category)")
    parser.add_argument("--category", default="bottle", help="category folder (default: bottle)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch CPU threads (default: all available CPUs)")
    parser.add_argument("--num_workers", type=int, default=2, help="decode threads, as in our benchmark (default: 2)")
    parser.add_argument("--rss_scale", type=int, default=4,
                        help="peak RSS is also measured with the training set repeated this many times (default: 4)")
    parser.add_argument("--throughput_batches", type=int, default=3, help="timed batches of 32 (default: 3)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(fit_worker(args, args.worker)), flush=True)
        return {}
    torch, _ = import_anomalib()
    import anomalib
    started = time.perf_counter()
    print(f"anomalib {anomalib.__version__} PaDiM, torch {torch.__version__}, {args.threads} threads; "
          f"{args.category} under {args.data_path}", flush=True)
    print("fit in a fresh process ...", flush=True)
    fit = spawn(args, 1)
    print(f"fit with {args.rss_scale}x the images in a fresh process ...", flush=True)
    large = spawn(args, args.rss_scale)
    print("Gaussian stage and eager scoring ...", flush=True)
    measured = measure_in_process(args)
    result = {"anomalib": anomalib.__version__, "torch": torch.__version__, "threads": args.threads,
              "fit": fit, "fit_large": large, **measured}
    gib = 2 ** 30
    rows = [
        ("fit (decode included)", f"{fit['n_images'] / fit['seconds']:.1f} img/s ({fit['seconds']:.1f} s)"),
        ("Gaussian stage within the fit", f"{fit['gaussian_seconds']:.2f} s"),
        ("fit time / extraction", f"{fit['seconds'] / fit['extraction_seconds']:.2f}x"),
        ("fit peak RSS", f"{fit['peak_rss'] / gib:.2f} GiB"),
        (f"peak RSS, {large['n_images']} vs {fit['n_images']} images",
         f"{large['peak_rss'] / fit['peak_rss']:.2f}x ({large['peak_rss'] / gib:.2f} vs {fit['peak_rss'] / gib:.2f} GiB)"),
        (f"Gaussian fit + scoring, {measured['n_train']} train / {measured['n_test']} test",
         f"{measured['gaussian_seconds']:.2f} s (fit {measured['gaussian_fit_seconds']:.2f} s, "
         f"scoring {measured['gaussian_score_seconds'] * 1e3:.1f} ms)"),
        ("eager latency, batch 1, preprocessing excluded", f"{measured['eager_latency_b1_ms']:.1f} ms"),
        ("eager throughput, batch 32, preprocessing excluded", f"{measured['eager_throughput_b32']:.1f} img/s"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(f"took {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return result


if __name__ == "__main__":
    main()
