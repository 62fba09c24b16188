"""anomalib's PaDiM (PyTorch, CPU) and its own ONNX and OpenVINO exports on the same images with
the same preprocessing, beside this project's train.py and infer.py as whole processes: one
command, every measurement repeated and interleaved, the medians in a side-by-side table.

It needs a Python with torch, anomalib, onnxscript, openvino and onnxruntime, which this project
does not install, and this project's own Python (with Paddle) for our rows:

    python -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install torch torchvision anomalib==2.7.0 onnxscript openvino onnxruntime
    # our model: bottle, ResNet18 with random weights (as anomalib's below), exported
    python train.py --data_path /work/shared/data/mvtec --category bottle --backbone resnet18 \\
        --pretrained_backbone=random --val=False --save_path /tmp/perf_out
    python export_model.py --model_path /tmp/perf_out/bottle/best.pdparams --save_dir /tmp/perf_out/export
    /tmp/anomalib-venv/bin/python -m tools.compare_anomalib --data_path /work/shared/data/mvtec \\
        --category bottle --ours_model /tmp/perf_out/export \\
        --ours_python "$(python -c 'import sys; print(sys.executable)')" \\
        --json logs/anomalib_bottle_resnet18.json --log logs/anomalib_bottle_resnet18.log

Measured (ResNet18 layer1-3, d=100, 224, random weights: no download), each part --repeats times
in fresh processes, the parts interleaved, the medians reported (--parts picks some):
  fit        anomalib's training loop in a fresh process (decode + feature extraction + its
             Gaussian fit: a memory bank of all embeddings, then the covariance), images/s,
             peak RSS, the whole process (start to exit), and peak RSS with --rss_scale times
             more images; our train.py on the same category as a whole process;
  scoring    the Gaussian fit alone and anomalib's distance on the test embeddings; the model
             called in eager PyTorch, through its ONNX export under onnxruntime and its OpenVINO
             export under OpenVINO's defaults (bf16 where the CPU has it) and in f32: batch-1
             latency (median and mean over the test images) and batch-32 throughput,
             preprocessing excluded, all taking the same normalised arrays; our export the same
             way under Paddle Inference (oneDNN) in fp32 and in bf16 (--precision fp16); what the
             lower precision costs, for ours (bf16 against fp32) and for OpenVINO (its default
             against f32 asked) alike: over the test images, the largest relative difference of
             the scores and of each map the largest difference over that map's peak;
  whole      a lean process that loads anomalib's OpenVINO (default precision, and f32) or ONNX
             export and scores every test image in batches of --batch_size, decoding included,
             nothing drawn, timed from process start to exit; our infer.py on --ours_model the
             same way, in fp32 and in bf16, and in fp32 with its pictures;
  startup    predict.py on one test image, picture included, against a bare `import paddle`,
             both in fresh processes (--startup_runs each per repeat, interleaved).
anomalib's exports are made once per run with its own API (to_onnx, to_openvino) from a model
fitted on the category's training images. Images are read and preprocessed by this project's
datasets.mvtec (NumPy and PIL only), so every runtime sees identical arrays.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from datasets.mvtec import ImageList, MVTecDataset, iterate_batches  # noqa: E402
from utils.files import write_text_atomically  # noqa: E402
from utils.numbers import max_difference_of_largest, max_relative_difference  # noqa: E402

BATCH = 32
RESULT_TAG = "ANOMALIB_RESULT "
PARTS = ("fit", "scoring", "whole", "startup")
WHOLE_RUNS = ("anomalib_openvino", "anomalib_openvino_fp32", "anomalib_onnxruntime", "ours_infer", "ours_infer_bf16",
              "ours_infer_pictures")
LEAN_RUNTIMES = ("openvino", "openvino_fp32", "onnxruntime")


def import_anomalib():
    """torch and PadimModel. A torchvision wheel built for CUDA beside a CPU-only torch cannot
    load its C ops, and its fake-kernel registrations then fail on import; PaDiM needs none of
    those ops, so they are skipped in that case only."""
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
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(torch, PadimModel, seed: int = 0):
    torch.manual_seed(seed)
    return PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100)


def train_and_test_sets(args):
    train = MVTecDataset(args.data_path, args.category, "train", 256, 224)
    test = MVTecDataset(args.data_path, args.category, "test", 256, 224)
    return train, test


def fit_on_training_images(torch, model, train, num_workers: int) -> float:
    """anomalib's training loop for PaDiM: forward in train mode fills the memory bank, then fit().
    Returns the seconds spent in the forward passes."""
    model.train()
    extraction = 0.0
    with torch.no_grad():
        for batch in iterate_batches(train, BATCH, num_workers):
            start = time.perf_counter()
            model(torch.from_numpy(batch.images))
            extraction += time.perf_counter() - start
        model.fit()
    model.eval()
    return extraction


# ---------------------------------------------------------------- worker processes

def fit_worker(args) -> dict:
    """anomalib's fit on the CPU, timed with decoding, as train.py is."""
    torch, PadimModel = import_anomalib()
    torch.set_num_threads(args.threads)
    train, _ = train_and_test_sets(args)
    train.samples = train.samples * args.repeat
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


def export_worker(args) -> dict:
    """Fit anomalib's Padim on the training images and export it with anomalib's own API, taking
    the normalised array (no pre-processor) and returning the raw map and score (no
    post-processor), as our exported graph does."""
    torch, _ = import_anomalib()
    from anomalib.models import Padim
    torch.set_num_threads(args.threads)
    train, _ = train_and_test_sets(args)
    torch.manual_seed(0)
    module = Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100,
                   pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    fit_on_training_images(torch, module.model, train, args.num_workers)
    module.eval()
    tick = time.perf_counter()
    onnx_path = module.to_onnx(args.export_dir, input_size=(224, 224))
    onnx_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    openvino_path = module.to_openvino(args.export_dir, input_size=(224, 224))
    return {"onnx": str(onnx_path), "openvino": str(openvino_path), "onnx_export_seconds": onnx_seconds,
            "openvino_export_seconds": time.perf_counter() - tick}


def open_runtime(kind: str, path: str, threads: int):
    """A callable: normalised float32 [N, 3, 224, 224] -> (maps [N, 224, 224], scores [N]), and a
    description of the runtime's settings."""
    if kind in ("openvino", "openvino_fp32"):
        import openvino
        config = {"INFERENCE_NUM_THREADS": threads}
        if kind == "openvino_fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = openvino.Core().compile_model(path, "CPU", config)
        outputs = {output.get_any_name(): output for output in compiled.outputs}
        request = compiled.create_infer_request()

        def run(images):
            result = request.infer(images)
            return result[outputs["anomaly_map"]][:, 0], result[outputs["pred_score"]].reshape(-1)
        settings = {"version": openvino.__version__,
                    "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                    "performance_hint": str(compiled.get_property("PERFORMANCE_HINT"))}
        return run, settings
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def run(images):
        result = dict(zip(names, session.run(None, {"input": images})))
        return result["anomaly_map"][:, 0], result["pred_score"].reshape(-1)
    return run, {"version": onnxruntime.__version__, "precision": "fp32"}


def model_call_timings(call, test_images: np.ndarray, throughput_batches: int) -> dict:
    """Batch-1 latency over every test image (median and mean) and batch-32 throughput."""
    for image in test_images[:3]:
        call(image[None])
    latencies = []
    for image in test_images:
        tick = time.perf_counter()
        call(image[None])
        latencies.append(time.perf_counter() - tick)
    batch = np.ascontiguousarray(np.stack([test_images[i % len(test_images)] for i in range(BATCH)]))
    call(batch)
    rates = []
    for _ in range(throughput_batches):
        tick = time.perf_counter()
        call(batch)
        rates.append(BATCH / (time.perf_counter() - tick))
    return {"latency_b1_ms": 1e3 * float(np.median(latencies)), "latency_b1_mean_ms": 1e3 * float(np.mean(latencies)),
            "throughput_b32": float(np.median(rates))}


def outputs_over(call, images: np.ndarray) -> tuple:
    """(maps [N, ...], scores [N]) of ``call`` over ``images`` [N, 3, 224, 224], in batches of 32."""
    maps, scores = zip(*(call(images[s:s + BATCH]) for s in range(0, len(images), BATCH)))
    return np.concatenate(maps), np.concatenate(scores)


def precision_differences(lower: tuple, reference: tuple) -> dict:
    """How far a lower precision's outputs are from the reference precision's over the same
    images, each a (maps [N, ...], scores [N]) pair: the largest relative difference of the
    scores, and of each map the largest difference over that map's peak (a map's low parts have
    no meaningful elementwise ratio), the largest over the maps."""
    (maps, scores), (reference_maps, reference_scores) = lower, reference
    return {"map_max_difference_over_peak": max(max_difference_of_largest(low, high)
                                                for low, high in zip(maps, reference_maps)),
            "score_max_relative_difference": max_relative_difference(scores, reference_scores)}


def scoring_worker(args) -> dict:
    """The Gaussian stage alone, then the model called eagerly and through both exports; and how
    far OpenVINO's default precision is from f32 asked over the test images
    (:func:`precision_differences`, recorded beside the default's timings)."""
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

        tick = time.perf_counter()
        model.gaussian.fit(train_embeddings)
        gaussian_fit = time.perf_counter() - tick
        stats = [model.gaussian.mean, model.gaussian.inv_covariance]
        generator = model.anomaly_map_generator
        tick = time.perf_counter()
        for s in range(0, len(test_embeddings), BATCH):
            generator.compute_distance(test_embeddings[s:s + BATCH], stats)
        gaussian_score = time.perf_counter() - tick

        result = {"n_train": len(train), "n_test": len(test), "gaussian_fit_seconds": gaussian_fit,
                  "gaussian_score_seconds": gaussian_score, "gaussian_seconds": gaussian_fit + gaussian_score,
                  "eager": model_call_timings(lambda images: model(torch.from_numpy(images)), test_images,
                                              args.throughput_batches)}
    outputs = {}
    for kind, path in (("openvino", args.openvino_model), ("openvino_fp32", args.openvino_model),
                       ("onnxruntime", args.onnx_model)):
        if path:
            tick = time.perf_counter()
            call, settings = open_runtime(kind, path, args.threads)
            setup = time.perf_counter() - tick
            result[kind] = {**settings, "setup_seconds": setup,
                            **model_call_timings(call, test_images, args.throughput_batches)}
            if kind.startswith("openvino"):     # after the timed calls, which it must not warm
                outputs[kind] = outputs_over(call, test_images)
            del call
    if len(outputs) == 2:
        result["openvino"].update(precision_differences(outputs["openvino"], outputs["openvino_fp32"]))
    return result


def ours_scoring_worker(args) -> dict:
    """Our export under Paddle Inference with oneDNN, fp32 and bf16 (``--precision fp16`` on a
    CPU with bf16; fp32 with a warning elsewhere), timed as anomalib's runtimes above; and how far
    bf16 is from fp32 over the test images (:func:`precision_differences`)."""
    from models.deploy import InferenceSettings, open_deployed

    _, test = train_and_test_sets(args)
    test_images = np.concatenate([b.images for b in iterate_batches(test, BATCH, args.num_workers)])
    result, outputs = {}, {}
    for key, precision in (("fp32", "fp32"), ("bf16", "fp16")):
        tick = time.perf_counter()
        deployed = open_deployed(args.ours_model, settings=InferenceSettings(
            enable_mkldnn=True, cpu_threads=args.threads, precision=precision, batch_size=BATCH))
        setup = time.perf_counter() - tick
        runtime = deployed.runtime
        outputs[key] = outputs_over(runtime, test_images)
        result[key] = {"precision": runtime.precision, "setup_seconds": setup,
                       **model_call_timings(runtime, test_images, args.throughput_batches)}
        del deployed, runtime
    if result["bf16"]["precision"] == "bf16":
        result["bf16"].update(precision_differences(outputs["bf16"], outputs["fp32"]))
    return result


def lean_worker(args) -> dict:
    """What a lean deployment of anomalib's export does: load it, score every image of the test
    folder in batches (decoding in threads ahead, as infer.py does), keep the scores."""
    tick = time.perf_counter()
    call, _ = open_runtime(args.runtime, args.model, args.threads)
    setup = time.perf_counter() - tick
    images = ImageList(Path(args.data_path) / args.category / "test", 256, 224)
    scores = []
    for batch in iterate_batches(images, args.batch_size, args.num_workers):
        scores.extend(call(batch.images)[1].tolist())
    return {"n_images": len(scores), "setup_seconds": setup, "loop_seconds": time.perf_counter() - tick - setup}


def versions_worker(args) -> dict:
    torch, _ = import_anomalib()
    import anomalib
    import onnxruntime
    import openvino
    return {"anomalib": anomalib.__version__, "torch": torch.__version__, "openvino": openvino.__version__,
            "onnxruntime": onnxruntime.__version__}


WORKERS = {"versions": versions_worker, "fit": fit_worker, "export": export_worker, "scoring": scoring_worker,
           "lean": lean_worker, "ours_scoring": ours_scoring_worker}


# ---------------------------------------------------------------- the parent

def run_process(command: list[str], cwd=ROOT, env=None) -> dict:
    """Run ``command`` to its end: wall seconds from start to exit, its own peak RSS (wait4's
    rusage, not the maximum over all children), and its output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        tick = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - tick
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({child.returncode}):\n{stdout[-2000:]}\n"
                           f"{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "stdout": stdout}


def spawn_worker(args, mode: str, python: str | None = None, **options) -> dict:
    command = [python or sys.executable, "-m", "tools.compare_anomalib", "--worker", mode, "--data_path", args.data_path,
               "--category", args.category, "--threads", str(args.threads), "--num_workers", str(args.num_workers),
               "--batch_size", str(args.batch_size), "--throughput_batches", str(args.throughput_batches)]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    done = run_process(command)
    for line in done["stdout"].splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "process_seconds": done["seconds"],
                    "process_peak_rss": done["peak_rss"]}
    raise RuntimeError(f"worker {mode} printed no result:\n{done['stdout'][-2000:]}")


def ours_command(args, script: str, *flags) -> list[str]:
    return [args.ours_python, str(ROOT / script), *map(str, flags)]


def run_ours_fit(args, scratch: Path) -> dict:
    out = scratch / "ours_fit"
    done = run_process(ours_command(args, "train.py", "--data_path", args.data_path, "--category", args.category,
                                    "--backbone", "resnet18", "--pretrained_backbone", "random", "--val", "False",
                                    "--save_path", out))
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": done["seconds"], "peak_rss": done["peak_rss"]}


def run_ours_infer(args, scratch: Path, pictures: bool, precision: str = "fp32") -> dict:
    out = scratch / "ours_infer"
    done = run_process(ours_command(args, "infer.py", "--model_file", args.ours_model,
                                    "--input_file", Path(args.data_path) / args.category / "test",
                                    "--batch_size", args.batch_size, "--num_workers", args.num_workers,
                                    "--use_gpu", "False", "--enable_mkldnn", "True", "--cpu_threads", args.threads,
                                    "--precision", precision, "--save_picture", pictures, "--save_path", out))
    n_pictures = len(list(out.rglob("*.png"))) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": done["seconds"], "peak_rss": done["peak_rss"], "n_pictures": n_pictures,
            "n_images": sum(1 for line in done["stdout"].splitlines() if "  score " in line)}


def first_test_image(args) -> Path:
    return Path(ImageList(Path(args.data_path) / args.category / "test", 256, 224).samples[0].path)


def run_startup(args, scratch: Path, repeat: int) -> dict:
    """``import paddle`` and predict.py on one image (picture included) in fresh processes,
    alternated, --startup_runs times each: {name: {"seconds": [...], "peak_rss": [...]}}."""
    picture = scratch / "predict_one.png"
    commands = {"import_paddle": [args.ours_python, "-c", "import paddle"],
                "predict_one": ours_command(args, "predict.py", "--model_path", args.ours_model_file,
                                            "--picture_path", first_test_image(args), "--save_path", picture)}
    names = list(commands) if repeat % 2 == 0 else list(commands)[::-1]
    runs = {name: {"seconds": [], "peak_rss": []} for name in commands}
    for _ in range(args.startup_runs):
        for name in names:
            done = run_process(commands[name])
            runs[name]["seconds"].append(done["seconds"])
            runs[name]["peak_rss"].append(done["peak_rss"])
        names.reverse()
    if not picture.is_file():
        raise RuntimeError(f"predict.py wrote no picture at {picture}")
    picture.unlink()
    return runs


def median_of(runs: list):
    """The element-wise median of a list of equally shaped dicts of numbers (lists of numbers:
    the median of all their samples; other values from the first run)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs if key in run]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(runs)
    if isinstance(first, list) and first and all(isinstance(v, (int, float)) for v in first):
        return statistics.median(value for run in runs for value in run)   # pooled samples
    return first


class Report:
    """Lines printed as they come and kept for the log file."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)


def one_repeat(args, repeat: int, exports: dict, scratch: Path, say) -> dict:
    """Every selected part once; the whole-process runs in an order rotated by ``repeat``."""
    result: dict = {"load_average_1min_before": os.getloadavg()[0]}
    if "fit" in args.parts:
        say(f"[{repeat + 1}/{args.repeats}] fit: anomalib, anomalib with {args.rss_scale}x the images"
            + (", ours (train.py)" if args.ours_python else ""))
        result["fit"] = spawn_worker(args, "fit", repeat=1)
        result["fit_large"] = spawn_worker(args, "fit", repeat=args.rss_scale)
        if args.ours_python:
            result["ours_fit"] = run_ours_fit(args, scratch)
    if "scoring" in args.parts:
        say(f"[{repeat + 1}/{args.repeats}] scoring: Gaussian stage; eager, OpenVINO and ONNX model calls"
            + ("; ours in fp32 and bf16" if args.ours_model else ""))
        result["scoring"] = spawn_worker(args, "scoring", openvino_model=exports["openvino"],
                                         onnx_model=exports["onnx"])
        if args.ours_model:
            result["scoring"]["ours"] = spawn_worker(args, "ours_scoring", python=args.ours_python,
                                                     ours_model=args.ours_model)
    if "whole" in args.parts:
        runs = [name for name in WHOLE_RUNS if args.ours_model or not name.startswith("ours")]
        shift = repeat % len(runs)
        runs = runs[shift:] + runs[:shift]
        say(f"[{repeat + 1}/{args.repeats}] whole process, {', '.join(runs)}")
        whole = {}
        for name in runs:
            if name.startswith("anomalib_"):
                runtime = name[len("anomalib_"):]
                whole[name] = spawn_worker(args, "lean", runtime=runtime,
                                           model=exports["onnx" if runtime == "onnxruntime" else "openvino"])
                whole[name]["seconds"] = whole[name].pop("process_seconds")
                whole[name]["peak_rss"] = whole[name].pop("process_peak_rss")
            else:
                whole[name] = run_ours_infer(args, scratch, pictures=name.endswith("pictures"),
                                             precision="fp16" if name.endswith("bf16") else "fp32")
        result["whole"] = whole
    if "startup" in args.parts and args.ours_model_file:
        say(f"[{repeat + 1}/{args.repeats}] startup: predict.py on one image, import paddle")
        result["startup"] = run_startup(args, scratch, repeat)
    result["load_average_1min_after"] = os.getloadavg()[0]
    return result


def ours_calls(scoring: dict) -> dict:
    """Our model-call timings by precision (the worker's record also holds its process's time)."""
    return {key: value for key, value in (scoring.get("ours") or {}).items()
            if isinstance(value, dict) and "latency_b1_ms" in value}


def table_rows(result: dict, args) -> list[tuple[str, str]]:
    gib = 2 ** 30
    rows = []
    if "fit" in result:
        fit, large = result["fit"], result["fit_large"]
        rows += [
            ("anomalib fit (decode included)",
             f"{fit['n_images'] / fit['seconds']:.1f} img/s ({fit['seconds']:.2f} s)"),
            ("anomalib fit, whole process / peak RSS",
             f"{fit['process_seconds']:.2f} s / {fit['peak_rss'] / gib:.2f} GiB"),
            (f"anomalib fit with {large['n_images']} images, whole process / peak RSS",
             f"{large['process_seconds']:.2f} s / {large['peak_rss'] / gib:.2f} GiB"),
            ("anomalib Gaussian stage within the fit", f"{fit['gaussian_seconds']:.2f} s"),
        ]
        if "ours_fit" in result:
            ours = result["ours_fit"]
            rows.append(("ours: train.py, whole process / peak RSS",
                         f"{ours['seconds']:.2f} s / {ours['peak_rss'] / gib:.2f} GiB"))
    if "scoring" in result:
        scoring = result["scoring"]
        rows.append((f"anomalib Gaussian fit + scoring, {scoring['n_train']} train / {scoring['n_test']} test",
                     f"{scoring['gaussian_seconds']:.2f} s (fit {scoring['gaussian_fit_seconds']:.2f} s, "
                     f"scoring {scoring['gaussian_score_seconds'] * 1e3:.1f} ms)"))
        def call_row(name, timing):
            rows.append((f"{name}: batch 1 median / mean, batch 32",
                         f"{timing['latency_b1_ms']:.1f} / {timing['latency_b1_mean_ms']:.1f} ms, "
                         f"{1e3 / timing['throughput_b32']:.1f} ms/img ({timing['throughput_b32']:.1f} img/s)"))

        def difference_row(name, timing):
            if "score_max_relative_difference" in timing:
                rows.append((f"{name}, largest difference: scores (relative) / maps (over the map's peak)",
                             f"{100 * timing['score_max_relative_difference']:.2f}% / "
                             f"{100 * timing['map_max_difference_over_peak']:.2f}%"))

        for key, name in (("eager", "eager PyTorch"), ("openvino", "OpenVINO export"),
                          ("openvino_fp32", "OpenVINO export, f32 asked"), ("onnxruntime", "ONNX export, onnxruntime")):
            if key in scoring:
                timing = scoring[key]
                detail = f" ({timing['inference_precision']})" if "inference_precision" in timing else ""
                call_row(f"anomalib {name}{detail}", timing)
        for key, timing in ours_calls(scoring).items():
            call_row(f"ours: Paddle Inference, oneDNN, {key} ({timing['precision']})", timing)
            difference_row(f"ours: {key} against fp32", timing)
        if "openvino" in scoring:     # beside ours: the same measure of the same images
            difference_row(f"anomalib OpenVINO export: default ({scoring['openvino'].get('inference_precision')}) "
                           f"against f32 asked", scoring["openvino"])
    if "whole" in result:
        names = {"anomalib_openvino": "anomalib OpenVINO export (default precision), lean process",
                 "anomalib_openvino_fp32": "anomalib OpenVINO export, f32 asked, lean process",
                 "anomalib_onnxruntime": "anomalib ONNX export, lean process",
                 "ours_infer": "ours: infer.py fp32, pictures off", "ours_infer_bf16": "ours: infer.py bf16, pictures off",
                 "ours_infer_pictures": "ours: infer.py fp32, pictures on"}
        for key in WHOLE_RUNS:
            if key in result["whole"]:
                run = result["whole"][key]
                setup = f", setup {run['setup_seconds']:.2f} s + loop {run['loop_seconds']:.2f} s" \
                    if "setup_seconds" in run else ""
                rows.append((f"whole process, {args.batch_size}-image batches: {names[key]}",
                             f"{run['seconds']:.2f} s{setup}"))
        whole = result["whole"]
        for ours, theirs in (("ours_infer", "anomalib_openvino"), ("ours_infer", "anomalib_openvino_fp32"),
                             ("ours_infer_bf16", "anomalib_openvino"), ("ours_infer_pictures", "ours_infer")):
            if ours in whole and theirs in whole:
                rows.append((f"ratio: {names[ours]} / {names[theirs]}",
                             f"{whole[ours]['seconds'] / whole[theirs]['seconds']:.2f}x"))
    if "startup" in result:
        startup = result["startup"]
        paddle, predict = startup["import_paddle"]["seconds"], startup["predict_one"]["seconds"]
        rows += [("python -c 'import paddle', whole process", f"{paddle:.2f} s"),
                 ("predict.py, one image, picture included, whole process", f"{predict:.2f} s"),
                 ("ratio: predict.py one image / import paddle", f"{predict / paddle:.2f}x")]
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="MVTec AD root (the folder holding the category)")
    parser.add_argument("--category", default="bottle", help="category folder (default: bottle)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads of every runtime (default: all available CPUs)")
    parser.add_argument("--num_workers", type=int, default=2, help="decode threads, as in infer.py (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8, help="batch size of the whole-process runs (default: 8)")
    parser.add_argument("--rss_scale", type=int, default=4,
                        help="peak RSS is also measured with the training set repeated this many times (default: 4)")
    parser.add_argument("--throughput_batches", type=int, default=3, help="timed batches of 32 (default: 3)")
    parser.add_argument("--startup_runs", type=int, default=2,
                        help="runs of predict.py and of import paddle per repeat, alternated (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported (default: 3)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--ours_model", default=None,
                        help="our export (export_model.py's folder) for infer.py's whole-process rows")
    parser.add_argument("--ours_python", default=None,
                        help="the Python with Paddle that runs train.py and infer.py (ours rows skipped without "
                             "it); give the interpreter itself (sys.executable), not a launcher such as a pyenv "
                             "shim, whose own start-up would be timed with every run")
    parser.add_argument("--ours_model_file", default=None,
                        help="the model file predict.py loads for the startup rows (default: the source model "
                             "named in --ours_model's metadata)")
    parser.add_argument("--json", default=None, help="write the medians and every run to this JSON file")
    parser.add_argument("--log", default=None, help="write the report to this text file")
    for hidden in ("worker", "export_dir", "runtime", "model", "openvino_model", "onnx_model"):
        parser.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(WORKERS[args.worker](args)), flush=True)
        return {}
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.ours_model and not args.ours_python:
        raise SystemExit("--ours_model needs --ours_python (the Python with Paddle)")
    # Not resolved: a virtual environment's python is a symbolic link to the interpreter it came from.
    if args.ours_python and Path(args.ours_python).absolute() == Path(sys.executable).absolute():
        raise SystemExit("--ours_python is this tool's own Python; give the one with Paddle")
    if "startup" in args.parts and args.ours_model and args.ours_model_file is None:
        meta = json.loads((Path(args.ours_model) / "model.meta.json").read_text(encoding="utf-8"))
        args.ours_model_file = meta["source_model"]
    # This process only starts the others: with torch imported here, every child would inherit
    # its resident size in the peak RSS that wait4 reports (Linux carries it across exec).
    started = time.perf_counter()
    say = Report()
    say("# " + shlex.join([sys.executable, "-m", "tools.compare_anomalib", *(sys.argv[1:] if argv is None else argv)]))
    say(f"{args.threads} threads; {args.category} under {args.data_path}; {args.repeats} interleaved repeats, medians; "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the start")
    versions = spawn_worker(args, "versions")
    say(", ".join(f"{name} {version}" for name, version in versions.items()
                  if name not in ("process_seconds", "process_peak_rss")))
    runs = []
    with tempfile.TemporaryDirectory(prefix="compare_anomalib_") as scratch:
        scratch = Path(scratch)
        exports = {}
        if {"scoring", "whole"} & set(args.parts):
            say("anomalib's ONNX and OpenVINO exports of a model fitted on the training images ...")
            exports = spawn_worker(args, "export", export_dir=scratch / "anomalib_export")
        for repeat in range(args.repeats):
            runs.append(one_repeat(args, repeat, exports, scratch, say))
    result = {**{name: versions[name] for name in ("anomalib", "torch", "openvino", "onnxruntime")},
              "threads": args.threads, "category": args.category, "batch_size": args.batch_size,
              "repeats": args.repeats, "statistic": "median", **median_of(runs), "runs": runs}
    if args.json:       # first: the runs are kept even if the table below fails
        write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")
    rows = table_rows(result, args)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        say(f"| {name.ljust(width)} | {value} |")
    loads = [run[key] for run in runs for key in ("load_average_1min_before", "load_average_1min_after")]
    say(f"took {time.perf_counter() - started:.0f} s; 1-minute load average {min(loads):.1f} to {max(loads):.1f} "
        f"on {os.cpu_count()} CPUs (other processes' load slows every row)")
    if args.json:
        say(f"results written to {args.json}")
    if args.log:
        write_text_atomically(args.log, "\n".join(say.lines) + "\n")
    return result


if __name__ == "__main__":
    main()
