"""The deploy runtime: run an exported PaDiM graph (from export_model.py) and read its metadata.

``<dir>/model.json`` + ``model.pdiparams`` (Paddle Inference) or ``model.onnx`` (onnxruntime),
and ``model.meta.json`` beside them: preprocessing, thresholds, colour scale, input/output names,
and the size and SHA-256 of each file, checked when a runtime is built so that a parameters file
from another export is refused. Every runtime is a ``Predictor``: ``predictor(images [N,3,H,W]
float32, preprocessed as in training) -> (anomaly maps [N,H,W], image scores [N])``, both in
Mahalanobis units.

This module imports nothing from training (no backbone, no PaDiM layer, no dataset): NumPy, the
model file's schema checks, and Paddle Inference or onnxruntime, loaded when a runtime is built.
Paddle Inference is loaded on its own where Paddle is not imported yet (``inference_library``):
its compiled module holds the whole runtime, and ``import paddle`` would add the training,
distributed and dataset code of the framework before the first image.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.model_file import (ModelFileError, SchemaError, check_dict, check_geometry, check_int, check_list,
                               check_normalisation, check_number, check_str, check_thresholds, display_range,
                               first_line)
from utils.numbers import available_cpus

LOGGER = logging.getLogger("padim")

GRAPH_NAME = "model"
PIR_SUFFIX = ".json"
LEGACY_SUFFIX = ".pdmodel"
PARAMS_SUFFIX = ".pdiparams"
META_SUFFIX = ".meta.json"
ONNX_SUFFIX = ".onnx"
INFERENCE_FORMAT = "padim-paddle-inference"
INFERENCE_FORMAT_VERSION = 2
INPUT_NAME = "image"
OUTPUTS = ("anomaly_map", "image_score")
PRECISIONS = ("fp32", "fp16", "int8")
META_MAX_BYTES = 16 << 20


class DeployError(ModelFileError):
    """An exported model is missing, incomplete, inconsistent, or does not fit the request."""


class NonFiniteOutputError(DeployError):
    """A runtime gave NaN or infinite maps or scores: no verdict for those images."""


# --------------------------------------------------------------------------- files and metadata

def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def metadata_path(model_file) -> Path:
    """``<dir>/model.json`` (or ``.pdmodel``/``.onnx``) -> ``<dir>/model.meta.json``."""
    path = Path(model_file)
    return path.with_name(_stem(path) + META_SUFFIX)


def file_record(path: Path) -> dict:
    """Name, size and SHA-256 of an exported file. Hashing reads the whole file: for the largest
    models' parameters (several GB) that takes a few seconds, once per export and runtime."""
    with open(path, "rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest}


def _check_file_record(value, name: str) -> dict:
    check_dict(value, name, ("name", "bytes", "sha256"))
    digest = check_str(value["sha256"], f"{name}.sha256")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise SchemaError(f"{name}.sha256 must be 64 hex digits, got {digest[:70]!r}")
    return {"name": check_str(value["name"], f"{name}.name"), "bytes": check_int(value["bytes"], f"{name}.bytes", 0),
            "sha256": digest}


def _check_names(value, name: str, length: int | None = None) -> list:
    return check_list(value, name, check_str, length)


def _check_exported(meta) -> dict:
    """The fields infer.py relies on, checked; the rest is informational and kept as it is."""
    check_dict(meta, "the metadata", ("category", "backbone", "model_id", "resize", "crop_size", "normalisation",
                                      "thresholds", "display", "inputs", "outputs", "files"))
    for key in ("category", "backbone", "model_id"):
        check_str(meta[key], key)
    check_geometry(meta["resize"], meta["crop_size"])
    check_normalisation(meta["normalisation"])
    check_thresholds(meta["thresholds"])
    display = check_dict(meta["display"], "display", ("vmin", "vmax"))
    check_number(display["vmin"], "display.vmin")
    check_number(display["vmax"], "display.vmax")
    for key, length in (("inputs", 1), ("outputs", 2)):
        check_list(meta[key], key, lambda v, n: check_str(check_dict(v, n, ("name",))["name"], f"{n}.name"), length)
    files = check_dict(meta["files"], "files", ("model", "params"))
    for key in ("model", "params"):
        _check_file_record(files[key], f"files.{key}")
    if files.get("onnx") is not None:
        _check_file_record(files["onnx"], "files.onnx")
        onnx = check_dict(meta.get("onnx"), "onnx", ("inputs", "outputs"))
        _check_names(onnx["inputs"], "onnx.inputs", 1)
        _check_names(onnx["outputs"], "onnx.outputs", 2)
    return meta


def load_metadata(model_file) -> dict:
    """The metadata file beside ``model_file``, checked; DeployError when missing, not ours or damaged."""
    path = metadata_path(model_file)
    if not path.is_file():
        raise DeployError(f"metadata file not found: {path} (it is written by export_model.py beside "
                          f"the graph; re-export the model)")
    if path.stat().st_size > META_MAX_BYTES:
        raise DeployError(f"{path} is not a PaDiM-Paddle inference metadata file ({path.stat().st_size} bytes)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise DeployError(f"{path} is not a readable metadata file ({first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != INFERENCE_FORMAT:
        raise DeployError(f"{path} is not a PaDiM-Paddle inference metadata file")
    if meta.get("format_version") != INFERENCE_FORMAT_VERSION:
        raise DeployError(f"{path} has inference format version {meta.get('format_version')!r:.20}, this version "
                          f"reads {INFERENCE_FORMAT_VERSION}: re-export the model")
    try:
        return _check_exported(meta)
    except SchemaError as exc:
        raise DeployError(f"{path}: damaged metadata: {exc}") from None


def exported_display_range(meta: dict, pixel_threshold: float | None = None) -> tuple[float, float]:
    """The exported colour scale, or the same rule around ``pixel_threshold`` when one is given."""
    if pixel_threshold is None:
        return float(meta["display"]["vmin"]), float(meta["display"]["vmax"])
    return display_range(meta["display"]["vmin"], pixel_threshold)


def _file_record_of(meta: dict, key: str, path: Path) -> dict:
    record = (meta.get("files") or {}).get(key)
    if record is None:
        raise DeployError(f"{metadata_path(path)} lists no {key} file: {path} is not from this export (re-export "
                          f"the model{' with --onnx=True' if key == 'onnx' else ''})")
    return record


def _check_size(meta: dict, key: str, path: Path) -> None:
    record = _file_record_of(meta, key, path)
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DeployError(f"{path} has {size} bytes, the metadata beside it says {record['bytes']}: files from "
                          f"different exports (re-export the model)")


def _digest_error(meta: dict, key: str, path: Path) -> DeployError | None:
    try:
        digest = file_record(path)["sha256"]
    except OSError as exc:
        return DeployError(f"cannot read {path}: {exc.strerror or exc}")
    if digest != _file_record_of(meta, key, path)["sha256"]:
        return DeployError(f"{path} is not the file its metadata describes (SHA-256 differs): files from different "
                           f"exports, or a damaged file (re-export the model)")
    return None


class FileCheck:
    """The exported files against their metadata: sizes at once, SHA-256 in a thread while the
    engine loads them (hashlib releases the GIL, so the hash is off the way to the first image). ``result()`` waits for it and raises the DeployError of the first mismatch;
    a runtime calls it before it is used, and before reporting a failure of its engine (a file
    from another export explains that failure better)."""

    def __init__(self, meta: dict | None, files: list[tuple[str, Path]]):
        self._error = None
        self._thread = None
        if meta is None:
            return
        for key, path in files:
            _check_size(meta, key, path)
        self._thread = threading.Thread(target=self._hash, args=(meta, files), name="padim-sha256", daemon=True)
        self._thread.start()

    def _hash(self, meta: dict, files: list) -> None:
        for key, path in files:
            try:
                self._error = _digest_error(meta, key, path)
            except Exception as exc:   # noqa: BLE001 - a check that could not run must not pass
                self._error = DeployError(f"cannot check {path} against its metadata: {type(exc).__name__}: {exc}")
            if self._error is not None:
                return

    def result(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


def finite_results(maps: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[N] bool: True where image i's score and every pixel of its map are finite. A runtime
    that gives NaN has no verdict for that image (NaN > threshold is False: "normal")."""
    maps = np.asarray(maps)
    return np.isfinite(np.asarray(scores)) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)


def non_finite_error(failed: int, total: int) -> NonFiniteOutputError:
    """The error a script raises at the end of a run in which ``failed`` images had no verdict."""
    return NonFiniteOutputError(f"{failed} of {total} image(s) got a NaN or infinite anomaly map or score and no "
                                f"verdict: the model or its parameters are damaged (refit or re-export it)")


# --------------------------------------------------------------------------- Paddle Inference

_LIBRARY_MODULE = "paddle.base.libpaddle"


def inference_library():
    """Paddle Inference's bindings (Config = ``AnalysisConfig``, ``create_predictor``, tensor
    handles): ``paddle.base.core`` once Paddle is imported; before that, Paddle's compiled module
    alone, registered under its package name so that a later ``import paddle`` in this process
    takes the same copy. Where it cannot be loaded alone, Paddle is imported."""
    for name in ("paddle.base.core", _LIBRARY_MODULE):
        if name in sys.modules:
            return sys.modules[name]
    # Intel OpenMP's threads spin for KMP_BLOCKTIME after each parallel region before they sleep
    # (its default is far longer than the gap between two batches); with threads decoding the
    # next batch on the same cores, that spinning takes their CPU. The shortest setting still
    # spans the gaps between the ops of one run. Read when OpenMP starts, so only where nothing
    # has started it yet; a value the user set is kept.
    os.environ.setdefault("KMP_BLOCKTIME", "1")
    library = _load_compiled_module()
    if library is None:
        from paddle.base import core

        return core
    return library


def _load_compiled_module():
    """``libpaddle`` from the installed paddle package without running the package (None where
    it is not found or does not load that way), with the FLAGS_* environment variables read and
    glog set up as ``import paddle`` does (both can be done again by a later import)."""
    spec = importlib.util.find_spec("paddle")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "base"
    candidates = [folder / f"libpaddle{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        return None
    try:
        module_spec = importlib.util.spec_from_file_location(_LIBRARY_MODULE, path)
        library = importlib.util.module_from_spec(module_spec)
        sys.modules[_LIBRARY_MODULE] = library
        module_spec.loader.exec_module(library)
        flags = [name[len("FLAGS_"):] for name in library.globals().keys() if name.startswith("FLAGS_")]
        library.init_gflags(["--tryfromenv=" + ",".join(flags)])
        library.init_glog(sys.argv[0] if sys.argv and sys.argv[0] else "padim")
    except (ImportError, OSError, AttributeError, RuntimeError):
        for name in [name for name in sys.modules if name.startswith(_LIBRARY_MODULE)]:
            del sys.modules[name]
        return None
    return library


def cpu_supports_bfloat16() -> bool:
    """Whether oneDNN can run bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    return bool(inference_library().supports_bfloat16())


@contextlib.contextmanager
def without_glog_lines(*known: str):
    """Capture file descriptor 2 (glog writes there, not to sys.stderr) and pass on every line
    but those containing one of ``known``: Paddle's messages that say nothing a user can act on."""
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
                if not any(text in line for text in known):
                    sys.stderr.write(line)
            sys.stderr.flush()


# Logged by Config.enable_mkldnn_bfloat16 whenever it is called on a CPU that has bf16.
BFLOAT16_INFO = "Hardware support for BFLOAT16 is enabled"

# With bfloat16 on, Paddle 3.3.1's predictor fails to build our graph after this pass has fused a
# reshape into one of the Gaussian's matmuls: "In operator matmul, the [1] dimension of Input(X)
# must be equal to the [0] dimension of Input(Y)". Without the pass the graph builds.
BFLOAT16_BLOCKED_PASS = "operator_reshape_onednn_fuse_pass"

# Which ops run in bf16 is not ours to choose: on a PIR graph, Paddle's bf16 placement pass takes
# every oneDNN op it can (Config.set_bfloat16_op is read by the legacy passes only). Keeping the
# Gaussian and the map in fp32 would not help anyway: measured with the graph cut in two, bf16
# in the backbone alone moves the scores and maps as far as bf16 everywhere, and so does bf16 in
# any one of its stages. The backbone's rounding is an error in every feature, and the whitening
# magnifies it in the directions where the training images hardly vary; it stands out most
# where the true distance is small.
BFLOAT16_NOTE = ("note: oneDNN bfloat16 moves image scores by up to a few percent from fp32's, and the low parts "
                 "of anomaly maps more: verdicts of images that close to the threshold may differ from fp32's")


# --------------------------------------------------------------------------- runtimes

@dataclass
class InferenceSettings:
    """The original infer.py's predictor options (its flags of the same names)."""
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
    logger = logger or LOGGER
    if not inference_library().is_compiled_with_cuda():
        logger.warning("warning: --use_gpu=True but this Paddle build has no CUDA: running on CPU")
        return False
    import paddle

    if paddle.device.cuda.device_count() == 0:
        logger.warning("warning: --use_gpu=True but no GPU is visible: running on CPU")
        return False
    return True


class Predictor:
    """A runtime over one exported graph, in the manner of PaddleClas's deploy predictors.

    ``predictor(images [N,3,H,W] float32) -> (anomaly maps [N,H,W], image scores [N])`` as NumPy
    arrays in Mahalanobis units. Subclasses build their engine in ``__init__`` (setting
    ``use_gpu``, ``input_name`` and ``output_names``) and implement ``run`` and ``conf_info``.
    """

    backend = ""
    use_gpu = False
    precision = "fp32"      # what the engine really runs, after any fallback

    def __call__(self, images) -> tuple:
        return self.run(np.ascontiguousarray(images, dtype=np.float32))

    def run(self, images: np.ndarray) -> tuple:
        raise NotImplementedError

    def conf_info(self) -> dict:
        """The AutoLog "Conf info" fields: what the engine was configured with."""
        raise NotImplementedError


class PaddleInferenceModel(Predictor):
    """Paddle Inference over the exported graph (``model.json`` + ``model.pdiparams``), with
    zero-copy handles. With ``meta`` (the export's metadata) the files must be the ones it lists
    and the outputs are taken in its order; without it (a graph traced in memory) the graph's
    own order. ``n_outputs=None`` accepts a graph with any outputs (models/static.py runs the
    backbone alone through it).
    """

    backend = "paddle"

    def __init__(self, model_file, params_file=None, settings: InferenceSettings | None = None,
                 meta: dict | None = None, logger: logging.Logger | None = None, n_outputs: int | None = 2):
        self.logger = logger or LOGGER
        self.settings = settings or InferenceSettings()
        model_file = Path(model_file)
        params_file = Path(params_file) if params_file else model_file.with_name(_stem(model_file) + PARAMS_SUFFIX)
        for path, what in ((model_file, "inference model"), (params_file, "parameters file")):
            if not path.is_file():
                raise DeployError(f"{what} not found: {path} (run export_model.py first)")
        self.model_file, self.params_file = model_file, params_file
        s = self.settings
        if s.precision not in PRECISIONS:
            raise DeployError(f"precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
        files = FileCheck(meta, [("model", model_file), ("params", params_file)])
        library = inference_library()
        self.use_gpu = gpu_available(s.use_gpu, self.logger)
        self.use_tensorrt = bool(s.use_tensorrt and self.use_gpu)
        if s.use_tensorrt and not self.use_gpu:
            self.logger.warning("warning: --use_tensorrt=True needs the GPU: ignored on CPU")
        self.bfloat16 = False
        self.memory_optim = model_file.suffix == LEGACY_SUFFIX
        want_bf16 = False
        if not self.use_gpu and s.precision != "fp32":
            if s.precision == "fp16" and s.enable_mkldnn and cpu_supports_bfloat16():
                want_bf16 = True
            else:
                reason = ("fp16 on CPU means oneDNN bfloat16, which needs --enable_mkldnn=True and a CPU with "
                          "bf16 support" if s.precision == "fp16" else "int8 needs TensorRT on a GPU")
                self.logger.warning(f"warning: --precision {s.precision}: {reason}; running fp32")
        self.predictor = None
        if want_bf16:
            self.config = self._config(library, True)
            try:
                self.predictor = library.create_predictor(self.config)
                self.bfloat16 = True
                self.logger.info(BFLOAT16_NOTE)
            except (ValueError, RuntimeError) as exc:
                files.result()
                self.logger.warning(f"warning: Paddle Inference cannot run this graph in oneDNN bfloat16 "
                                    f"({first_line(exc)}); running fp32")
        if self.predictor is None:
            self.config = self._config(library, False)
            try:
                self.predictor = library.create_predictor(self.config)
            except (ValueError, RuntimeError, OSError) as exc:
                files.result()
                raise DeployError(f"Paddle Inference cannot load {model_file} with {params_file.name}: "
                                  f"{first_line(exc)}") from None
        files.result()
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
        # paddle.inference wraps this binding in a type check; loaded alone, the binding is all there is.
        self._copy_in = getattr(self._input, "copy_from_cpu", None) or self._input._copy_from_cpu_bind
        self._outputs = [self.predictor.get_output_handle(name) for name in names]

    def _config(self, library, bfloat16: bool):
        s = self.settings
        config = library.AnalysisConfig(str(self.model_file), str(self.params_file))
        precisions = library.AnalysisConfig.Precision
        if self.use_gpu:
            if s.precision == "fp16" and not self.use_tensorrt:
                config.enable_use_gpu(int(s.gpu_mem), int(s.gpu_id), precisions.Half)
            else:
                config.enable_use_gpu(int(s.gpu_mem), int(s.gpu_id))
            if self.use_tensorrt:
                precision = {"fp32": precisions.Float32, "fp16": precisions.Half, "int8": precisions.Int8}[s.precision]
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
                    with without_glog_lines(BFLOAT16_INFO):
                        config.enable_mkldnn_bfloat16()
                    config.delete_pass(BFLOAT16_BLOCKED_PASS)
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

    def run(self, images: np.ndarray) -> tuple:
        self._input.reshape(list(images.shape))
        self._copy_in(images)
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


def _onnxruntime_load_errors() -> tuple:
    """onnxruntime's load failures: its own exception classes, which derive from Exception only."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail", "InvalidArgument", "NotImplemented",
             "RuntimeException")
    return tuple(getattr(state, name) for name in names if hasattr(state, name)) + (RuntimeError, ValueError)


class OnnxModel(Predictor):
    """The exported ``model.onnx`` under onnxruntime."""

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
        files = FileCheck(meta, [("onnx", onnx_file)])
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
            files.result()
            raise DeployError(f"onnxruntime cannot load {onnx_file}: {first_line(exc)}") from None
        files.result()
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

    def run(self, images: np.ndarray) -> tuple:
        anomaly_map, image_score = self.session.run(self.output_names, {self.input_name: images})
        return anomaly_map, image_score

    def conf_info(self) -> dict:
        return {"runtime_device": "gpu" if self.use_gpu else "cpu",
                "ir_optim": bool(self.settings.ir_optim),
                "enable_memory_optim": True,
                "enable_tensorrt": False,
                "enable_mkldnn": False,
                "cpu_math_library_num_threads": self.threads}


# --------------------------------------------------------------------------- opening an export

@dataclass
class DeployedModel:
    runtime: Predictor
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
                  logger: logging.Logger | None = None) -> Predictor:
    """The runtime for ``backend`` over ``path``; its files must be those ``meta`` lists (size and
    SHA-256), so parameters from another export are refused here."""
    if backend == "onnxruntime":
        return OnnxModel(path, settings, meta=meta, logger=logger)
    return PaddleInferenceModel(path, params_file, settings, meta=meta, logger=logger)
