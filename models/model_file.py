"""The self-contained model file (``best.pdparams``): a NumPy ``.npz`` archive, no pickle.

It holds everything predict/val/export need: backbone name and weights, stages, sizes, ``idx``,
eps, seed, the Gaussian (mean + whitening), training score statistics and, once val.py has run,
the calibrated thresholds. Arrays are streamed into the archive, so a 3.8 GB whitening tensor is
not copied in memory while saving, and loading never runs pickled code.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from utils.files import write_atomically

FORMAT = "padim-paddle-model"
FORMAT_VERSION = 1
META_KEY = "__meta__"
BACKBONE_PREFIX = "backbone/"


class ModelFileError(ValueError):
    """The model file is missing, damaged, from another version, or does not fit the request."""


def save_model(path, meta: dict, arrays: dict, backbone_state: dict) -> Path:
    """Write the model file atomically. ``arrays`` must hold idx, mean and whitening."""
    for key in ("idx", "mean", "whitening"):
        if key not in arrays:
            raise ValueError(f"model arrays lack {key!r}")
    payload = {META_KEY: _meta_array(meta)}
    payload.update(arrays)
    payload.update({BACKBONE_PREFIX + key: value for key, value in backbone_state.items()})
    return write_atomically(path, lambda stream: np.savez(stream, **payload))


def _meta_array(meta: dict) -> np.ndarray:
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    return np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def update_meta(path, meta: dict) -> Path:
    """Replace only the metadata (e.g. thresholds from val.py): the arrays are copied member by
    member into a new archive, so memory stays small whatever the model's size."""
    path = Path(path)
    _open(path)[0].close()
    member = META_KEY + ".npy"

    def write(stream):
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(stream, "w", allowZip64=True) as target:
            for info in source.infolist():
                if info.filename == member:
                    continue
                with source.open(info) as src, target.open(info.filename, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            with target.open(member, "w") as dst:
                np.lib.format.write_array(dst, _meta_array(meta))
    return write_atomically(path, write)


class ModelFile:
    """A loaded model file: ``meta`` (dict), ``arrays`` (idx, mean, whitening), ``backbone_state``."""

    def __init__(self, path, meta: dict, arrays: dict, backbone_state: dict):
        self.path = Path(path) if path is not None else None
        self.meta = meta
        self.arrays = arrays
        self.backbone_state = backbone_state

    def save(self, path=None) -> Path:
        return save_model(path or self.path, self.meta, self.arrays, self.backbone_state)


def read_meta(path) -> dict:
    """Only the metadata (cheap: the big arrays are not read)."""
    return _open(path)[1]


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path} (run train.py first, or pass --model_path)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ModelFileError(f"{path} is not a PaDiM-Paddle model file ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile) or META_KEY not in archive.files:
        raise ModelFileError(f"{path} is not a PaDiM-Paddle model file (no metadata; files written by "
                             "the original PaDiM-Paddle must be refitted with train.py)")
    try:
        meta = json.loads(bytes(archive[META_KEY]).decode("utf-8"))
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFileError(f"{path}: damaged metadata ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a PaDiM-Paddle model file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {meta.get('format_version')}, this version "
                             f"reads {FORMAT_VERSION}: refit it with train.py")
    return archive, meta


def load_model(path, backbone: str | None = None) -> ModelFile:
    """Read and check a model file; ``backbone`` (if given) must match the one it was fitted with."""
    archive, meta = _open(path)
    if backbone is not None and backbone != meta["backbone"]:
        raise ModelFileError(f"{path} was fitted with backbone {meta['backbone']}, not {backbone}: "
                             f"use --backbone {meta['backbone']} or refit")
    try:
        arrays = {key: archive[key] for key in ("idx", "mean", "whitening")}
        backbone_state = {key[len(BACKBONE_PREFIX):]: archive[key]
                          for key in archive.files if key.startswith(BACKBONE_PREFIX)}
    except KeyError as exc:
        raise ModelFileError(f"{path} is incomplete: missing {exc}") from None
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFileError(f"{path} is damaged ({exc})") from None
    finally:
        archive.close()
    positions = int(np.prod(meta["feature_grid"]))
    d = int(meta["d"])
    expected = {"idx": (d,), "mean": (positions, d), "whitening": (positions, d, d)}
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise ModelFileError(f"{path} is inconsistent: {key} has shape {tuple(arrays[key].shape)}, "
                                 f"expected {shape}")
    if arrays["idx"].min() < 0 or arrays["idx"].max() >= int(meta["total_channels"]):
        raise ModelFileError(f"{path} is inconsistent: idx outside 0..{meta['total_channels'] - 1}")
    return ModelFile(path, meta, arrays, backbone_state)
