"""Export: the whole PaDiM pipeline (image batch -> anomaly map + image score) traced into one
static graph, its metadata file, and optionally ONNX. Running an export is models/deploy.py's.

Exported files in ``save_dir`` (``model`` is GRAPH_NAME):

- ``model.json`` + ``model.pdiparams``: the PIR static graph that Paddle 3 writes with
  ``paddle.jit.save``; the backbone weights (each batch norm folded into the convolution before
  it), the Gaussian (mean, whitening), the channel indices and the smoothing matrices are all
  inside the parameters file. Folding at export spares Paddle Inference the work at every
  start: its constant-folding pass would otherwise build the same weights each time a
  predictor is created, the largest part of its set-up. Input ``image`` float32
  [N,3,H,W] (preprocessed as in training); outputs, in order, the anomaly map [N,H,W] in
  Mahalanobis units and the image score [N].
- ``model.meta.json``: everything else infer.py needs (preprocessing, thresholds and their
  source, the colour scale, input/output names) and the size and SHA-256 of every file, so that
  the runtime refuses a parameters file from another export. Hashing reads each file once: for
  the largest models' parameters (several GB) that adds a few seconds to the export.
- ``model.onnx`` (optional): the same graph converted by paddle2onnx, which reads the PIR
  ``.json`` directly (it converts a legacy ``.pdmodel`` to ``.json`` itself first).

Nothing here parses flags, calls sys.exit, or builds a model from a file (models/pipeline.py
does, then calls export_model). Paddle is imported lazily.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.deploy import (GRAPH_NAME, INFERENCE_FORMAT, INFERENCE_FORMAT_VERSION, INPUT_NAME, LEGACY_SUFFIX,
                           META_SUFFIX, ONNX_SUFFIX, OUTPUTS, PARAMS_SUFFIX, PIR_SUFFIX, DeployError,
                           InferenceSettings, OnnxModel, PaddleInferenceModel, file_record, finite_results,
                           without_glog_lines)
from models.model_file import VERSION, ModelMeta
from utils.numbers import max_relative_difference

LOGGER = logging.getLogger("padim")

DEFAULT_OPSET = 13
PARITY_RTOL = 1e-3
ONNX_LIMIT_BYTES = 2 ** 31 - (1 << 24)   # 2 GiB, less room for the graph itself
# Copied from the model file into the exported metadata as they are.
MODEL_FIELDS = ("category", "backbone", "weights_source", "stage_names", "d", "seed", "eps", "sigma", "n_train",
                "resize", "crop_size", "feature_grid", "normalisation", "train_statistics", "calibration", "model_id")


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce the dynamic model (a bug, not a user error)."""


# --------------------------------------------------------------------------- metadata

def build_metadata(model_meta: ModelMeta, model_path, graph_file: Path, params_file: Path,
                   output_names: list, onnx_file: Path | None = None, onnx_io: dict | None = None,
                   parity: dict | None = None) -> dict:
    """The deployment metadata: infer.py needs nothing else besides the graph files."""
    height, width = model_meta.image_size
    thresholds = model_meta.decision_thresholds()
    vmin, vmax = model_meta.display_range()
    record = model_meta.to_dict()
    files = {"model": file_record(graph_file), "params": file_record(params_file),
             "onnx": file_record(onnx_file) if onnx_file is not None else None}
    return {
        "format": INFERENCE_FORMAT,
        "format_version": INFERENCE_FORMAT_VERSION,
        "version": VERSION,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source_model": str(model_path),
        "source_model_created": model_meta.created,
        **{key: record[key] for key in MODEL_FIELDS},
        "preprocessing": "RGB; resize (PIL bilinear) the shorter side to `resize`, or to exactly [H, W] when "
                         "it is a pair; centre crop `crop_size` (H, W; null: no crop); /255; (x - mean) / std "
                         "per channel; NCHW float32",
        "thresholds": {"image_threshold": float(thresholds["image_threshold"]),
                       "pixel_threshold": float(thresholds["pixel_threshold"]),
                       "source": thresholds["source"]},
        "display": {"vmin": vmin, "vmax": vmax,
                    "rule": "vmin = median training pixel score; vmax = pixel threshold + "
                            "(pixel threshold - vmin), so the threshold sits mid-scale"},
        "units": "anomaly map and image score are Mahalanobis distances (absolute, not normalised)",
        "inputs": [{"name": INPUT_NAME, "shape": [-1, 3, height, width], "dtype": "float32"}],
        "outputs": [{"name": output_names[0], "meaning": OUTPUTS[0], "shape": [-1, height, width], "dtype": "float32"},
                    {"name": output_names[1], "meaning": OUTPUTS[1], "shape": [-1], "dtype": "float32"}],
        "onnx": onnx_io,
        "files": files,
        "export_check": parity,
    }


# --------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    save_dir: Path
    files: list
    meta: dict
    parity: dict = field(default_factory=dict)


def check_export_request(model_meta: ModelMeta, img_size=None, onnx: bool = False) -> None:
    """Refuse what cannot be exported before anything is loaded: --img_size must be the input size
    the Gaussian was fitted at (it is per position), --onnx needs paddle2onnx."""
    size = tuple(model_meta.image_size)
    if img_size is not None and tuple(int(v) for v in img_size) != size:
        given = "x".join(str(int(v)) for v in img_size)
        raise DeployError(f"--img_size {given} does not match the model's input size {size[0]}x{size[1]}: the "
                          f"Gaussian is fitted per feature position, so the input size is fixed at fit time "
                          f"(omit --img_size, or refit with train.py --crop_size {given})")
    if onnx and importlib.util.find_spec("paddle2onnx") is None:
        raise DeployError("--onnx=True needs paddle2onnx (pip install paddle2onnx==2.1.0)")


def probe_batch(height: int, width: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic batch in the range of normalised images, for export checks."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, height, width)).astype(np.float32)


def _batch_norm_pairs(layer) -> list[tuple[str, str]]:
    """(convolution, batch norm) child names of ``layer`` where the norm takes the convolution's
    output directly: consecutive children of a Sequential, or ``convN`` and ``bnN`` (ResNet's
    blocks and stem)."""
    from paddle import nn

    children = dict(layer.named_children())
    names = list(children)
    pairs = []
    for position, name in enumerate(names):
        if not isinstance(children[name], nn.Conv2D):
            continue
        if isinstance(layer, nn.Sequential):
            partner = names[position + 1] if position + 1 < len(names) else None
        else:
            partner = "bn" + name[len("conv"):] if name.startswith("conv") else None
        if partner is not None and isinstance(children.get(partner), nn.BatchNorm2D):
            pairs.append((name, partner))
    return pairs


def fold_batch_norms(model) -> int:
    """Fold every inference-mode batch norm into the convolution that feeds it, in place:
    ``conv(x) * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)`` becomes one
    convolution with scaled weights and a bias, and the norm an identity. The outputs stay the
    same to float32 rounding. Returns the number of norms folded."""
    from paddle import nn

    folded = 0
    for layer in [model, *model.sublayers()]:
        for conv_name, norm_name in _batch_norm_pairs(layer):
            conv, norm = getattr(layer, conv_name), getattr(layer, norm_name)
            if getattr(conv, "_data_format", "NCHW") != "NCHW" or getattr(norm, "_data_format", "NCHW") != "NCHW":
                continue
            channels = int(conv.weight.shape[0])
            gamma = norm.weight.numpy().astype(np.float64) if norm.weight is not None else np.ones(channels)
            beta = norm.bias.numpy().astype(np.float64) if norm.bias is not None else np.zeros(channels)
            scale = gamma / np.sqrt(norm._variance.numpy().astype(np.float64) + float(norm._epsilon))
            bias = conv.bias.numpy().astype(np.float64) if conv.bias is not None else np.zeros(channels)
            weight = conv.weight.numpy().astype(np.float64) * scale[:, None, None, None]
            conv.weight.set_value(weight.astype(np.float32))
            if conv.bias is None:
                conv.bias = conv.create_parameter([channels], is_bias=True,
                                                  default_initializer=nn.initializer.Constant(0.0))
            conv.bias.set_value(((bias - norm._mean.numpy().astype(np.float64)) * scale + beta).astype(np.float32))
            setattr(layer, norm_name, nn.Identity())
            folded += 1
    return folded


# Paddle 3.3.1 logs this through glog (stderr, C++) while tracing any batch-norm layer; it is not
# about our graph and says nothing a user can act on.
KNOWN_GLOG_WARNING = "Paddle static graph(PIR) not support input out tensor"


def save_static_graph(model, height: int, width: int, prefix: Path) -> Path:
    """Trace ``model`` (images [N, 3, height, width] -> outputs) and save it as ``prefix``.json
    (or .pdmodel) + .pdiparams; returns the graph file."""
    import paddle

    spec = [paddle.static.InputSpec([-1, 3, height, width], "float32", name=INPUT_NAME)]
    with without_glog_lines(KNOWN_GLOG_WARNING):
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
        raise DeployError(f"--onnx=True: this model has {total / 2 ** 30:.2f} GiB of parameters ({meta.backbone}, "
                          f"d={meta.d}, {meta.feature_grid[0]}x{meta.feature_grid[1]} positions); "
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


def export_model(model, model_meta: ModelMeta, model_path, save_dir, onnx: bool = False, opset: int = DEFAULT_OPSET,
                 verify: bool = True, logger: logging.Logger | None = None) -> ExportResult:
    """Export ``model`` (the PaDiM layer built from the model file ``model_path``, which
    ``model_meta`` describes) to ``save_dir``. Files are written into a temp folder inside
    ``save_dir`` and moved into place only once complete (the metadata last). A model that gives
    NaN or infinite values on the probe batch is refused, whether or not ``verify`` is on.
    ``model`` is consumed: its batch norms are folded into its convolutions before tracing."""
    import paddle

    logger = logger or LOGGER
    height, width = model_meta.image_size
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=save_dir))
    try:
        # The reference comes first: to_static replaces the layer's forward with the static program.
        probe = probe_batch(height, width)
        with paddle.no_grad():
            expected_map, expected_score = (t.numpy() for t in model(paddle.to_tensor(probe)))
        if not finite_results(expected_map, expected_score).all():
            raise DeployError(f"{model_path} gives NaN or infinite anomaly maps on a probe batch: not exported "
                              f"(refit the model)")
        fold_batch_norms(model)
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
