"""Deployment: the whole PaDiM pipeline (image batch -> anomaly map + image score) as one static
graph, its metadata file, optional ONNX, and the two runtimes that execute them.

Exported files in ``save_dir`` (``model`` is GRAPH_NAME):

- ``model.json`` + ``model.pdiparams``: the PIR static graph that Paddle 3 writes with
  ``paddle.jit.save``; the backbone weights, the Gaussian (mean, whitening), the channel indices
  and the smoothing matrices are all inside the parameters file. Input ``image`` float32
  [N,3,H,W] (preprocessed as in training); outputs, in order, the anomaly map [N,H,W] in
  Mahalanobis units and the image score [N].
- ``model.meta.json``: everything else infer.py needs (preprocessing, thresholds and their
  source, the colour scale, input/output names, file sizes).
- ``model.onnx`` (optional): the same graph converted by paddle2onnx, which reads the PIR
  ``.json`` directly (it converts a legacy ``.pdmodel`` to ``.json`` itself first).

Nothing here parses flags or calls sys.exit. Paddle is imported lazily, so the onnxruntime
runtime works without it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.model_file import ModelFileError, read_meta
from utils.numbers import available_cpus, max_relative_difference

LOGGER = logging.getLogger("padim")

GRAPH_NAME = "model"
PIR_SUFFIX = ".json"
LEGACY_SUFFIX = ".pdmodel"
PARAMS_SUFFIX = ".pdiparams"
META_SUFFIX = ".meta.json"
ONNX_SUFFIX = ".onnx"
INFERENCE_FORMAT = "padim-paddle-inference"
INFERENCE_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUTS = ("anomaly_map", "image_score")
DEFAULT_OPSET = 13
PARITY_RTOL = 1e-3
ONNX_LIMIT_BYTES = 2 ** 31 - (1 << 24)   # 2 GiB, less room for the graph itself
PRECISIONS = ("fp32", "fp16", "int8")


class DeployError(ModelFileError):
    """An exported model is missing, incomplete, inconsistent, or does not fit the request."""


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce the dynamic model (a bug, not a user error)."""


# --------------------------------------------------------------------------- small helpers

def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def metadata_path(model_file) -> Path:
    """``<dir>/model.json`` (or ``.pdmodel``/``.onnx``) -> ``<dir>/model.meta.json``."""
    path = Path(model_file)
    return path.with_name(_stem(path) + META_SUFFIX)


def _file_record(path: Path) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------- metadata

def build_metadata(model_meta: dict, model_path, graph_file: Path, params_file: Path,
                   output_names: list, onnx_file: Path | None = None, onnx_io: dict | None = None,
                   parity: dict | None = None) -> dict:
    """The deployment metadata: infer.py needs nothing else besides the graph files."""
    from models.pipeline import VERSION, display_range, thresholds_of

    height, width = (int(v) for v in model_meta["crop_size"])
    thresholds = dict(thresholds_of(model_meta))
    vmin, vmax = display_range(model_meta)
    files = {"model": _file_record(graph_file), "params": _file_record(params_file),
             "onnx": _file_record(onnx_file) if onnx_file is not None else None}
    meta = {
        "format": INFERENCE_FORMAT,
        "format_version": INFERENCE_FORMAT_VERSION,
        "version": VERSION,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source_model": str(model_path),
        "source_model_created": model_meta.get("created"),
        "category": model_meta["category"],
        "backbone": model_meta["backbone"],
        "weights_source": model_meta.get("weights_source"),
        "stage_names": model_meta.get("stage_names"),
        "d": model_meta["d"],
        "seed": model_meta["seed"],
        "eps": model_meta["eps"],
        "sigma": model_meta["sigma"],
        "n_train": model_meta["n_train"],
        "resize": int(model_meta["resize"]),
        "crop_size": [height, width],
        "feature_grid": model_meta["feature_grid"],
        "normalisation": model_meta["normalisation"],
        "preprocessing": "RGB; resize shorter side to `resize` (PIL bilinear); centre crop `crop_size` "
                         "(H, W); /255; (x - mean) / std per channel; NCHW float32",
        "thresholds": {"image_threshold": float(thresholds["image_threshold"]),
                       "pixel_threshold": float(thresholds["pixel_threshold"]),
                       "source": thresholds["source"]},
        "display": {"vmin": vmin, "vmax": vmax,
                    "rule": "vmin = median training pixel score; vmax = pixel threshold + "
                            "(pixel threshold - vmin), so the threshold sits mid-scale"},
        "train_statistics": model_meta["train_statistics"],
        "units": "anomaly map and image score are Mahalanobis distances (absolute, not normalised)",
        "inputs": [{"name": INPUT_NAME, "shape": [-1, 3, height, width], "dtype": "float32"}],
        "outputs": [{"name": output_names[0], "meaning": OUTPUTS[0], "shape": [-1, height, width], "dtype": "float32"},
                    {"name": output_names[1], "meaning": OUTPUTS[1], "shape": [-1], "dtype": "float32"}],
        "onnx": onnx_io,
        "files": files,
        "export_check": parity,
    }
    return meta


def load_metadata(model_file) -> dict:
    """The metadata file beside ``model_file``; DeployError when missing or not ours."""
    path = metadata_path(model_file)
    if not path.is_file():
        raise DeployError(f"metadata file not found: {path} (it is written by export_model.py beside "
                          f"the graph; re-export the model)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise DeployError(f"{path} is not a readable metadata file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != INFERENCE_FORMAT:
        raise DeployError(f"{path} is not a PaDiM-Paddle inference metadata file")
    if meta.get("format_version") != INFERENCE_FORMAT_VERSION:
        raise DeployError(f"{path} has inference format version {meta.get('format_version')}, this version "
                          f"reads {INFERENCE_FORMAT_VERSION}: re-export the model")
    return meta


# --------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    save_dir: Path
    files: list
    meta: dict
    parity: dict = field(default_factory=dict)


def check_img_size(model_meta: dict, img_size) -> None:
    """--img_size must be the crop size the Gaussian was fitted at (it is per position)."""
    crop = tuple(int(v) for v in model_meta["crop_size"])
    if img_size is not None and tuple(int(v) for v in img_size) != crop:
        given = "x".join(str(int(v)) for v in img_size)
        raise DeployError(f"--img_size {given} does not match the model's crop size {crop[0]}x{crop[1]}: the "
                          f"Gaussian is fitted per feature position, so the input size is fixed at fit time "
                          f"(omit --img_size, or refit with train.py --crop_size {given})")


def probe_batch(height: int, width: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic batch in the range of normalised images, for export checks."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, height, width)).astype(np.float32)


# Paddle 3.3.1 logs this through glog (stderr, C++) while tracing any batch-norm layer; it is not
# about our graph and says nothing a user can act on.
KNOWN_GLOG_WARNING = "Paddle static graph(PIR) not support input out tensor"


@contextlib.contextmanager
def without_known_glog_warning():
    """Capture file descriptor 2 (glog writes there, not to sys.stderr) and pass on every line
    but KNOWN_GLOG_WARNING."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if KNOWN_GLOG_WARNING not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()


def save_static_graph(model, height: int, width: int, prefix: Path) -> Path:
    """Trace ``model`` (images [N, 3, height, width] -> outputs) and save it as ``prefix``.json
    (or .pdmodel) + .pdiparams; returns the graph file."""
    import paddle

    spec = [paddle.static.InputSpec([-1, 3, height, width], "float32", name=INPUT_NAME)]
    with without_known_glog_warning():
        paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(prefix))
    for suffix in (PIR_SUFFIX, LEGACY_SUFFIX):
        graph = prefix.with_name(prefix.name + suffix)
        if graph.is_file():
            return graph
    raise ExportCheckError(f"paddle.jit.save wrote no graph file next to {prefix}")


def check_onnx_size(model_file) -> None:
    """paddle2onnx 2.1.0 cannot read a tensor over 2 GiB ('vector::_M_default_append') and an ONNX
    file without external data is limited to 2 GiB: refuse early, before any file is written."""
    total = sum(a.nbytes for a in model_file.arrays.values())
    total += sum(np.asarray(v).nbytes for v in model_file.backbone_state.values())
    if total >= ONNX_LIMIT_BYTES:
        meta = model_file.meta
        raise DeployError(f"--onnx=True: this model has {total / 2 ** 30:.2f} GiB of parameters ({meta['backbone']}, "
                          f"d={meta['d']}, {meta['feature_grid'][0]}x{meta['feature_grid'][1]} positions); "
                          f"paddle2onnx 2.1.0 and single-file ONNX stop at 2 GiB. Use the Paddle Inference "
                          f"graph (export without --onnx) or fit with a smaller --d_reduced")


def convert_to_onnx(graph_file: Path, params_file: Path, onnx_file: Path, opset: int = DEFAULT_OPSET) -> Path:
    """paddle2onnx 2.1.0 on the PIR graph. ``optimize_tool='None'``: its default ('polygraphy')
    would pip-install packages during the conversion."""
    import paddle2onnx

    try:
        model_bytes = paddle2onnx.export(str(graph_file), str(params_file), save_file=None,
                                         opset_version=int(opset), auto_upgrade_opset=True,
                                         enable_onnx_checker=True, optimize_tool="None")
    except (SystemExit, UnboundLocalError):
        # On failure paddle2onnx logs the error and calls sys.exit(-1) (or returns an unset value).
        raise ExportCheckError("paddle2onnx could not convert the graph (its error is logged above)") from None
    if not model_bytes:
        raise ExportCheckError("paddle2onnx returned an empty ONNX model")
    onnx_file.write_bytes(model_bytes)
    return onnx_file


def export_model(model_path, save_dir, img_size=None, backbone: str | None = None, onnx: bool = False,
                 opset: int = DEFAULT_OPSET, verify: bool = True, logger: logging.Logger | None = None) -> ExportResult:
    """Export a model file to ``save_dir``. Files are written into a temp folder inside
    ``save_dir`` and moved into place only once complete (the metadata last)."""
    logger = logger or LOGGER
    model_path = Path(model_path)
    model_meta = read_meta(model_path)               # cheap: raises ModelFileError for a bad file
    check_img_size(model_meta, img_size)
    if onnx and importlib.util.find_spec("paddle2onnx") is None:
        raise DeployError("--onnx=True needs paddle2onnx (pip install paddle2onnx==2.1.0)")

    import paddle

    from models.model_file import load_model
    from models.pipeline import build_model

    paddle.set_device("cpu")
    model_file = load_model(model_path, backbone)
    model_meta = model_file.meta
    if onnx:
        check_onnx_size(model_file)
    model = build_model(model_file)
    del model_file
    height, width = (int(v) for v in model_meta["crop_size"])
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=save_dir))
    try:
        # The reference comes first: to_static replaces the layer's forward with the static program.
        probe = probe_batch(height, width)
        with paddle.no_grad():
            expected_map, expected_score = (t.numpy() for t in model(paddle.to_tensor(probe)))
        graph = save_static_graph(model, height, width, work / GRAPH_NAME)
        params = work / (GRAPH_NAME + PARAMS_SUFFIX)
        logger.info(f"static graph written ({graph.name}, {params.stat().st_size / 2 ** 20:.1f} MiB of parameters)")
        del model
        predictor = PaddleInferenceModel(graph, params, InferenceSettings(enable_mkldnn=True), meta=None)
        output_names = predictor.output_names
        parity = {}
        if verify:
            got_map, got_score = predictor(probe)
            parity["paddle_inference_onednn"] = _compare(got_map, got_score, expected_map, expected_score)
        del predictor
        onnx_file, onnx_io = None, None
        if onnx:
            onnx_file = convert_to_onnx(graph, params, work / (GRAPH_NAME + ONNX_SUFFIX), opset)
            logger.info(f"ONNX model written ({onnx_file.stat().st_size / 2 ** 20:.1f} MiB, opset >= {opset})")
            runtime = OnnxModel(onnx_file, InferenceSettings(), meta=None)
            onnx_io = {"inputs": [runtime.input_name], "outputs": list(runtime.output_names)}
            if verify:
                got_map, got_score = runtime(probe)
                parity["onnxruntime"] = _compare(got_map, got_score, expected_map, expected_score)
            del runtime
        for backend, result in parity.items():
            if result["map_max_relative_difference"] > PARITY_RTOL:
                raise ExportCheckError(f"the exported graph differs from the dynamic model under {backend}: "
                                       f"max relative difference {result['map_max_relative_difference']:.3g} "
                                       f"> {PARITY_RTOL}")
        meta = build_metadata(model_meta, model_path, graph, params, output_names, onnx_file, onnx_io,
                              parity or None)
        meta_file = work / (GRAPH_NAME + META_SUFFIX)
        meta_file.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        written = []
        final_meta = save_dir / meta_file.name
        if final_meta.exists():
            final_meta.unlink()        # an old metadata file must never describe new graph files
        for item in sorted(work.iterdir(), key=lambda p: p == meta_file):
            target = save_dir / item.name
            os.replace(item, target)
            written.append(target)
        stale_onnx = save_dir / (GRAPH_NAME + ONNX_SUFFIX)
        if onnx_file is None and stale_onnx.exists():
            stale_onnx.unlink()
            logger.info(f"removed {stale_onnx} from an earlier export (it no longer matches the graph)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(save_dir, written, meta, parity)


def _compare(got_map, got_score, expected_map, expected_score) -> dict:
    return {"map_max_relative_difference": max_relative_difference(got_map, expected_map),
            "score_max_relative_difference": max_relative_difference(got_score, expected_score)}


# --------------------------------------------------------------------------- runtimes

@dataclass
class InferenceSettings:
    """The original infer.py's predictor options (spec §2.5)."""
    use_gpu: bool = False
    gpu_mem: int = 8000
    gpu_id: int = 0
    use_tensorrt: bool = False
    precision: str = "fp32"
    enable_mkldnn: bool = False
    mkldnn_cache_capacity: int = 10
    cpu_threads: int | None = None
    ir_optim: bool = True
    batch_size: int = 1


def gpu_available(use_gpu: bool, logger: logging.Logger | None = None) -> bool:
    """True when the GPU was asked for and this Paddle build can use one; else one warning."""
    if not use_gpu:
        return False
    import paddle

    logger = logger or LOGGER
    if not paddle.device.is_compiled_with_cuda():
        logger.warning("warning: --use_gpu=True but this Paddle build has no CUDA: running on CPU")
        return False
    if paddle.device.cuda.device_count() == 0:
        logger.warning("warning: --use_gpu=True but no GPU is visible: running on CPU")
        return False
    return True


class PaddleInferenceModel:
    """A Paddle Inference predictor over the exported graph, with zero-copy handles.

    ``__call__(images [N,3,H,W] float32) -> (maps [N,H,W], scores [N])``. ``meta`` gives the
    output names (else the graph's own order is used: map, score). ``n_outputs=None`` accepts a
    graph with any outputs (models/static.py runs the backbone alone through it).
    """

    backend = "paddle"

    def __init__(self, model_file, params_file=None, settings: InferenceSettings | None = None,
                 meta: dict | None = None, logger: logging.Logger | None = None, n_outputs: int | None = 2):
        from paddle import inference

        self.logger = logger or LOGGER
        self.settings = settings or InferenceSettings()
        model_file = Path(model_file)
        params_file = Path(params_file) if params_file else model_file.with_name(_stem(model_file) + PARAMS_SUFFIX)
        for path, what in ((model_file, "inference model"), (params_file, "parameters file")):
            if not path.is_file():
                raise DeployError(f"{what} not found: {path} (run export_model.py first)")
        if meta is not None:
            _check_sizes(meta, model_file, params_file)
        self.model_file, self.params_file = model_file, params_file
        s = self.settings
        if s.precision not in PRECISIONS:
            raise DeployError(f"precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
        self.use_gpu = gpu_available(s.use_gpu, self.logger)
        self.use_tensorrt = bool(s.use_tensorrt and self.use_gpu)
        if s.use_tensorrt and not self.use_gpu:
            self.logger.warning("warning: --use_tensorrt=True needs the GPU: ignored on CPU")
        self.bfloat16 = False
        self.memory_optim = model_file.suffix == LEGACY_SUFFIX
        want_bf16 = False
        if not self.use_gpu and s.precision != "fp32":
            if s.precision == "fp16" and s.enable_mkldnn and _cpu_supports_bf16():
                want_bf16 = True
            else:
                reason = ("fp16 on CPU means oneDNN bfloat16, which needs --enable_mkldnn=True and a CPU with "
                          "bf16 support" if s.precision == "fp16" else "int8 needs TensorRT on a GPU")
                self.logger.warning(f"warning: --precision {s.precision}: {reason}; running fp32")
        self.predictor = None
        if want_bf16:
            self.config = self._config(inference, True)
            try:
                self.predictor = inference.create_predictor(self.config)
                self.bfloat16 = True
            except (ValueError, RuntimeError) as exc:
                self.logger.warning(f"warning: Paddle Inference cannot run this graph in oneDNN bfloat16 "
                                    f"({_first_line(exc)}); running fp32")
        if self.predictor is None:
            self.config = self._config(inference, False)
            try:
                self.predictor = inference.create_predictor(self.config)
            except (ValueError, RuntimeError, OSError) as exc:
                raise DeployError(f"Paddle Inference cannot load {model_file} with {params_file.name}: "
                                  f"{_first_line(exc)}") from None
        self.input_name = self.predictor.get_input_names()[0]
        names = list(self.predictor.get_output_names())
        if meta is not None:
            wanted = [output["name"] for output in meta["outputs"]]
            if sorted(wanted) != sorted(names):
                raise DeployError(f"{model_file} has outputs {names}, its metadata says {wanted}: files from "
                                  f"different exports")
            names = wanted
        if n_outputs is not None and len(names) != n_outputs:
            raise DeployError(f"{model_file} has {len(names)} outputs, expected {n_outputs} (map, score)")
        self.output_names = names
        self._input = self.predictor.get_input_handle(self.input_name)
        self._outputs = [self.predictor.get_output_handle(name) for name in names]

    def _config(self, inference, bfloat16: bool):
        s = self.settings
        config = inference.Config(str(self.model_file), str(self.params_file))
        if self.use_gpu:
            if s.precision == "fp16" and not self.use_tensorrt:
                config.enable_use_gpu(int(s.gpu_mem), int(s.gpu_id), inference.PrecisionType.Half)
            else:
                config.enable_use_gpu(int(s.gpu_mem), int(s.gpu_id))
            if self.use_tensorrt:
                precision = {"fp32": inference.PrecisionType.Float32, "fp16": inference.PrecisionType.Half,
                             "int8": inference.PrecisionType.Int8}[s.precision]
                config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=int(s.batch_size),
                                              min_subgraph_size=3, precision_mode=precision,
                                              use_static=False, use_calib_mode=s.precision == "int8")
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(int(s.cpu_threads or available_cpus()))
            if s.enable_mkldnn:
                config.set_mkldnn_cache_capacity(int(s.mkldnn_cache_capacity))
                config.enable_mkldnn()
                if bfloat16:
                    config.enable_mkldnn_bfloat16()
            else:
                config.disable_mkldnn()
        config.switch_ir_optim(bool(s.ir_optim))
        if self.memory_optim:
            # Paddle 3.3.1's predictor fails on a PIR graph with memory optim on ("Not find
            # predictor_id 0 and pass_name memory_optimize_pass"), so only legacy graphs get it.
            config.enable_memory_optim()
        config.switch_use_feed_fetch_ops(False)
        config.disable_glog_info()
        return config

    def __call__(self, images: np.ndarray):
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(images)
        self.predictor.run()
        return tuple(handle.copy_to_cpu() for handle in self._outputs)   # (map, score) for our graphs

    def conf_info(self) -> dict:
        """The AutoLog "Conf info" fields, read back from the Config."""
        config = self.config
        return {"runtime_device": "gpu" if config.use_gpu() else "cpu",
                "ir_optim": config.ir_optim(),
                "enable_memory_optim": self.memory_optim,
                "enable_tensorrt": config.tensorrt_engine_enabled(),
                "enable_mkldnn": config.mkldnn_enabled(),
                "cpu_math_library_num_threads": config.cpu_math_library_num_threads()}

    @property
    def precision(self) -> str:
        if self.bfloat16:
            return "bf16"
        return self.settings.precision if self.use_gpu else "fp32"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _onnxruntime_load_errors() -> tuple:
    """onnxruntime's load failures: its own exception classes, which derive from Exception only."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail", "InvalidArgument", "NotImplemented",
             "RuntimeException")
    return tuple(getattr(state, name) for name in names if hasattr(state, name)) + (RuntimeError, ValueError)


def _cpu_supports_bf16() -> bool:
    from paddle.base import core

    return bool(core.supports_bfloat16())


def _check_sizes(meta: dict, model_file: Path, params_file: Path) -> None:
    files = meta.get("files") or {}
    for key, path in (("model", model_file), ("params", params_file)):
        record = files.get(key)
        if record and record.get("bytes") is not None and path.stat().st_size != record["bytes"]:
            raise DeployError(f"{path} has {path.stat().st_size} bytes, the metadata beside it says "
                              f"{record['bytes']}: files from different exports (re-export the model)")


class OnnxModel:
    """The exported ``model.onnx`` under onnxruntime; same call as PaddleInferenceModel."""

    backend = "onnxruntime"

    def __init__(self, onnx_file, settings: InferenceSettings | None = None, meta: dict | None = None,
                 logger: logging.Logger | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeployError("--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)") from None
        self.logger = logger or LOGGER
        self.settings = settings or InferenceSettings()
        onnx_file = Path(onnx_file)
        if not onnx_file.is_file():
            raise DeployError(f"ONNX model not found: {onnx_file} (export it with export_model.py --onnx=True)")
        if meta is not None:
            record = (meta.get("files") or {}).get("onnx")
            if record is None:
                raise DeployError(f"{metadata_path(onnx_file)} lists no ONNX model: {onnx_file} is not from this "
                                  f"export (re-export with --onnx=True)")
            if record.get("bytes") is not None and onnx_file.stat().st_size != record["bytes"]:
                raise DeployError(f"{onnx_file} has {onnx_file.stat().st_size} bytes, the metadata beside it says "
                                  f"{record['bytes']}: files from different exports (re-export the model)")
        self.model_file = onnx_file
        providers = ["CPUExecutionProvider"]
        self.use_gpu = False
        if self.settings.use_gpu:
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
                self.use_gpu = True
            else:
                self.logger.warning("warning: --use_gpu=True but this onnxruntime has no CUDA provider: running on CPU")
        if self.settings.use_tensorrt or self.settings.enable_mkldnn or self.settings.precision != "fp32":
            self.logger.info("note: --use_tensorrt, --enable_mkldnn and --precision apply to the paddle backend only")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.threads = int(self.settings.cpu_threads or available_cpus())
        options.intra_op_num_threads = self.threads
        if not self.settings.ir_optim:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_file), sess_options=options, providers=providers)
        except _onnxruntime_load_errors() as exc:
            raise DeployError(f"onnxruntime cannot load {onnx_file}: {_first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        names = [output.name for output in self.session.get_outputs()]
        if meta is not None and meta.get("onnx"):
            wanted = list(meta["onnx"]["outputs"])
            if sorted(wanted) != sorted(names):
                raise DeployError(f"{onnx_file} has outputs {names}, its metadata says {wanted}")
            names = wanted
        if len(names) != 2:
            raise DeployError(f"{onnx_file} has {len(names)} outputs, expected 2 (map, score)")
        self.output_names = names

    def __call__(self, images: np.ndarray):
        images = np.ascontiguousarray(images, dtype=np.float32)
        anomaly_map, image_score = self.session.run(self.output_names, {self.input_name: images})
        return anomaly_map, image_score

    def conf_info(self) -> dict:
        return {"runtime_device": "gpu" if self.use_gpu else "cpu",
                "ir_optim": bool(self.settings.ir_optim),
                "enable_memory_optim": True,
                "enable_tensorrt": False,
                "enable_mkldnn": False,
                "cpu_math_library_num_threads": self.threads}

    @property
    def precision(self) -> str:
        return "fp32"


# --------------------------------------------------------------------------- opening an export

@dataclass
class DeployedModel:
    runtime: object          # PaddleInferenceModel or OnnxModel
    meta: dict
    model_file: Path


def resolve_model_file(model_file, backend: str | None = None, logger: logging.Logger | None = None) -> tuple[Path, str]:
    """(graph file, backend) from what the user typed: a graph file, an ``.onnx`` file or a folder.

    The backend defaults to onnxruntime for an ``.onnx`` path, else paddle. A ``.pdmodel`` path
    (the original's file name) that does not exist falls back to the ``.json`` beside it.
    """
    logger = logger or LOGGER
    path = Path(model_file)
    if path.is_dir():
        path = path / (GRAPH_NAME + PIR_SUFFIX)
    if backend is None:
        backend = "onnxruntime" if path.suffix == ONNX_SUFFIX else "paddle"
    if backend not in ("paddle", "onnxruntime"):
        raise DeployError(f"backend must be paddle or onnxruntime, got {backend!r}")
    if backend == "paddle":
        if path.suffix == ONNX_SUFFIX:
            raise DeployError(f"{path} is an ONNX model: use --backend onnxruntime, or give the .json graph")
        if path.suffix == LEGACY_SUFFIX and not path.exists():
            pir = path.with_suffix(PIR_SUFFIX)
            if pir.is_file():
                logger.info(f"note: {path} does not exist; Paddle 3 exports the PIR graph {pir.name}, using it")
                path = pir
    elif path.suffix != ONNX_SUFFIX:
        path = path.with_name(_stem(path) + ONNX_SUFFIX)
    if not path.is_file():
        hint = "export it with export_model.py --onnx=True" if backend == "onnxruntime" else "run export_model.py first"
        raise DeployError(f"inference model not found: {path} ({hint})")
    return path, backend


def open_deployed(model_file, params_file=None, backend: str | None = None,
                  settings: InferenceSettings | None = None, logger: logging.Logger | None = None) -> DeployedModel:
    """Find the graph and its metadata, check they belong together, and build the runtime."""
    path, backend = resolve_model_file(model_file, backend, logger)
    meta = load_metadata(path)
    return DeployedModel(build_runtime(path, backend, meta, params_file, settings, logger), meta, path)


def build_runtime(path: Path, backend: str, meta: dict, params_file=None, settings: InferenceSettings | None = None,
                  logger: logging.Logger | None = None):
    if backend == "onnxruntime":
        return OnnxModel(path, settings, meta=meta, logger=logger)
    return PaddleInferenceModel(path, params_file, settings, meta=meta, logger=logger)
