"""The self-contained model file (``best.pdparams``): a NumPy ``.npz`` archive, no pickle.

It holds everything predict/val/export need: the metadata (``ModelMeta``: backbone, stages,
image geometry, eps, seed, the calibration's thresholds and score statistics and, once val.py
has run, its F1-max thresholds), ``idx``, the Gaussian (mean + whitening) and the backbone
weights. Arrays are streamed into the archive, so a large whitening tensor is not copied in
memory while saving, and loading never runs pickled code.

The file is untrusted when read: every member's shape and dtype come from its ``.npy`` header
and are checked against the metadata before any array is read, members must be stored
uncompressed (so no member can declare more bytes than the file holds), the metadata is checked
against ModelMeta's schema, and non-finite statistics or weights are refused.

This module is the bottom layer: NumPy and the standard library only (and models.calibration,
the verdict rules in NumPy, whose record it checks), no training code, so the deploy runtime can
use its schema checks and ``display_range``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from models.calibration import Calibration, CalibrationError
from utils.files import write_atomically

FORMAT = "padim-paddle-model"
FORMAT_VERSION = 3
VERSION = "1.0.0"            # the software version recorded in model and export metadata
META_KEY = "__meta__"
BACKBONE_PREFIX = "backbone/"
GAUSSIAN_KEYS = ("idx", "mean", "whitening")
KNOWN_BACKBONES = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2")
# Every known backbone's first stage (the embedding's grid) has stride 4: grid = ceil(crop / 4).
FEATURE_STRIDE = 4
MAX_SIDE = 16384             # pixels: a larger resize/crop is a damaged file, not a photograph
META_MAX_BYTES = 4 << 20
MAX_MEMBERS = 10000
FINITE_CHECK_ELEMENTS = 1 << 22  # isfinite runs over slices this long: no full-size temporary


class ModelFileError(ValueError):
    """The model file is missing, damaged, from another version, or does not fit the request."""


class SchemaError(ValueError):
    """One field of a metadata record breaks the schema; the caller names the file."""


# --------------------------------------------------------------------------- field checks
# Shared with the exported metadata's reader (models/deploy.py).

def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_dict(value, name: str, required=()) -> dict:
    if not isinstance(value, dict):
        raise SchemaError(f"{name} must be a mapping, got {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise SchemaError(f"{name} lacks {', '.join(missing)}")
    return value


def check_str(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise SchemaError(f"{name} must be a non-empty string, got {_shown(value)}")
    return value


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SchemaError(f"{name} must be an integer, got {_shown(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise SchemaError(f"{name} must be {bounds}, got {value}")
    return value


def check_number(value, name: str, low: float | None = None, positive: bool = False) -> float:
    """A finite number (int or float, not bool), optionally >= ``low`` or > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SchemaError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise SchemaError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise SchemaError(f"{name} must be > 0, got {value}")
    if low is not None and value < low:
        raise SchemaError(f"{name} must be >= {low}, got {value}")
    return value


def check_list(value, name: str, item, length: int | None = None) -> list:
    """A list whose entries pass ``item(entry, name)``; ``length`` fixes its size."""
    if not isinstance(value, list) or (length is not None and len(value) != length) or not value:
        size = f"{length} entries" if length is not None else "entries"
        raise SchemaError(f"{name} must be a list of {size}, got {_shown(value)}")
    return [item(entry, f"{name}[{i}]") for i, entry in enumerate(value)]


def check_size(value, name: str) -> list:
    """[height, width] in pixels (or grid cells), each 1..MAX_SIDE."""
    return check_list(value, name, lambda v, n: check_int(v, n, 1, MAX_SIDE), length=2)


def check_normalisation(value, name: str = "normalisation") -> dict:
    check_dict(value, name, ("mean", "std"))
    return {"mean": check_list(value["mean"], f"{name}.mean", check_number, length=3),
            "std": check_list(value["std"], f"{name}.std", lambda v, n: check_number(v, n, positive=True), length=3)}


def check_thresholds(value, name: str = "thresholds") -> dict:
    """Image and pixel thresholds (finite) and their source; further keys are kept as they are."""
    check_dict(value, name, ("image_threshold", "pixel_threshold", "source"))
    return dict(value, image_threshold=check_number(value["image_threshold"], f"{name}.image_threshold"),
                pixel_threshold=check_number(value["pixel_threshold"], f"{name}.pixel_threshold"),
                source=check_str(value["source"], f"{name}.source"))


TRAIN_STATISTICS_SCORES = ("pixel_median", "pixel_p99", "pixel_max", "image_score_mean", "image_score_max")


def check_train_statistics(value, name: str = "train_statistics") -> dict:
    """Score range of training images (Mahalanobis units, >= 0); further keys are kept."""
    check_dict(value, name, ("n_images", *TRAIN_STATISTICS_SCORES))
    checked = dict(value, n_images=check_int(value["n_images"], f"{name}.n_images", 1))
    for key in TRAIN_STATISTICS_SCORES:
        checked[key] = check_number(value[key], f"{name}.{key}", low=0.0)
    return checked


def feature_grid_for(image_size) -> list:
    """The embedding grid [h, w] of an input [H, W]: ceil(H / 4), ceil(W / 4)."""
    return [-(-int(v) // FEATURE_STRIDE) for v in image_size]


def check_geometry(resize, crop_size) -> tuple:
    """(resize, crop_size) as stored: resize N (shorter side) or [H, W] (exact), crop_size [H, W]
    or None (no crop, which needs an exact resize); returns them with the input size [H, W]."""
    if isinstance(resize, list):
        resize = check_size(resize, "resize")
    else:
        resize = check_int(resize, "resize", 1, MAX_SIDE)
    if crop_size is None:
        if not isinstance(resize, list):
            raise SchemaError("crop_size null (no crop) needs resize [H, W]")
        return resize, None, resize
    crop_size = check_size(crop_size, "crop_size")
    if isinstance(resize, list) and (crop_size[0] > resize[0] or crop_size[1] > resize[1]):
        raise SchemaError(f"crop_size {crop_size} is larger than resize {resize}")
    return resize, crop_size, crop_size


def display_range(low: float, pixel_threshold: float) -> tuple[float, float]:
    """Fixed colour scale in absolute units: ``low`` (the median training pixel score) at the low
    end, the pixel threshold in the middle, so that colours mean the same thing in every picture."""
    high = pixel_threshold + max(pixel_threshold - low, 1e-6)
    return float(low), float(high)


# --------------------------------------------------------------------------- the metadata

def new_model_id() -> str:
    return uuid.uuid4().hex


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class ModelMeta:
    """Everything about a fitted model besides its arrays; the JSON record inside the model file.

    Sizes are [height, width] in pixels or feature cells. ``resize`` is N (shorter side) or
    [H, W] (exact), ``crop_size`` the centre crop [H, W] or None (datasets.geometry); the model's
    input is ``image_size`` and ``feature_grid`` = ceil(image_size / 4). ``d`` of the
    ``total_channels`` (= sum of ``channels``) embedding channels are kept; ``eps`` is added to
    the covariance diagonal, ``sigma`` is the blur in pixels. ``calibration`` holds the verdict
    thresholds (models.calibration.Calibration), ``train_statistics`` the score range of the
    calibration images (the colour scale's low end), both in Mahalanobis units.
    ``model_id`` is drawn anew by every fit: a metadata update checks it names the model on disk.
    """

    category: str
    backbone: str
    weights_source: str
    stage_names: list
    channels: list
    d: int
    seed: int
    eps: float
    sigma: float
    resize: int | list
    crop_size: list | None
    feature_grid: list
    normalisation: dict
    n_train: int
    train_statistics: dict
    calibration: Calibration
    model_id: str = field(default_factory=new_model_id)
    created: str = field(default_factory=_now)
    version: str = VERSION

    @property
    def total_channels(self) -> int:
        return int(sum(self.channels))

    @property
    def image_size(self) -> list:
        """[H, W] of the model's input: the crop, or the exact resize without one."""
        return list(self.crop_size if self.crop_size is not None else self.resize)

    @property
    def positions(self) -> int:
        return int(self.feature_grid[0]) * int(self.feature_grid[1])

    def to_dict(self) -> dict:
        return dict(asdict(self), total_channels=self.total_channels)

    @classmethod
    def from_dict(cls, record, where) -> "ModelMeta":
        """Check ``record`` against the schema; ModelFileError (one line naming ``where``) if not."""
        try:
            return cls._checked(record)
        except SchemaError as exc:
            raise ModelFileError(f"{where}: damaged metadata: {exc}") from None

    def validate(self, where) -> "ModelMeta":
        return type(self).from_dict(self.to_dict(), where)

    @classmethod
    def _checked(cls, record) -> "ModelMeta":
        names = [f.name for f in fields(cls)]
        optional = {"created", "version"}
        check_dict(record, "the metadata", [n for n in names if n not in optional] + ["total_channels"])
        unknown = sorted(set(record) - set(names) - {"total_channels", "format", "format_version"})
        if unknown:
            raise SchemaError(f"unknown key(s) {', '.join(unknown)}")
        backbone = check_str(record["backbone"], "backbone")
        if backbone not in KNOWN_BACKBONES:
            raise SchemaError(f"unknown backbone {_shown(backbone)} (known: {', '.join(KNOWN_BACKBONES)})")
        stage_names = check_list(record["stage_names"], "stage_names", check_str)
        channels = check_list(record["channels"], "channels", lambda v, n: check_int(v, n, 1),
                              length=len(stage_names))
        total = check_int(record["total_channels"], "total_channels", 1)
        if total != sum(channels):
            raise SchemaError(f"total_channels {total} is not the sum of channels {channels}")
        resize, crop, image_size = check_geometry(record["resize"], record["crop_size"])
        grid = check_size(record["feature_grid"], "feature_grid")
        if grid != feature_grid_for(image_size):
            raise SchemaError(f"feature_grid {grid} does not fit the input size {image_size} (expected "
                              f"{feature_grid_for(image_size)})")
        try:
            calibration = Calibration.from_dict(record["calibration"])
        except CalibrationError as exc:
            raise SchemaError(f"calibration: {exc}") from None
        return cls(
            category=check_str(record["category"], "category"),
            backbone=backbone,
            weights_source=check_str(record["weights_source"], "weights_source"),
            stage_names=stage_names,
            channels=channels,
            d=check_int(record["d"], "d", 1, total),
            seed=check_int(record["seed"], "seed"),
            eps=check_number(record["eps"], "eps", low=0.0),
            sigma=check_number(record["sigma"], "sigma", positive=True),
            resize=resize,
            crop_size=crop,
            feature_grid=grid,
            normalisation=check_normalisation(record["normalisation"]),
            n_train=check_int(record["n_train"], "n_train", 1),
            train_statistics=check_train_statistics(record["train_statistics"]),
            calibration=calibration,
            model_id=check_str(record["model_id"], "model_id"),
            created=check_str(record.get("created", "unknown"), "created"),
            version=check_str(record.get("version", VERSION), "version"),
        )

    def decision_thresholds(self) -> dict:
        """The image and pixel thresholds verdicts use, and their source (``calibration.verdicts``)."""
        image_threshold, pixel_threshold, source = self.calibration.verdict_thresholds()
        return {"image_threshold": image_threshold, "pixel_threshold": pixel_threshold, "source": source}

    def display_range(self, pixel_threshold: float | None = None) -> tuple[float, float]:
        threshold = self.decision_thresholds()["pixel_threshold"] if pixel_threshold is None else pixel_threshold
        return display_range(self.train_statistics["pixel_median"], threshold)

    def expected_shapes(self) -> dict:
        """Shapes of the Gaussian arrays this metadata implies."""
        return {"idx": (self.d,), "mean": (self.positions, self.d), "whitening": (self.positions, self.d, self.d)}


# --------------------------------------------------------------------------- reading

def _member_name(key: str) -> str:
    return key + ".npy"


class _Archive:
    """An opened model file whose structure has been checked: ``headers`` maps each array's key
    to (shape, dtype) read from its .npy header, ``meta`` is the checked ModelMeta. Nothing
    larger than the metadata has been read."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path} (run train.py first, or pass --model_path)")
        self.handle = open(self.path, "rb")
        try:
            self.zip = zipfile.ZipFile(self.handle)
            self.headers = self._read_headers()
            self.meta = self._read_meta()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
            self.close()
            if isinstance(exc, ModelFileError):
                raise
            raise ModelFileError(f"{self.path} is not a PaDiM-Paddle model file ({first_line(exc)})") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "zip", None) is not None:
            self.zip.close()
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _refuse(self, why: str):
        raise ModelFileError(f"{self.path} is not a PaDiM-Paddle model file ({why})")

    def _read_headers(self) -> dict:
        infos = self.zip.infolist()
        if len(infos) > MAX_MEMBERS:
            self._refuse(f"{len(infos)} members")
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            self._refuse("duplicate member names")
        for info in infos:
            if not info.filename.endswith(".npy"):
                self._refuse(f"unexpected member {_shown(info.filename)}")
            # np.savez never compresses: a compressed member could declare any size
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                self._refuse(f"member {_shown(info.filename)} is compressed")
        declared = sum(info.file_size for info in infos)
        size_on_disk = os.fstat(self.handle.fileno()).st_size
        if declared > size_on_disk:
            self._refuse(f"its members declare {declared} bytes, the file has {size_on_disk}")
        headers = {}
        for info in infos:
            key = info.filename[:-len(".npy")]
            with self.zip.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                else:
                    self._refuse(f"member {key} has .npy version {version}")
                data_offset = stream.tell()
            if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
                self._refuse(f"member {key} has dtype {dtype}")
            nbytes = math.prod(shape) * dtype.itemsize
            if data_offset + nbytes != info.file_size:
                self._refuse(f"member {key} declares shape {shape} of {dtype} but holds {info.file_size} bytes")
            headers[key] = (tuple(int(v) for v in shape), dtype)
        if META_KEY not in headers:
            raise ModelFileError(f"{self.path} is not a PaDiM-Paddle model file (no metadata; files written by "
                                 "the original PaDiM-Paddle must be refitted with train.py)")
        return headers

    def _read_meta(self) -> ModelMeta:
        shape, dtype = self.headers[META_KEY]
        if len(shape) != 1 or dtype != np.uint8 or shape[0] > META_MAX_BYTES:
            self._refuse(f"metadata of shape {shape} and dtype {dtype}")
        try:
            record = json.loads(bytes(self.read(META_KEY)).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{self.path}: damaged metadata ({first_line(exc)})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            found = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise ModelFileError(f"{self.path} is not a PaDiM-Paddle model file (format {_shown(found)})")
        if record.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{self.path} has model format version {_shown(record.get('format_version'))}, "
                                 f"this version reads {FORMAT_VERSION}: refit it with train.py")
        return ModelMeta.from_dict(record, self.path)

    def read(self, key: str) -> np.ndarray:
        with self.zip.open(_member_name(key)) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)

    def check_gaussian_headers(self) -> None:
        """idx, mean and whitening are present with the shapes and dtypes the metadata implies."""
        for key, shape in self.meta.expected_shapes().items():
            if key not in self.headers:
                raise ModelFileError(f"{self.path} is incomplete: missing {key}")
            found, dtype = self.headers[key]
            if found != shape:
                raise ModelFileError(f"{self.path} is inconsistent: {key} has shape {found}, expected {shape}")
            kinds = "iu" if key == "idx" else "f"
            if dtype.kind not in kinds:
                raise ModelFileError(f"{self.path} is inconsistent: {key} has dtype {dtype}")
        unexpected = [key for key in self.headers
                      if key not in (META_KEY, *GAUSSIAN_KEYS) and not key.startswith(BACKBONE_PREFIX)]
        if unexpected:
            self._refuse(f"unexpected member {_shown(unexpected[0])}")


def first_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in ``array``, checked slice by slice (no full-size temporary)."""
    if array.dtype.kind not in "fc":
        return True
    flat = array.ravel(order="K")
    return all(np.isfinite(flat[start:start + FINITE_CHECK_ELEMENTS]).all()
               for start in range(0, flat.size, FINITE_CHECK_ELEMENTS))


def _check_values(where, meta: ModelMeta, arrays: dict, backbone_state: dict) -> None:
    idx = arrays["idx"]
    if idx.size and (idx.min() < 0 or idx.max() >= meta.total_channels):
        raise ModelFileError(f"{where} is inconsistent: idx outside 0..{meta.total_channels - 1}")
    for key in ("mean", "whitening"):
        if not all_finite(arrays[key]):
            raise ModelFileError(f"{where}: the Gaussian's {key} holds NaN or infinite values: refit the model")
    for key, value in backbone_state.items():
        if not all_finite(np.asarray(value)):
            raise ModelFileError(f"{where}: backbone weight {key} holds NaN or infinite values: refit the model "
                                 f"with good weights")


class ModelFile:
    """A loaded model file: ``meta`` (ModelMeta), ``arrays`` (idx, mean, whitening), ``backbone_state``."""

    def __init__(self, path, meta: ModelMeta, arrays: dict, backbone_state: dict):
        self.path = Path(path) if path is not None else None
        self.meta = meta
        self.arrays = arrays
        self.backbone_state = backbone_state


def read_meta(path) -> ModelMeta:
    """Only the metadata, checked (cheap: the member headers are read, the big arrays are not)."""
    with _Archive(path) as archive:
        return archive.meta


def load_model(path, backbone: str | None = None) -> ModelFile:
    """Read and check a model file; ``backbone`` (if given) must match the one it was fitted with."""
    with _Archive(path) as archive:
        meta = archive.meta
        if backbone is not None and backbone != meta.backbone:
            raise ModelFileError(f"{path} was fitted with backbone {meta.backbone}, not {backbone}: "
                                 f"use --backbone {meta.backbone} or refit")
        archive.check_gaussian_headers()
        try:
            arrays = {key: archive.read(key) for key in GAUSSIAN_KEYS}
            backbone_state = {key[len(BACKBONE_PREFIX):]: archive.read(key)
                              for key in archive.headers if key.startswith(BACKBONE_PREFIX)}
        except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ModelFileError(f"{path} is damaged ({first_line(exc)})") from None
    _check_values(path, meta, arrays, backbone_state)
    return ModelFile(path, meta, arrays, backbone_state)


# --------------------------------------------------------------------------- writing

def _meta_array(meta: ModelMeta) -> np.ndarray:
    record = dict(meta.to_dict(), format=FORMAT, format_version=FORMAT_VERSION)
    return np.frombuffer(json.dumps(record, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def save_model(path, meta: ModelMeta, arrays: dict, backbone_state: dict) -> Path:
    """Write the model file atomically after checking what is written could be loaded again:
    ``arrays`` holds idx, mean and whitening with the shapes ``meta`` implies, all finite."""
    meta = meta.validate(path)
    for key, shape in meta.expected_shapes().items():
        if key not in arrays:
            raise ValueError(f"model arrays lack {key!r}")
        if tuple(np.shape(arrays[key])) != shape:
            raise ValueError(f"model array {key} has shape {np.shape(arrays[key])}, expected {shape}")
    _check_values(path, meta, arrays, backbone_state)
    payload = {META_KEY: _meta_array(meta)}
    payload.update(arrays)
    payload.update({BACKBONE_PREFIX + key: value for key, value in backbone_state.items()})
    return write_atomically(path, lambda stream: np.savez(stream, **payload))


def update_meta(path, meta: ModelMeta) -> Path:
    """Replace only the metadata (e.g. val.py's thresholds) of the model ``meta`` describes.

    Refused (ModelFileError) when the file at ``path`` holds another model (another
    ``model_id``: train.py saved a new one meanwhile), or is replaced while the copy runs. The
    arrays are copied member by member, so memory stays small whatever the model's size."""
    path = Path(path)
    meta = meta.validate(path)
    member = _member_name(META_KEY)

    def write(stream):
        with _Archive(path) as source:
            if source.meta.model_id != meta.model_id:
                raise ModelFileError(f"{path} now holds another model (fitted {source.meta.created}) than the one "
                                     f"evaluated (fitted {meta.created}): its metadata was left as it is; "
                                     f"evaluate the new model again")
            with zipfile.ZipFile(stream, "w", allowZip64=True) as target:
                for info in source.zip.infolist():
                    if info.filename == member:
                        continue
                    with source.zip.open(info) as src, target.open(info.filename, "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
                with target.open(member, "w") as dst:
                    np.lib.format.write_array(dst, _meta_array(meta))
            copied, current = os.fstat(source.handle.fileno()), os.stat(path)
            if (copied.st_dev, copied.st_ino) != (current.st_dev, current.st_ino):
                raise ModelFileError(f"{path} was replaced while its metadata was being updated: left as it is; "
                                     f"evaluate the new model again")
    return write_atomically(path, write)
