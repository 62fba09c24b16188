#!/usr/bin/env python
"""Benchmark PaDiM-Paddle on one category and check its speed and memory targets.

Measures, on this machine, in one run:
  fit       train.py's fit (decode included) in a fresh process: images/s, the Gaussian stage,
            the ratio to extracting the features alone, CPU use, and peak RSS with n and k*n
            training images (the same images repeated);
  gaussian  the streaming Gaussian fit (models.padim.GaussianFit) + the model's batched scoring
            (models.padim.mahalanobis) against the original's per-patch loop (np.cov + eps*I per
            position; np.linalg.inv and scipy's mahalanobis per patch) on the same embeddings:
            speed ratio and max relative difference of the distances;
  eager     predict.py's path (dynamic graph): latency at batch 1, throughput at batch 32;
  static    infer.py's path (exported graph, Paddle Inference, oneDNN on): the same, with the
            preprocessing (decode, resize, crop, normalise) excluded and included;
  limit     the backbone's FLOPs per image (conv/linear MACs x 2 counted with forward hooks) and
            the PaDiM head's, over the best float32 GEMM rate measured here (NumPy, Paddle and
            onnxruntime matmul, all cores), and each path's images/s as a fraction of it.
Prints one table (measurement, target, PASS/FAIL) and writes everything to a JSON file.

    python -m tools.benchmark                                       # demo category, resnet18
    python -m tools.benchmark --data_path /work/shared/data/mvtec --category bottle --json bottle.json
    python -m tools.benchmark --backbone mobilenet_v2
    python -m tools.benchmark --quick                               # tiny smoke run, < 1 minute

Backbone weights default to 'random': speed does not depend on the weights, and no ResNet
ImageNet weights exist on the offline machines.
"""
from __future__ import annotations

import os
import sys

# Paddle's import sets OMP_NUM_THREADS=1; the fit processes must start like train.py from a shell.
_ORIGINAL_OMP = os.environ.get("OMP_NUM_THREADS")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import utils  # noqa: E402,F401  (filters paddle's ccache warning before paddle is imported)
from utils.numbers import available_cpus, max_relative_difference  # noqa: E402

RESULT_TAG = "BENCHMARK_RESULT "
BATCH = 32

# Targets (checked on a quiet machine).
TARGET_STATIC_FRACTION = 0.75      # static b32 (decode excluded) >= 75% of the GEMM-bound limit
TARGET_DECODE_OVERHEAD = 0.30      # including decode costs at most 30% more time
TARGET_GAUSSIAN_RTOL = 1e-4        # Gaussian fit + scoring equal to the per-patch loop's to 1e-4 relative
TARGET_FIT_OVER_EXTRACTION = 2.0   # fit <= 2x extracting the features alone
TARGET_RSS_RATIO = 1.2             # peak RSS with k*n images <= 1.2x that with n images
TARGET_CORE_USE = 0.8              # eager scoring keeps >= 80% of the cores busy
TARGET_STATIC_PARITY = 1e-3        # static maps equal the eager ones (export_model's check)


# --------------------------------------------------------------------------- small helpers

def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_seconds() -> dict:
    """CPU seconds of each thread of this process (empty without psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def threads_working(before: dict, after: dict) -> int | None:
    """Threads that did at least half as much work as the busiest one between two snapshots:
    the compute threads of a parallel kernel, whatever else loads the machine."""
    spent = [after[k] - before.get(k, 0.0) for k in after]
    if not spent or max(spent) <= 0:
        return None
    return int(sum(1 for v in spent if v >= 0.5 * max(spent)))


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB"


def child_env() -> dict:
    """The environment a shell would give train.py: without the OMP_NUM_THREADS=1 Paddle set here."""
    env = dict(os.environ)
    if _ORIGINAL_OMP is None:
        env.pop("OMP_NUM_THREADS", None)
    else:
        env["OMP_NUM_THREADS"] = _ORIGINAL_OMP
    return env


@contextmanager
def blas_threads(n: int):
    """Limit NumPy's BLAS to n threads (threadpoolctl, if installed: scikit-learn brings it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


# --------------------------------------------------------------------------- machine

def machine_info(threads: int) -> dict:
    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model in ("unknown", "", "x86_64"):
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import paddle

    info = {
        "cpu": cpu_model,
        "cpus_available": available_cpus(),
        "cpus_total": os.cpu_count(),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "threads": int(threads),
        "python": platform.python_version(),
        "paddle": paddle.__version__,
        "paddle_onednn_compiled": bool(paddle.base.core.is_compiled_with_mkldnn()),
        "paddle_cuda_compiled": bool(paddle.device.is_compiled_with_cuda()),
        "numpy": np.__version__,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        from threadpoolctl import threadpool_info
        info["numpy_blas"] = [f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, "
                              f"{p.get('num_threads')} threads)" for p in threadpool_info()
                              if p.get("user_api") == "blas"]
    except ImportError:
        pass
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- GEMM rate

def _best_rate(run, n: int, repeats: int) -> float:
    run()  # warm-up: thread pools, allocation
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - tick)
    return 2.0 * n ** 3 / best / 1e9


def gemm_rates(threads: int, sizes=(2048, 3072), repeats: int = 3) -> dict:
    """Best float32 GEMM GFLOP/s of large square matrices, all cores, per library."""
    rng = np.random.default_rng(0)
    rates = {}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        with blas_threads(threads):
            rates.setdefault("numpy", []).append(_best_rate(lambda: a @ b, n, repeats))
        import paddle
        pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
        rates.setdefault("paddle", []).append(_best_rate(lambda: paddle.matmul(pa, pb), n, repeats))
        try:
            session = _onnx_matmul_session(n, threads)
        except ImportError:
            session = None
        if session is not None:
            feed = {"a": a, "b": b}
            rates.setdefault("onnxruntime", []).append(_best_rate(lambda: session.run(None, feed), n, repeats))
    try:
        rates["paddle_inference_onednn"] = _onednn_matmul_rates(sizes, threads, repeats)
    except Exception as exc:  # an optional source: report why it is missing, keep the others
        rates["paddle_inference_onednn_error"] = f"{type(exc).__name__}: {exc}"[:200]
    error = rates.pop("paddle_inference_onednn_error", None)
    best = {name: max(values) for name, values in rates.items()}
    source = max(best, key=best.get)
    return {"gflops": best, "best_gflops": best[source], "source": source, "sizes": list(sizes),
            "repeats": repeats, "onednn_error": error}


def _onednn_matmul_rates(sizes, threads: int, repeats: int) -> list:
    """x @ W through Paddle Inference with oneDNN on: the library the static convolutions use.
    Only predictor.run() is timed (the input stays in the predictor)."""
    import paddle
    from paddle import inference

    class MatMul(paddle.nn.Layer):
        def __init__(self, n):
            super().__init__()
            self.weight = self.create_parameter([n, n], dtype="float32")

        def forward(self, x):
            return paddle.matmul(x, self.weight)

    rates = []
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="padim-gemm-") as folder:
        for n in sizes:
            prefix = os.path.join(folder, f"matmul{n}")
            spec = [paddle.static.InputSpec([n, n], "float32", name="x")]
            paddle.jit.save(paddle.jit.to_static(MatMul(n), input_spec=spec, full_graph=True), prefix)
            graph = prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")
            config = inference.Config(graph, prefix + ".pdiparams")
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(int(threads))
            config.enable_mkldnn()
            config.switch_ir_optim(True)
            config.disable_glog_info()
            predictor = inference.create_predictor(config)
            handle = predictor.get_input_handle(predictor.get_input_names()[0])
            handle.reshape([n, n])
            handle.copy_from_cpu(rng.standard_normal((n, n), dtype=np.float32))
            rates.append(_best_rate(predictor.run, n, repeats))
            del predictor
    return rates


def _onnx_matmul_session(n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- FLOPs

def count_backbone_flops(backbone, image_size) -> dict:
    """FLOPs per image of the extractor's conv and linear layers (MACs x 2), from the layer shapes
    seen in one forward pass at ``image_size``; depthwise/grouped convolutions counted apart."""
    import paddle
    from paddle import nn

    totals = {"conv": 0, "grouped_conv": 0, "linear": 0}
    layers = {"conv": 0, "grouped_conv": 0, "linear": 0}

    def hook(layer, inputs, output):
        if isinstance(layer, nn.Conv2D):
            _, c_out, h_out, w_out = output.shape
            c_in_per_group, k_h, k_w = layer.weight.shape[1:]
            macs = int(c_out) * int(h_out) * int(w_out) * int(c_in_per_group) * int(k_h) * int(k_w)
            kind = "grouped_conv" if layer._groups > 1 else "conv"
        else:
            in_features, out_features = layer.weight.shape
            macs = int(np.prod(output.shape[1:-1], dtype=np.int64)) * int(in_features) * int(out_features)
            kind = "linear"
        totals[kind] += 2 * macs
        layers[kind] += 1

    handles = [layer.register_forward_post_hook(hook) for layer in backbone.sublayers()
               if isinstance(layer, (nn.Conv2D, nn.Linear))]
    try:
        with paddle.no_grad():
            backbone(paddle.zeros([1, 3, *image_size], dtype="float32"))
    finally:
        for handle in handles:
            handle.remove()
    return {"flops": int(sum(totals.values())), "by_kind": totals, "layers": layers}


def head_flops(d: int, grid, image_size) -> dict:
    """PaDiM head per image: Mahalanobis P*d^2*2 (the whitening matmul; the subtraction, squares
    and sum add ~3*P*d) and the two smoothing matmuls rows[H,h] @ D[h,w] @ cols[w,W]."""
    h, w = grid
    height, width = image_size
    mahalanobis = 2 * h * w * d * d
    smoothing = 2 * (height * h * w + height * w * width)
    return {"mahalanobis": int(mahalanobis), "smoothing": int(smoothing), "flops": int(mahalanobis + smoothing)}


# --------------------------------------------------------------------------- fit workers

def _limited_train_set(job: dict):
    from datasets.mvtec import MVTecDataset

    dataset = MVTecDataset(job["data_path"], job["category"], "train", job["resize"], job["crop_size"])
    samples = dataset.samples[:job["max_images"]] if job.get("max_images") else list(dataset.samples)
    dataset.samples = samples * int(job.get("repeat", 1))
    return dataset


def run_worker(job: dict) -> dict:
    """One measurement in this (fresh) process: 'fit' = train.py's fit_padim (+ saving the model,
    as train.py does), or 'extract' = the same decode + backbone + embedding pass alone."""
    from models.backbones import set_num_threads

    set_num_threads(job["threads"])
    from models.pipeline import use_device
    use_device("cpu")
    dataset = _limited_train_set(job)
    result = {"mode": job["mode"], "n_images": len(dataset), "rss_after_import": peak_rss_bytes()}
    cpu0, tick = cpu_seconds(), time.perf_counter()
    if job["mode"] == "fit":
        from models.pipeline import fit_padim
        model_file, report = fit_padim(dataset, job["backbone"], job["weights"], job["d"],
                                       batch_size=job["batch_size"], num_workers=job["num_workers"],
                                       print_freq=0, progress=False)
        result.update(seconds=time.perf_counter() - tick, cpu_seconds=cpu_seconds() - cpu0,
                      report={"seconds": report.seconds, "extraction_seconds": report.extraction_seconds,
                              "gaussian_seconds": report.gaussian_seconds, "batches": report.batches},
                      peak_rss_fit=peak_rss_bytes())
        if job.get("save"):
            from models.model_file import save_model
            tick = time.perf_counter()
            save_model(job["save"], model_file.meta, model_file.arrays, model_file.backbone_state)
            result["save_seconds"] = time.perf_counter() - tick
    elif job["mode"] == "extract":
        from datasets.mvtec import iterate_batches
        from models.backbones import DEFAULT_D, build_backbone
        from models.padim import Embedding, channel_indices
        from models.pipeline import embedding_extractor
        backbone = build_backbone(job["backbone"], job["weights"])
        d = job["d"] or DEFAULT_D[job["backbone"]]
        embedding = Embedding(backbone.channels, channel_indices(int(sum(backbone.channels)), d))
        # what fit_padim does per batch, through the same extractor (Paddle Inference on the CPU)
        extract = embedding_extractor(backbone, embedding, dataset.transform.image_size)
        for batch in iterate_batches(dataset, job["batch_size"], job["num_workers"]):
            extract(batch.images)
        result.update(seconds=time.perf_counter() - tick, cpu_seconds=cpu_seconds() - cpu0)
    else:
        raise ValueError(f"unknown worker mode {job['mode']!r}")
    result["peak_rss"] = peak_rss_bytes()
    return result


def spawn_worker(job: dict, timeout: float = 3600) -> dict:
    command = [sys.executable, "-m", "tools.benchmark", "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=_ROOT, timeout=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"benchmark worker {job['mode']} failed (exit {done.returncode}):\n"
                       f"{(done.stdout + done.stderr)[-3000:]}")


# --------------------------------------------------------------------------- Gaussian stage

def loop_fit(train: np.ndarray, positions, eps: float = 0.01):
    """The original's fit: mean over images, then per position np.cov(rowvar=False) + eps*I,
    stored float32. train [N, d, P] -> (mean [d, P] float32, cov [d, d, len(positions)] float32)."""
    d = train.shape[1]
    identity = np.identity(d)
    mean = np.mean(train, axis=0)
    cov = np.zeros((d, d, len(positions)), dtype=np.float32)
    for j, i in enumerate(positions):
        cov[:, :, j] = np.cov(train[:, :, i], rowvar=False) + eps * identity
    return mean, cov


def loop_score(test: np.ndarray, mean: np.ndarray, cov: np.ndarray, positions) -> np.ndarray:
    """The original's scoring on CPU: per position np.linalg.inv, then per sample
    scipy.spatial.distance.mahalanobis. -> [M, len(positions)] float64."""
    from scipy.spatial.distance import mahalanobis

    distances = np.empty((len(test), len(positions)), dtype=np.float64)
    for j, i in enumerate(positions):
        mean_i = mean[:, i]
        inverse = np.linalg.inv(cov[:, :, j])
        distances[:, j] = [mahalanobis(sample[:, i], mean_i, inverse) for sample in test]
    return distances


def vectorised_fit(train, batch_size: int = BATCH, eps: float = 0.01):
    """models.padim.GaussianFit fed batch by batch as fit_padim does -> (mean [P, d], whitening).
    ``train``: embeddings [P, N, d] NumPy, or already the batches [P, B, d] as Paddle tensors
    (what the model hands the fit), so that the timing leaves out a copy the fit never makes."""
    from models.padim import GaussianFit

    gaussian = GaussianFit()
    for batch in tensor_batches(train, batch_size) if isinstance(train, np.ndarray) else train:
        gaussian.update(batch)
    return gaussian.finalize(eps)


def tensor_batches(embeddings: np.ndarray, batch_size: int = BATCH) -> list:
    """[P, N, d] -> Paddle tensors [P, B, d]."""
    import paddle

    return [paddle.to_tensor(np.ascontiguousarray(embeddings[:, start:start + batch_size]))
            for start in range(0, embeddings.shape[1], batch_size)]


def vectorised_score(test: list, mean, whitening) -> np.ndarray:
    """PaDiM.distances (models.padim.mahalanobis, batched Paddle ops) per batch of [P, B, d]
    tensors -> [M, P]."""
    import paddle

    from models.padim import mahalanobis

    mean, whitening = paddle.to_tensor(mean), paddle.to_tensor(whitening)
    with paddle.no_grad():
        return np.concatenate([mahalanobis(batch, mean, whitening).numpy() for batch in test])


def spread_positions(total: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, total - 1, max(1, min(k, total))).round().astype(np.int64))


def compare_gaussian(train: np.ndarray, test: np.ndarray, eps: float = 0.01, loop_seconds: float = 30.0,
                     loop_positions: int | None = None, batch_size: int = BATCH, loop_blas_threads: int = 1,
                     repeats: int = 3) -> dict:
    """Vectorised fit + scoring vs the per-patch loop on the same embeddings, train [P, N, d] and
    test [P, M, d]. The vectorised stage runs ``repeats`` times and the run with the median total
    counts (all runs are returned): the first touch of the fit's fresh Gram array is sometimes
    many times slower than usual on a virtual machine, which one run would report as the stage's
    speed. The loop gets the embeddings in the original's layout, [N, d, P], and runs on an
    evenly spread subset of positions when it would take longer than ``loop_seconds`` (or on
    ``loop_positions`` of them); its time is extrapolated linearly to all positions. It runs with
    ``loop_blas_threads`` BLAS threads (1, its fastest: threads only add overhead to 100x100
    matrices; 0 = NumPy's default)."""
    positions_total = train.shape[0]
    # Paddle's OpenMP threads spin for KMP_BLOCKTIME (Intel OpenMP's default; the pause outlasts
    # it) after the embedding pass; timed right away, the Gram updates would share the cores with them
    time.sleep(0.3)
    train_batches = tensor_batches(train, batch_size)
    test_batches = tensor_batches(test, batch_size)
    runs = []
    for run in range(max(1, repeats)):
        tick = time.perf_counter()
        mean, whitening = vectorised_fit(train_batches, batch_size, eps)
        fit_seconds = time.perf_counter() - tick
        if run == 0:
            vectorised_score(tensor_batches(test[:, :1]), mean, whitening)  # warm-up
        tick = time.perf_counter()
        distances = vectorised_score(test_batches, mean, whitening)
        score_seconds = time.perf_counter() - tick
        runs.append((fit_seconds + score_seconds, fit_seconds, score_seconds))
        del whitening
    del train_batches
    _, fit_seconds, score_seconds = sorted(runs)[len(runs) // 2]

    limit_blas = blas_threads(loop_blas_threads) if loop_blas_threads else nullcontext()
    original_layout = [np.ascontiguousarray(e.transpose(1, 2, 0)) for e in (train, test)]
    with limit_blas:
        reference, positions, loop_fit_measured, loop_score_measured, mean_seconds, loop_mean = _timed_loop(
            *original_layout, eps, loop_seconds, loop_positions)
    del original_layout
    scale = positions_total / len(positions)
    loop_fit_seconds = mean_seconds + loop_fit_measured * scale
    loop_score_seconds = loop_score_measured * scale
    vectorised_seconds = fit_seconds + score_seconds
    loop_total = loop_fit_seconds + loop_score_seconds
    return {
        "n_train": int(train.shape[1]), "n_test": int(test.shape[1]), "d": int(train.shape[2]),
        "positions": int(positions_total), "loop_positions_measured": int(len(positions)),
        "extrapolated": bool(len(positions) < positions_total),
        "vectorised_runs": [{"fit_seconds": fit, "score_seconds": score} for _, fit, score in runs],
        "vectorised_fit_seconds": fit_seconds, "vectorised_score_seconds": score_seconds,
        "vectorised_seconds": vectorised_seconds,
        "loop_fit_seconds": loop_fit_seconds, "loop_score_seconds": loop_score_seconds,
        "loop_seconds": loop_total,
        "loop_measured_seconds": mean_seconds + loop_fit_measured + loop_score_measured,
        "speedup": loop_total / vectorised_seconds,
        "fit_speedup": loop_fit_seconds / fit_seconds,
        "score_speedup": loop_score_seconds / score_seconds,
        "loop_blas_threads": int(loop_blas_threads),
        "max_relative_difference": max_relative_difference(distances[:, positions], reference),
        "mean_max_relative_difference": max_relative_difference(mean.T, loop_mean),
    }


def _timed_loop(train, test, eps, loop_seconds, loop_positions):
    positions_total = train.shape[2]
    if loop_positions is None:
        probe = spread_positions(positions_total, 8)
        tick = time.perf_counter()
        _, probe_cov = loop_fit(train, probe, eps)
        loop_score(test, train.mean(axis=0), probe_cov, probe)
        per_position = max((time.perf_counter() - tick) / len(probe), 1e-6)
        loop_positions = int(loop_seconds / per_position)
    positions = spread_positions(positions_total, loop_positions)
    tick = time.perf_counter()
    loop_mean = np.mean(train, axis=0)
    mean_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    _, cov = loop_fit(train, positions, eps)
    loop_fit_measured = time.perf_counter() - tick
    tick = time.perf_counter()
    reference = loop_score(test, loop_mean, cov, positions)
    loop_score_measured = time.perf_counter() - tick
    return reference, positions, loop_fit_measured, loop_score_measured, mean_seconds, loop_mean


# --------------------------------------------------------------------------- scoring paths

def _cycled(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def measure_path(run, images, arrays: np.ndarray, latency_repeats: int, throughput_batches: int,
                 num_workers: int, batch: int = BATCH, overlapped_only: bool = False) -> dict:
    """Latency at batch 1 and throughput at ``batch`` of ``run(np batch) -> (maps, scores)``, with
    preprocessing excluded (pre-decoded arrays) and included (decoding the files).

    ``images`` is a datasets.mvtec.ImageList whose samples are the test images, cycled.
    """
    from datasets.mvtec import iterate_batches, read_rgb

    out = {}
    for _ in range(3):
        run(arrays[:1])  # warm-up (oneDNN primitives, allocations)
    times = []
    for k in range(latency_repeats):
        tick = time.perf_counter()
        run(arrays[k % len(arrays)][None])
        times.append(time.perf_counter() - tick)
    out["b1_latency_ms"] = 1e3 * statistics.median(times)
    times = []
    for k in range(latency_repeats):
        path = images.samples[k % len(images.samples)].path
        tick = time.perf_counter()
        run(images.transform(read_rgb(path))[None])
        times.append(time.perf_counter() - tick)
    out["b1_latency_ms_with_preprocessing"] = 1e3 * statistics.median(times)

    full = np.stack(_cycled(list(arrays), batch))
    run(full)  # warm-up at this batch size
    n_images = batch * throughput_batches
    threads0 = thread_cpu_seconds()
    cpu0, tick = cpu_seconds(), time.perf_counter()
    for _ in range(throughput_batches):
        run(full)
    wall = time.perf_counter() - tick
    out["b32_images_per_second"] = n_images / wall
    out["b32_cores_used"] = (cpu_seconds() - cpu0) / wall
    out["b32_threads_working"] = threads_working(threads0, thread_cpu_seconds())

    samples = images.samples
    images.samples = _cycled(samples, n_images)
    try:
        tick = time.perf_counter()
        for batch_data in iterate_batches(images, batch, num_workers):
            run(batch_data.images)
        out["b32_images_per_second_with_preprocessing_overlapped"] = n_images / (time.perf_counter() - tick)
        if not overlapped_only:
            # infer.py's loop: decode each batch in the main thread, then run it.
            tick = time.perf_counter()
            for start in range(0, n_images, batch):
                run(np.stack([images.load(i)[0] for i in range(start, min(start + batch, n_images))]))
            out["b32_images_per_second_with_preprocessing_sequential"] = n_images / (time.perf_counter() - tick)
        # Decode alone, the same threads: what the overlap has to hide.
        tick = time.perf_counter()
        for _ in iterate_batches(images, batch, num_workers):
            pass
        out["decode_only_images_per_second"] = n_images / (time.perf_counter() - tick)
    finally:
        images.samples = samples
    return out


def eager_breakdown(model, arrays: np.ndarray, repeats: int = 2, batch: int = BATCH) -> dict:
    """Seconds per batch of each stage of the eager model: backbone, embedding gathers,
    Mahalanobis, smoothing (shows whether the head or the backbone dominates)."""
    import paddle

    x = paddle.to_tensor(np.stack(_cycled(list(arrays), batch)))
    stages = {}
    with paddle.no_grad():
        for _ in range(repeats + 1):
            tick = time.perf_counter()
            features = model.backbone(x)
            features[-1].numpy()
            t_backbone = time.perf_counter()
            embeddings = model.embedding(features)
            embeddings.numpy()
            t_embed = time.perf_counter()
            distances = model.distances(embeddings)
            distances.numpy()
            t_distance = time.perf_counter()
            maps = model.anomaly_map(distances)
            maps.max(axis=[1, 2]).numpy()
            t_smooth = time.perf_counter()
            for key, value in (("backbone", t_backbone - tick), ("embedding", t_embed - t_backbone),
                               ("mahalanobis", t_distance - t_embed), ("smoothing_and_max", t_smooth - t_distance)):
                stages.setdefault(key, []).append(value)
    return {key: min(values[1:]) for key, values in stages.items()}


def embed_dataset(model, dataset, batch_size: int, num_workers: int) -> np.ndarray:
    """Embeddings [P, N, d] of a dataset's images."""
    import paddle

    from datasets.mvtec import iterate_batches

    parts = []
    with paddle.no_grad():
        for batch in iterate_batches(dataset, batch_size, num_workers):
            parts.append(model.embed(paddle.to_tensor(batch.images)).numpy())
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- the table

class Table:
    def __init__(self):
        self.rows = []

    def add(self, section: str, measurement: str, value: str, target: str = "", passed: bool | None = None,
            key: str | None = None, number=None):
        status = "" if passed is None else ("PASS" if passed else "FAIL")
        self.rows.append({"section": section, "measurement": measurement, "value": value, "target": target,
                          "status": status, "key": key, "number": number})

    def render(self) -> str:
        header = ("section", "measurement", "value", "target", "status")
        cells = [header] + [tuple(row[h] for h in header) for row in self.rows]
        widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
        lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def secs(x: float) -> str:
    if x < 0.1:
        return f"{1e3 * x:.1f} ms"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


# --------------------------------------------------------------------------- main

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=None, help="MVTec AD root; default: the demo category")
    parser.add_argument("--category", default=None, help="category under --data_path (default 'demo' without it)")
    parser.add_argument("--backbone", default="resnet18",
                        help="resnet18 | resnet34 | resnet50 | wide_resnet50_2 | mobilenet_v2")
    parser.add_argument("--pretrained_backbone", default="random",
                        help="'random' (default: speed does not depend on weights), 'imagenet' or a weights file")
    parser.add_argument("--d_reduced", type=int, default=None, help="embedding channels d (default: the backbone's)")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop_size", type=int, default=224)
    parser.add_argument("--num_workers", type=int, default=2, help="decoding threads (train.py's default)")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: every available CPU)")
    parser.add_argument("--max_train", type=int, default=None, help="use at most this many training images")
    parser.add_argument("--max_test", type=int, default=None, help="use at most this many test images")
    parser.add_argument("--rss_images", type=int, default=100,
                        help="the smaller fit of the peak-RSS check uses this many training images (at most all)")
    parser.add_argument("--rss_scale", type=int, default=8,
                        help="the larger fit uses rss_scale times as many (the same images repeated)")
    parser.add_argument("--loop_seconds", type=float, default=30.0,
                        help="time budget of the per-patch loop; beyond it a subset of positions is timed "
                             "and the time extrapolated linearly")
    parser.add_argument("--loop_positions", type=int, default=None,
                        help="time the per-patch loop on exactly this many positions instead")
    parser.add_argument("--loop_blas_threads", type=int, default=1,
                        help="BLAS threads for the per-patch loop: 1 (default) is its fastest on 100x100 "
                             "matrices; 0 keeps NumPy's default")
    parser.add_argument("--latency_repeats", type=int, default=20, help="batch-1 runs per latency (median)")
    parser.add_argument("--throughput_batches", type=int, default=4, help="batches of 32 per throughput")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: fit,rss,gemm,gaussian,eager,static")
    parser.add_argument("--json", default=None,
                        help="write the results here (default: output/benchmark/<category>_<backbone>.json)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (64x64 input, few images, short loops): checks the script, "
                             "its numbers mean nothing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def apply_quick(args) -> None:
    args.resize, args.crop_size = 72, 64
    args.d_reduced = min(args.d_reduced or 20, 20)
    args.max_train = min(args.max_train or 12, 12)
    args.max_test = min(args.max_test or 6, 6)
    args.rss_images, args.rss_scale = min(args.rss_images, 8), 2
    args.loop_seconds = min(args.loop_seconds, 1.0)
    args.latency_repeats, args.throughput_batches = 2, 1


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:   # the fit workers run like train.py, with glibc's malloc defaults
        result = run_worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    from utils.memory import keep_large_buffers

    malloc_tuned = keep_large_buffers()   # what val.py, predict.py and infer.py do (utils.cli.run_cli)
    if args.quick:
        apply_quick(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()

    import paddle

    from datasets.mvtec import ImageList, MVTecDataset
    from models.backbones import DEFAULT_D, set_num_threads
    from models.pipeline import use_device

    threads = set_num_threads(args.threads)
    use_device("cpu")
    if args.data_path is None:
        from datasets.demo import DEMO_CATEGORY, demo_data_root
        data_root, category = Path(demo_data_root()), args.category or DEMO_CATEGORY
    else:
        data_root, category = Path(args.data_path), args.category or "bottle"
    d = args.d_reduced or DEFAULT_D[args.backbone]
    image_size = (args.crop_size, args.crop_size)
    train_set = MVTecDataset(data_root, category, "train", args.resize, args.crop_size)
    test_set = MVTecDataset(data_root, category, "test", args.resize, args.crop_size)
    if args.max_train:
        train_set.samples = train_set.samples[:args.max_train]
    if args.max_test:
        test_set.samples = test_set.samples[:args.max_test]
    info = machine_info(threads)
    info["malloc_large_buffers_kept"] = bool(malloc_tuned)
    config = {"data_root": str(data_root), "category": category, "backbone": args.backbone,
              "weights": args.pretrained_backbone, "d": d, "resize": args.resize, "crop_size": list(image_size),
              "batch_size": BATCH, "num_workers": args.num_workers, "n_train": len(train_set),
              "n_test": len(test_set), "quick": bool(args.quick)}
    print(f"PaDiM-Paddle benchmark: {category} ({len(train_set)} train, {len(test_set)} test images under "
          f"{data_root}), {args.backbone} ({args.pretrained_backbone} weights), d={d}, input {args.crop_size}")
    print(f"machine: {info['cpu']}, {info['cpus_available']} CPUs ({', '.join(info['simd'])}), {threads} threads, "
          f"Paddle {info['paddle']} (oneDNN compiled: {info['paddle_onednn_compiled']}), NumPy {info['numpy']}, "
          f"load average {info['load_average_start'][0]:.2f}" if info["load_average_start"] else "", flush=True)

    load = info["load_average_start"]
    if load and load[0] > 0.5 * info["cpus_available"]:
        print(f"note: load average {load[0]:.2f} on {info['cpus_available']} CPUs: other processes compete for "
              f"the CPUs, so the timings (and the fractions of the GEMM limit) are unreliable", flush=True)
    results, timings = {}, {}
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="padim-benchmark-"))
    model_path = work / "model" / category / "best.pdparams"
    job = {"data_path": str(data_root), "category": category, "backbone": args.backbone,
           "weights": args.pretrained_backbone, "d": d, "resize": args.resize, "crop_size": list(image_size),
           "batch_size": BATCH, "num_workers": args.num_workers, "threads": threads,
           "max_images": len(train_set), "repeat": 1}
    try:
        # ---- fit (fresh processes: the fit as train.py runs it, then features alone) --------
        tick = time.perf_counter()
        print("fit: train.py's fit in a fresh process ...", flush=True)
        fit = spawn_worker(dict(job, mode="fit", save=str(model_path)))
        results["fit"] = fit
        if "fit" not in skip:
            extract = spawn_worker(dict(job, mode="extract"))
            results["extract"] = extract
            ratio = fit["seconds"] / extract["seconds"]
            table.add("fit", f"train.py fit, {fit['n_images']} images, decode included",
                      f"{fit['n_images'] / fit['seconds']:.1f} img/s ({secs(fit['seconds'])}, "
                      f"{fit['cpu_seconds'] / fit['seconds']:.2f} cores busy)", key="fit_images_per_second",
                      number=fit["n_images"] / fit["seconds"])
            gaussian_seconds = fit["report"]["gaussian_seconds"]
            table.add("fit", "Gaussian stage within the fit (update + finalize)",
                      f"{secs(gaussian_seconds)} ({gaussian_seconds / fit['seconds']:.0%} of fit)",
                      key="fit_gaussian_seconds", number=fit["report"]["gaussian_seconds"])
            table.add("fit", "fit time / extracting the features alone",
                      f"{fmt_ratio(ratio)} ({secs(fit['seconds'])} vs {secs(extract['seconds'])})",
                      f"<= {TARGET_FIT_OVER_EXTRACTION:g}x", ratio <= TARGET_FIT_OVER_EXTRACTION,
                      key="fit_over_extraction", number=ratio)
            table.add("fit", "fit peak RSS (incl. saving the model)", gib(fit["peak_rss"]),
                      key="fit_peak_rss", number=fit["peak_rss"])
        if "rss" not in skip:
            n_small = min(args.rss_images, len(train_set))
            print(f"fit: peak RSS with {n_small} and {n_small * args.rss_scale} images ...", flush=True)
            small = fit if n_small == len(train_set) else spawn_worker(dict(job, mode="fit", max_images=n_small))
            large = spawn_worker(dict(job, mode="fit", max_images=n_small, repeat=args.rss_scale))
            rss_ratio = large["peak_rss"] / small["peak_rss"]
            results["rss"] = {"small": small, "large": large, "ratio": rss_ratio}
            table.add("fit", f"peak RSS, {large['n_images']} vs {small['n_images']} training images",
                      f"{fmt_ratio(rss_ratio)} ({gib(large['peak_rss'])} vs {gib(small['peak_rss'])})",
                      f"<= {TARGET_RSS_RATIO:g}x", rss_ratio <= TARGET_RSS_RATIO, key="rss_ratio", number=rss_ratio)
        timings["fit"] = time.perf_counter() - tick

        from models.model_file import load_model
        from models.pipeline import build_model
        model = build_model(load_model(model_path))
        grid = tuple(model.feature_grid)

        # ---- FLOPs and the GEMM-bound limit ------------------------------------------------
        tick = time.perf_counter()
        backbone_flops = count_backbone_flops(model.backbone, image_size)
        head = head_flops(d, grid, image_size)
        results["flops"] = {"backbone": backbone_flops, "head": head}
        limit = None
        if "gemm" not in skip:
            print("limit: float32 GEMM rate ...", flush=True)
            sizes, repeats = ((512, 1024), 2) if args.quick else ((2048, 3072), 3)
            gemm = gemm_rates(threads, sizes, repeats)
            # Creating a Paddle Inference predictor leaves eager kernels on fewer threads: restore.
            set_num_threads(threads)
            results["gemm"] = gemm
            limit = gemm["best_gflops"] * 1e9 / backbone_flops["flops"]
            limit_with_head = gemm["best_gflops"] * 1e9 / (backbone_flops["flops"] + head["flops"])
            results["limit"] = {"images_per_second": limit, "images_per_second_with_head": limit_with_head}
            rates = ", ".join(f"{k} {v:.0f}" for k, v in gemm["gflops"].items())
            table.add("limit", "float32 GEMM rate, all cores (best of)",
                      f"{gemm['best_gflops']:.0f} GFLOP/s ({rates})", key="gemm_gflops", number=gemm["best_gflops"])
        grouped = backbone_flops["by_kind"]["grouped_conv"]
        table.add("limit", f"{args.backbone} FLOPs/image to its last stage",
                  f"{backbone_flops['flops'] / 1e9:.3f} GFLOP"
                  + (f" ({grouped / 1e9:.3f} in depthwise convs)" if grouped else ""),
                  key="backbone_gflops", number=backbone_flops["flops"] / 1e9)
        table.add("limit", "PaDiM head FLOPs/image (Mahalanobis P*d^2*2 + smoothing)",
                  f"{head['flops'] / 1e6:.1f} MFLOP ({head['mahalanobis'] / 1e6:.1f} + {head['smoothing'] / 1e6:.1f})",
                  key="head_gflops", number=head["flops"] / 1e9)
        if limit:
            table.add("limit", "GEMM-bound limit (backbone FLOPs / GEMM rate)",
                      f"{limit:.1f} img/s ({limit_with_head:.1f} with the head)", key="limit_images_per_second",
                      number=limit)
        timings["limit"] = time.perf_counter() - tick

        # ---- Gaussian stage vs the per-patch loop --------------------------------------------
        if "gaussian" not in skip:
            tick = time.perf_counter()
            print("gaussian: embeddings of the train and test images ...", flush=True)
            train_emb = embed_dataset(model, train_set, BATCH, args.num_workers)
            test_emb = embed_dataset(model, test_set, BATCH, args.num_workers)
            print("gaussian: vectorised vs per-patch loop ...", flush=True)
            gauss = compare_gaussian(train_emb, test_emb, model_eps(model_path), args.loop_seconds,
                                     args.loop_positions, BATCH, args.loop_blas_threads)
            del train_emb, test_emb
            results["gaussian"] = gauss
            note = (f"loop timed on {gauss['loop_positions_measured']}/{gauss['positions']} positions, "
                    f"extrapolated linearly" if gauss["extrapolated"] else "loop on all positions")
            g = gauss
            totals = ", ".join(secs(r["fit_seconds"] + r["score_seconds"]) for r in g["vectorised_runs"])
            table.add("gaussian", f"fit + scoring, {g['n_train']} train / {g['n_test']} test, vs per-patch loop",
                      f"{fmt_ratio(g['speedup'])} ({secs(g['vectorised_seconds'])} vs {secs(g['loop_seconds'])}; "
                      f"{note})", key="gaussian_speedup", number=gauss["speedup"])
            table.add("gaussian", f"  the vectorised stage's {len(g['vectorised_runs'])} runs (the median counts)",
                      totals)
            table.add("gaussian", "  fit alone / scoring alone speed-up",
                      f"{fmt_ratio(g['fit_speedup'])} ({secs(g['vectorised_fit_seconds'])} vs "
                      f"{secs(g['loop_fit_seconds'])}) / {fmt_ratio(g['score_speedup'])} "
                      f"({secs(g['vectorised_score_seconds'])} vs {secs(g['loop_score_seconds'])})")
            table.add("gaussian", "max relative difference of the distances",
                      f"{gauss['max_relative_difference']:.2e}", f"<= {TARGET_GAUSSIAN_RTOL:g}",
                      gauss["max_relative_difference"] <= TARGET_GAUSSIAN_RTOL, key="gaussian_rtol",
                      number=gauss["max_relative_difference"])
            timings["gaussian"] = time.perf_counter() - tick

        # ---- scoring: eager (predict.py) and static (infer.py) ----------------------------
        test_images = ImageList(data_root / category / "test", args.resize, args.crop_size)
        test_images.samples = [s for s in test_images.samples if s.path in {t.path for t in test_set.samples}]
        arrays = np.stack([test_images.load(i)[0] for i in range(min(len(test_images), BATCH))])

        def fraction(images_per_second):
            return f" = {images_per_second / limit:.2f} of limit" if limit else ""

        if "eager" not in skip:
            tick = time.perf_counter()
            print("eager: predict.py path ...", flush=True)
            set_num_threads(threads)  # as predict.py does

            def eager(batch):
                with paddle.no_grad():
                    anomaly_map, score = model(paddle.to_tensor(batch))
                return anomaly_map.numpy(), score.numpy()

            eager_result = measure_path(eager, test_images, arrays, args.latency_repeats, args.throughput_batches,
                                        args.num_workers, overlapped_only=True)
            eager_result["breakdown_b32_seconds"] = eager_breakdown(model, arrays, repeats=1 if args.quick else 2)
            results["eager"] = eager_result
            add_path_rows(table, "eager", eager_result, fraction, limit, static=False)
            cores, working = eager_result["b32_cores_used"], eager_result["b32_threads_working"]
            available = info["cpus_available"]
            # Threads doing equal shares of the work show the kernels are parallel even when other
            # processes take CPU time; the cores kept busy is the same check on a quiet machine.
            used_all = working >= available if working is not None else cores >= TARGET_CORE_USE * available
            table.add("eager", "eager b32 scoring: threads sharing the work (cores kept busy)",
                      f"{working} threads ({cores:.2f} of {available} cores busy)",
                      f"{available} threads (>= {TARGET_CORE_USE * available:.1f} cores on a quiet machine)",
                      used_all, key="eager_threads", number=working)
            bd = eager_result["breakdown_b32_seconds"]
            table.add("eager", "b32 time split: backbone / embedding / Mahalanobis / smoothing",
                      " / ".join(f"{bd[k]:.3f}" for k in ("backbone", "embedding", "mahalanobis", "smoothing_and_max"))
                      + " s")
            timings["eager"] = time.perf_counter() - tick

        if "static" not in skip:
            tick = time.perf_counter()
            print("static: export + infer.py path (Paddle Inference, oneDNN) ...", flush=True)
            static_result = measure_static(model, model_path, work / "export", test_images, arrays, threads, args,
                                           limit)
            results["static"] = static_result
            add_path_rows(table, "static", static_result, fraction, limit, static=True)
            timings["static"] = time.perf_counter() - tick
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timings["total"] = time.perf_counter() - started
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print()
    print(f"machine: {info['cpu']}; {info['cpus_available']} CPUs; {threads} threads; Paddle {info['paddle']}; "
          f"oneDNN compiled {info['paddle_onednn_compiled']}"
          + (f", on in the static predictor {results['static']['onednn_enabled']}" if "static" in results else "")
          + f"; glibc keeps large freed buffers (utils/memory.py) in this process: "
            f"{info['malloc_large_buffers_kept']}, in the fit workers (as train.py): False"
          + (f"; load average {info['load_average_start'][0]:.2f} at start, {info['load_average_end'][0]:.2f} at end"
             if info["load_average_start"] else ""))
    print(f"data: {category}, {len(train_set)} train / {len(test_set)} test images; {args.backbone} "
          f"({args.pretrained_backbone} weights), d={d}, input {args.crop_size}x{args.crop_size}, "
          f"feature grid {grid[0]}x{grid[1]}; batch {BATCH}")
    print(table.render())
    print(f"benchmark took {timings['total']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')})")
    report = {"machine": info, "config": config, "results": results, "table": table.rows, "timings": timings,
              "targets_passed": all(r["status"] != "FAIL" for r in table.rows)}
    default_json = Path(_ROOT) / "output" / "benchmark" / f"{category}_{args.backbone}.json"
    json_path = Path(args.json) if args.json else default_json
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    print(f"results written to {json_path}")
    return report


def model_eps(model_path) -> float:
    from models.model_file import read_meta
    return float(read_meta(model_path).eps)


def measure_static(model, model_path, export_dir: Path, test_images, arrays, threads: int, args, limit) -> dict:
    """Export with models.export (as export_model.py) and run infer.py's runtime with oneDNN on."""
    import paddle

    from models.deploy import InferenceSettings, open_deployed
    from models.pipeline import export_model_file

    tick = time.perf_counter()
    quiet = logging.getLogger("padim.benchmark.quiet")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    export_model_file(model_path, export_dir, verify=False, logger=quiet)
    export_seconds = time.perf_counter() - tick
    settings = InferenceSettings(use_gpu=False, enable_mkldnn=True, cpu_threads=threads, batch_size=BATCH)
    deployed = open_deployed(export_dir, backend="paddle", settings=settings)
    runtime = deployed.runtime
    result = {"export_seconds": export_seconds, "onednn_enabled": bool(runtime.config.mkldnn_enabled()),
              "cpu_math_threads": int(runtime.config.cpu_math_library_num_threads())}
    with paddle.no_grad():
        expected = model(paddle.to_tensor(arrays))[0].numpy()
    got = runtime(arrays)[0]
    result["max_relative_difference_to_eager"] = max_relative_difference(got, expected)
    result.update(measure_path(runtime, test_images, arrays, args.latency_repeats, args.throughput_batches,
                               args.num_workers))
    return result


def add_path_rows(table: Table, section: str, r: dict, fraction, limit, static: bool) -> None:
    script = "infer.py" if static else "predict.py"
    table.add(section, f"{script}: latency, batch 1, preprocessing excluded / included",
              f"{r['b1_latency_ms']:.1f} ms / {r['b1_latency_ms_with_preprocessing']:.1f} ms",
              key=f"{section}_b1_latency_ms", number=r["b1_latency_ms"])
    b32 = r["b32_images_per_second"]
    if static:
        passed = None if not limit else b32 / limit >= TARGET_STATIC_FRACTION
        table.add(section, "throughput, batch 32, preprocessing excluded", f"{b32:.1f} img/s{fraction(b32)}",
                  f">= {TARGET_STATIC_FRACTION:g} of limit" if limit else "", passed,
                  key=f"{section}_b32_images_per_second", number=b32)
    else:
        table.add(section, "throughput, batch 32, preprocessing excluded", f"{b32:.1f} img/s{fraction(b32)}",
                  key=f"{section}_b32_images_per_second", number=b32)
    overlapped = r["b32_images_per_second_with_preprocessing_overlapped"]
    cost_overlapped = b32 / overlapped - 1
    decode = r["decode_only_images_per_second"]
    if static:
        sequential = r["b32_images_per_second_with_preprocessing_sequential"]
        cost = b32 / sequential - 1
        table.add(section, "throughput, batch 32, preprocessing included (infer.py: decode threads ahead)",
                  f"{overlapped:.1f} img/s{fraction(overlapped)}, {pct(cost_overlapped)} time "
                  f"(decode alone {decode:.0f} img/s)",
                  f"<= +{100 * TARGET_DECODE_OVERHEAD:.0f}% time", cost_overlapped <= TARGET_DECODE_OVERHEAD,
                  key=f"{section}_decode_cost", number=cost_overlapped)
        table.add(section, "  same, decoding in the main thread, then running",
                  f"{sequential:.1f} img/s{fraction(sequential)}, {pct(cost)} time",
                  key=f"{section}_decode_cost_sequential", number=cost)
        # Decode and inference both need the CPUs: when each alone keeps every core busy, the
        # best a pipeline can do is the sum of their per-image times.
        ceiling = 1.0 / (1.0 / b32 + 1.0 / decode)
        table.add(section, "  ceiling when decode and inference share the cores: 1/(1/excl + 1/decode)",
                  f"{ceiling:.1f} img/s, {pct(b32 / ceiling - 1)} time; overlapped run reaches "
                  f"{overlapped / ceiling:.0%} of it", key=f"{section}_decode_ceiling", number=ceiling)
        table.add(section, "static maps vs eager maps, max relative difference",
                  f"{r['max_relative_difference_to_eager']:.1e} (oneDNN on: {r['onednn_enabled']})",
                  f"<= {TARGET_STATIC_PARITY:g}", r["max_relative_difference_to_eager"] <= TARGET_STATIC_PARITY)
    else:
        table.add(section, "throughput, batch 32, preprocessing included (predict.py: overlapped)",
                  f"{overlapped:.1f} img/s{fraction(overlapped)}, {pct(cost_overlapped)} time "
                  f"(decode alone {decode:.0f} img/s)",
                  key=f"{section}_decode_cost", number=cost_overlapped)


if __name__ == "__main__":
    main()
