"""What predict.py and infer.py leave beside their pictures: ``predictions.csv``, one row per input
image (failed ones included), and the picture names, one per input and never two alike."""
from __future__ import annotations

import csv
import io
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

from datasets.mvtec import DataError
from utils.files import write_text_atomically

PREDICTIONS_FILE = "predictions.csv"
PICTURE_SUFFIX = ".png"


@dataclass(frozen=True)
class Prediction:
    """One row of ``predictions.csv``. ``image_score`` and ``threshold`` in the anomaly map's
    units; ``verdict`` is normal, anomalous or error; ``region_pixels`` the size of the region
    shown (0 for a normal verdict); ``picture`` the picture's path ('' when none was saved);
    ``error`` the one-line message of an image that could not be scored (its score, region and
    picture are then empty)."""
    path: str
    image_score: float | None
    threshold: float
    verdict: str
    region_pixels: int | None
    picture: str = ""
    error: str = ""


COLUMNS = tuple(field.name for field in fields(Prediction))


def scored(path, image_score: float, threshold: float, region_pixels: int, picture=None) -> Prediction:
    """The row of a scored image; the verdict is the project's one rule: anomalous when the score
    lies strictly above the threshold. Its region (models.calibration.anomaly_region) is never
    empty for an anomalous verdict and always empty for a normal one."""
    verdict = "anomalous" if float(image_score) > float(threshold) else "normal"
    if (verdict == "anomalous") != (int(region_pixels) > 0):
        raise ValueError(f"{path}: a {verdict} verdict with a region of {region_pixels} pixels; the region "
                         "must show where an anomalous verdict lies and be empty for a normal one")
    return Prediction(str(path), float(image_score), float(threshold), verdict, int(region_pixels),
                      "" if picture is None else str(picture))


def failed(path, threshold: float, message: str) -> Prediction:
    """The row of an image that could not be read or scored."""
    return Prediction(str(path), None, float(threshold), "error", None, "", " ".join(str(message).split()))


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.6f}"


def predictions_csv(rows: Iterable[Prediction]) -> str:
    """The csv text: a header with :data:`COLUMNS`, then one line per row, in the given order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_number(value) if name in ("image_score", "threshold", "region_pixels") else value
                         for name, value in zip(COLUMNS, astuple(row))])
    return buffer.getvalue()


def write_predictions(folder, rows: Sequence[Prediction]) -> Path:
    """Write ``<folder>/predictions.csv`` atomically; returns its path."""
    return write_text_atomically(Path(folder) / PREDICTIONS_FILE, predictions_csv(rows))


def summary(rows: Sequence[Prediction]) -> str:
    """'N image(s), A anomalous, F failed' for the closing log line."""
    anomalous = sum(row.verdict == "anomalous" for row in rows)
    errors = sum(row.verdict == "error" for row in rows)
    return f"{len(rows)} image(s), {anomalous} anomalous, {errors} failed"


def _picture_name(relative: Path) -> str:
    """The input's relative path with its own suffix kept and ``.png`` added unless it already
    ends so: ``a.jpg`` -> ``a.jpg.png``, ``a.png`` -> ``a.png``."""
    name = relative.as_posix()
    return name if name.endswith(PICTURE_SUFFIX) else name + PICTURE_SUFFIX


def picture_paths(image_paths: Sequence, root, out_dir) -> list[Path]:
    """One picture path per input image, in the same order, all different.

    An image under the folder ``root`` mirrors its path relative to it under ``out_dir``
    (``root/test/good/000.png`` -> ``out_dir/test/good/000.png``); with a file as ``root``, its
    name. The input's suffix stays in the name (see :func:`_picture_name`), so ``a.jpg`` and
    ``a.png`` in one folder do not collide. Names that still meet (``a.jpg`` beside ``a.jpg.png``,
    or names that differ only in case, one file on a case-insensitive disk) get ``~2``, ``~3``...
    before ``.png``, in input order. A picture that would replace one of the input images is an
    :class:`DataError` (``out_dir`` is the input folder itself).
    """
    root = Path(root)
    out_dir = Path(out_dir)
    taken: set[str] = set()
    inputs = {Path(p).resolve() for p in image_paths}
    pictures = []
    for image_path in image_paths:
        image_path = Path(image_path)
        try:
            relative = image_path.relative_to(root) if root.is_dir() else Path(image_path.name)
        except ValueError:
            relative = Path(image_path.name)
        name = _picture_name(relative)
        stem = name[:-len(PICTURE_SUFFIX)]
        copy = 1
        while name.casefold() in taken:
            copy += 1
            name = f"{stem}~{copy}{PICTURE_SUFFIX}"
        taken.add(name.casefold())
        picture = out_dir / name
        if picture.resolve() in inputs:
            raise DataError(f"the picture of {image_path} would replace the input image {picture}; "
                             "save the pictures outside the input folder")
        pictures.append(picture)
    return pictures
