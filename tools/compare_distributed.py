"""Fit and evaluate one category twice with train.py, in one process and under Paddle's launcher
with N processes, and compare what the two wrote: the model arrays, metrics.json, scores.csv,
the thresholds stored in the model, the figures, and the time each took.

    python -m tools.compare_distributed --data_path PATH/MVTec --category bottle --backbone mobilenet_v2 \\
        [--nproc 2] [--out /tmp/compare_distributed]

One process uses every CPU available; under the launcher each rank gets its share of them
(utils/numbers.py's available_cpus). A third run, one process with another --batch_size, is the
yardstick for the model arrays: the sums are float64 (the Gram matrices too, unless they would
outgrow models/padim.py's GRAM_FLOAT64_MAX_BYTES, as WR50-Rd550's do), so another grouping of the
images moves the arrays by float32 rounding, about as little as splitting them over ranks does.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import run_cli
from utils.numbers import available_cpus, max_difference_of_largest

ROOT = Path(__file__).resolve().parent.parent
FIT_LINE = re.compile(r"Train ends, total ([\d.]+)s \(features ([\d.]+)s, Gaussian ([\d.]+)s, (\d+) images\)")
METRICS = ("image_auroc", "pixel_auroc", "pro_auc", "image_threshold", "pixel_threshold", "image_f1", "pixel_f1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="MVTec AD root")
    parser.add_argument("--category", default="bottle", help="one category (default: bottle)")
    parser.add_argument("--backbone", default="mobilenet_v2", help="train.py's --backbone (default: mobilenet_v2)")
    parser.add_argument("--nproc", type=int, default=2, help="processes under the launcher (default: 2)")
    parser.add_argument("--yardstick_batch_size", type=int, default=30,
                        help="--batch_size of the one-process yardstick fit (0: skip it; default: 30)")
    parser.add_argument("--out", default="/tmp/compare_distributed", help="scratch folder, emptied first")
    return parser


def clean_env() -> dict:
    # an inherited PADDLE_* variable (an outer launcher's) would point the runs at that job
    return {key: value for key, value in os.environ.items() if not key.startswith("PADDLE_")}


def timed(command: list, log: Path) -> float:
    tick = time.perf_counter()
    with open(log, "w") as stream:
        result = subprocess.run(command, cwd=ROOT, env=clean_env(), stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - tick
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {result.returncode}; see {log}")
    return seconds


def fit_line(text: str) -> str:
    found = FIT_LINE.findall(text)
    if not found:
        return "no fit line"
    total, features, gaussian, images = found[-1]
    return f"fit {float(total):.1f} s (features {float(features):.1f} s, Gaussian {float(gaussian):.1f} s) for {images} images"


def score_rows(folder: Path) -> list:
    """scores.csv's rows [path, label, image_score] as text."""
    with open(folder / "scores.csv", newline="") as stream:
        return list(csv.reader(stream))[1:]


def main() -> None:
    args = build_parser().parse_args()
    from models.model_file import load_model
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    flags = ["--data_path", args.data_path, "--category", args.category, "--backbone", args.backbone]
    one = [sys.executable, "train.py", *flags, "--save_path", str(out / "one")]
    many = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(args.nproc),
            "--log_dir", str(out / "ranks"), "train.py", *flags, "--save_path", str(out / "many")]
    print(f"# timings are rough: a {available_cpus()}-CPU machine shared with other jobs "
          f"(load average {os.getloadavg()[0]:.2f} at the start)")
    wall_one = timed(one, out / "one.log")
    wall_many = timed(many, out / "many.log")
    category = args.category
    first, second = out / "one" / category, out / "many" / category
    cpus = available_cpus()
    print(f"1 process x {cpus} threads: wall {wall_one:.1f} s; "
          f"{fit_line((first / 'train.log').read_text())}")
    print(f"   {' '.join(one[1:])}")
    print(f"{args.nproc} processes x {max(1, cpus // args.nproc)} thread(s): wall {wall_many:.1f} s "
          f"(launch included)")
    print(f"   python {' '.join(many[1:])}")
    for rank in range(args.nproc):
        log = (out / "ranks" / f"workerlog.{rank}").read_text(errors="replace")
        shard = re.search(r"rank \d+ of \d+: \d+ training images", log)
        added = re.search(r"sums of \d+ processes added in [\d.]+s", log)
        print(f"   {shard.group(0) if shard else f'rank {rank}'}; {fit_line(log)}; {added.group(0) if added else ''}")

    a, b = load_model(first / "best.pdparams"), load_model(second / "best.pdparams")
    print(f"model arrays, largest |difference| / largest |value|, {args.nproc} processes vs 1:")
    print(f"   idx identical: {np.array_equal(a.arrays['idx'], b.arrays['idx'])}; "
          f"n_train {b.meta.n_train} vs {a.meta.n_train}")
    for key in ("mean", "whitening"):
        print(f"   {key:9s} {list(a.arrays[key].shape)}: {max_difference_of_largest(b.arrays[key], a.arrays[key]):.2e}")
    if args.yardstick_batch_size:
        batch = [sys.executable, "train.py", *flags, "--save_path", str(out / "yardstick"), "--val", "False",
                 "--batch_size", str(args.yardstick_batch_size)]
        timed(batch, out / "yardstick.log")
        c = load_model(out / "yardstick" / category / "best.pdparams")
        print(f"   yardstick, 1 process with --batch_size {args.yardstick_batch_size} vs 32: "
              + ", ".join(f"{key} {max_difference_of_largest(c.arrays[key], a.arrays[key]):.2e}"
                          for key in ("mean", "whitening")))

    expected, got = (json.loads((folder / "metrics.json").read_text()) for folder in (first, second))
    print("metrics.json: 1 process | N processes | relative difference")
    for key in METRICS:
        difference = abs(got[key] - expected[key]) / max(abs(expected[key]), 1e-300)
        print(f"   {key:16s} {expected[key]!r:>22} {got[key]!r:>22} {difference:.1e}")
    rows_a, rows_b = score_rows(first), score_rows(second)
    same_images = [row[:2] for row in rows_a] == [row[:2] for row in rows_b]
    scores_a = np.array([float(row[2]) for row in rows_a])
    scores_b = np.array([float(row[2]) for row in rows_b]) if same_images else scores_a
    identical_rows = sum(ra[2] == rb[2] for ra, rb in zip(rows_a, rows_b))
    print(f"scores.csv: {len(rows_b)} vs {len(rows_a)} images, same images in the same order: {same_images}; "
          f"{identical_rows} scores identical to 6 decimals; largest relative difference "
          f"{float(np.max(np.abs(scores_b - scores_a) / np.abs(scores_a))):.1e}")
    stored_a, stored_b = a.meta.calibration.to_dict(), b.meta.calibration.to_dict()
    print("thresholds stored in the model (N processes vs 1): "
          + ", ".join(f"{key} {stored_b[key]!r} vs {stored_a[key]!r}"
                      for key in ("image_threshold", "pixel_threshold", "f1_image_threshold", "f1_pixel_threshold")))
    figures = [len(list(folder.glob(f"{category}_*.png"))) for folder in (first, second)]
    print(f"figures: {figures[1]} vs {figures[0]}; roc_curve.png: {(second / 'roc_curve.png').is_file()}")
    positions, d = a.arrays["mean"].shape
    gram, sums = positions * d * d * 8, 2 * positions * d * 8
    print(f"summed over the ranks per fit (all-reduce): Gram {positions} x {d} x {d} float64 = {gram / 1e6:.0f} MB, "
          f"shift and sums {sums / 1e6:.1f} MB")
    print_costs(args, a, (first / "train.log").read_text())
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


def print_costs(args, model, train_log: str) -> None:
    """The per-image costs a paper estimate for other machines starts from: decoding (host, one
    thread), the backbone (here, on this CPU), and rank 0's finalize for this model's shape."""
    from datasets.mvtec import MVTecDataset
    from models.padim import GaussianFit
    dataset = MVTecDataset(args.data_path, args.category, "train", model.meta.resize, model.meta.crop_size)
    tick = time.perf_counter()
    for index in range(len(dataset)):
        dataset.load(index)
    decode = (time.perf_counter() - tick) / len(dataset)
    positions, d = model.arrays["mean"].shape
    fit = GaussianFit(backend="numpy")
    rng = np.random.default_rng(0)
    for _ in range(2):
        fit.update(rng.standard_normal((positions, 32, d), dtype=np.float32))
    fit.state()   # adds any batches the fit held, so that only the finalize is timed
    tick = time.perf_counter()
    fit.finalize()
    finalize = time.perf_counter() - tick
    found = FIT_LINE.findall(train_log)
    features = float(found[-1][1]) / int(found[-1][3]) if found else float("nan")
    print(f"costs: decode + resize + crop {decode * 1e3:.1f} ms/image on 1 thread; {args.backbone} features "
          f"{features * 1e3:.1f} ms/image (1 process, {available_cpus()} threads); finalize of {positions} x {d} x {d} "
          f"{finalize:.2f} s ({available_cpus()} threads)")


if __name__ == "__main__":
    run_cli(main)
