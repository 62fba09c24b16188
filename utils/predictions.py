"""What predict.py and infer.py leave: a verdict line per image in the log, ``predictions.csv``
(one row per input image, failed ones included), and the pictures, one per input, their names
never two alike (:class:`PredictionRun` does it all, whatever runs the model)."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from datasets import DataError
from models.calibration import anomaly_region, consistent_pixel_threshold
from models.deploy import finite_results, non_finite_error
from utils.files import OutputError, write_text_atomically
from utils.pictures import PictureError, PictureWriter

PREDICTIONS_FILE = "predictions.csv"
PICTURE_SUFFIX = ".png"
# A --save_path with one of these suffixes names the picture of a single input image.
SINGLE_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def verdict_thresholds(stored: dict, threshold: float | None = None,
                       pixel_threshold: float | None = None) -> tuple[float, float, str]:
    """(image threshold, pixel threshold, where they come from): the ``stored`` pair (a model's
    ``decision_thresholds()`` or an export's ``thresholds``) unless --threshold or
    --pixel_threshold replace them. A stored pixel threshold never lies above the image
    threshold (models.calibration.consistent_pixel_threshold)."""
    image = float(stored["image_threshold"]) if threshold is None else float(threshold)
    pixel = consistent_pixel_threshold(image, stored["pixel_threshold"]) if pixel_threshold is None \
        else float(pixel_threshold)
    given = [flag for flag, value in (("--threshold", threshold), ("--pixel_threshold", pixel_threshold))
             if value is not None]
    source = stored["source"] if not given else f"{' and '.join(given)} ({stored['source']} otherwise)"
    return image, pixel, source


class PredictionRun:
    """The output of predict.py and infer.py, batch by batch, for the images of an ImageList.

    Each scored image gets a verdict (anomalous when its score lies above ``image_threshold``),
    a region (models.calibration.anomaly_region: never empty for an anomalous verdict, always
    empty for a normal one), a log line, a row and, with ``save_picture``, the 4-panel picture,
    whose mask panel is that same region, drawn by a PictureWriter's worker processes while the
    model goes on. An image that could not be read (``batch.failed``) or got a NaN or infinite
    map or score gets an error row and a log line, and the others go on. :meth:`finish` waits for
    the pictures, writes ``predictions.csv``, then raises when any image
    failed: a NonFiniteOutputError when the model gave NaN or infinite values, else a DataError
    (both exit 2).

    The output folder is ``<save_path>/<category>/<folder>``; pictures go there mirroring each
    image's path below ``images.root`` (:func:`picture_paths`), and predictions.csv beside them.
    A single image with a ``save_path`` ending in .png/.jpg has that picture name, and the csv
    goes beside it.
    """

    def __init__(self, images, save_path, category: str, folder: str, image_threshold: float,
                 pixel_threshold: float, display: tuple, label: str, logger: logging.Logger,
                 save_picture: bool = True):
        paths = [sample.path for sample in images.samples]
        save_path = Path(save_path)
        out_dir = save_path / category / folder
        picture = save_path if len(paths) == 1 and save_path.suffix.lower() in SINGLE_PICTURE_SUFFIXES else None
        self.label, self.logger = label, logger
        self.image_threshold, self.pixel_threshold = float(image_threshold), float(pixel_threshold)
        self.vmin, self.vmax = (float(v) for v in display)
        if picture is not None and picture.resolve() == Path(paths[0]).resolve():
            raise DataError(f"the picture of {paths[0]} would replace it: give another --save_path")
        self.pictures = {}
        if save_picture:
            targets = [picture] if picture is not None else picture_paths(paths, images.root, out_dir)
            self.pictures = dict(zip(paths, targets))
        self.csv_folder = picture.parent if picture is not None else out_dir
        self._order = {path: i for i, path in enumerate(paths)}
        self._rows: dict[str, Prediction] = {}
        self._unreadable: list[str] = []
        self._non_finite = 0
        self._writer = PictureWriter(workers=0 if len(paths) == 1 else None) if save_picture else None

    def add(self, batch, maps: np.ndarray, scores: np.ndarray) -> None:
        """One batch of ``iterate_batches(..., skip_errors=True)`` and the model's maps [B, H, W]
        and scores [B] for its loaded images."""
        for sample, message in batch.failed:
            self._unreadable.append(message)
            self._fail(sample.path, message, logging.WARNING)
        if not batch.samples:
            return
        for i, (sample, finite) in enumerate(zip(batch.samples, finite_results(maps, scores))):
            if not finite:
                self._non_finite += 1
                self._fail(sample.path, f"NaN or infinite score or map ({scores[i]}): no verdict", logging.ERROR)
                continue
            self._scored(sample.path, maps[i], float(scores[i]), None if batch.displays is None else batch.displays[i])

    def _scored(self, path: str, anomaly_map: np.ndarray, score: float, display) -> None:
        anomalous = score > self.image_threshold
        region = anomaly_region(anomaly_map, self.pixel_threshold, anomalous)
        picture = self.pictures.get(path)
        row = scored(path, score, self.image_threshold, int(region.sum()), picture)
        line = (f"{self.label} : {path}  score {score:.4f}  threshold {self.image_threshold:.4f}  -> {row.verdict}"
                f"  region {row.region_pixels} px")
        if picture is not None:
            title = f"{Path(path).name}: score {score:.2f} ({row.verdict}, threshold {self.image_threshold:.2f})"
            self._writer.submit(picture, display, anomaly_map, self.pixel_threshold, self.vmin, self.vmax,
                                title=title, region=region)
            line += f"  picture {picture}"
        self.logger.info(line)
        self._rows[path] = row

    def _fail(self, path: str, message: str, level: int) -> None:
        self.logger.log(level, f"{self.label} : {path}  error: {message}")
        self._rows[path] = failed(path, self.image_threshold, message)

    def finish(self) -> Path:
        """Wait for the pictures, write predictions.csv (rows in input order), log the summary;
        then raise if any image or picture failed. Returns the csv's path."""
        picture_error = None
        if self._writer is not None:
            try:
                self._writer.close()
            except PictureError as exc:
                picture_error = exc
            drawn = {str(path) for path in self._writer.written}
            rows = {path: row if not row.picture or row.picture in drawn else replace(row, picture="")
                    for path, row in self._rows.items()}
        else:
            rows = self._rows
        ordered = sorted(rows.values(), key=lambda row: self._order[row.path])
        written = write_predictions(self.csv_folder, ordered)
        self.logger.info(f"{self.label} done: {summary(ordered)}; {written}")
        if self._non_finite:
            raise non_finite_error(self._non_finite, len(self._order))
        if self._unreadable:
            raise DataError(f"{len(self._unreadable)} of {len(self._order)} image(s) could not be read (first: "
                            f"{self._unreadable[0]}); their rows in {written} say why")
        if picture_error is not None:
            raise OutputError(f"{picture_error}; the other pictures and {written} were written")
        return written

    def abort(self) -> None:
        """Stop the pictures not yet started (the run stops with an error): no csv is written."""
        if self._writer is not None:
            self._writer.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            self.abort()
        return False
