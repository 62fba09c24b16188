"""Per-image pictures composed in NumPy and PIL, and a pool of worker processes that draws them
while the caller goes on scoring.

The panels are the original's: image, ground truth (val only), heat map (the jet colormap at
half opacity over the image, on a fixed absolute scale [vmin, vmax] in anomaly units, so a normal
image stays blue), predicted mask (the map above the pixel threshold, opened by a disk of radius
4) and segmentation result (the mask's thick boundary in red over the image). Only NumPy, PIL,
utils.files and utils.morphology are imported here: a worker process starts in a fraction of
matplotlib's import time.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.files import temp_path_beside
from utils.morphology import open_mask, thick_boundaries

# Panels larger than this (pixels, longer side) are drawn downscaled: the picture is for looking
# at, and its cost then stays bounded whatever the crop size.
PANEL_SIDE_LIMIT = 448

# matplotlib's "jet" segment data; its 256-entry lookup table is the piecewise-linear
# interpolation of these anchors at linspace(0, 1, 256).
_JET_ANCHORS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _jet_table() -> np.ndarray:
    positions = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(positions, *zip(*_JET_ANCHORS[name])) for name in ("red", "green", "blue")]
    return np.round(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


JET = _jet_table()          # [256, 3] uint8


def jet_indices(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Lookup-table rows for ``values`` on the fixed scale [vmin, vmax], clipped at both ends,
    rounded down as matplotlib's Colormap does (the top value gets the last row). int [H, W]."""
    values = np.asarray(values, dtype=np.float32)
    if not vmax > vmin:
        return np.zeros(values.shape, dtype=np.intp)
    scaled = (values - np.float32(vmin)) * np.float32(256.0 / (vmax - vmin))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(scaled, 0, 255).astype(np.intp)


def predicted_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Pixels above the threshold, cleaned with an opening by a disk of radius 4 (as the original).
    bool [H, W]."""
    return open_mask(np.asarray(anomaly_map) > pixel_threshold)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] from uint8 or [0, 1] float, grey or RGB(A)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an image [H, W] or [H, W, 3|4], got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The jet colours of the map at half opacity over the image. uint8 [H, W, 3]."""
    colours = JET[jet_indices(anomaly_map, vmin, vmax)]
    return ((image.astype(np.uint16) + colours + 1) // 2).astype(np.uint8)


def mark_contour(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0)) -> np.ndarray:
    """The image with the mask's thick boundary painted in ``colour``. uint8 [H, W, 3]."""
    marked = image.copy()
    marked[thick_boundaries(mask)] = colour
    return marked


def display_crops(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The uint8 crops [B, H, W, 3] that normalised images [B, 3, H, W] (``(crop / 255 - mean) /
    std`` in float32; ``mean`` and ``std`` [3, 1, 1]) were made from, without decoding the files
    again. Exact: the float32 error of normalising and back is far below half a grey level."""
    shown = (np.asarray(images, dtype=np.float32) * std + mean) * np.float32(255)
    return np.rint(shown).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _grey(values01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(values01, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _downscaled(array: np.ndarray, size: tuple, resample) -> np.ndarray:
    """``array`` (uint8 grey/RGB or float32 [H, W]) resized to ``size`` = (width, height)."""
    if array.shape[1::-1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize(size, resample))


def panel_arrays(image, anomaly_map, pixel_threshold: float, vmin: float, vmax: float,
                 ground_truth=None, region=None) -> list[tuple[str, np.ndarray]]:
    """The panels as (title, uint8 [h, w] or [h, w, 3]): image, ground truth (when given), heat
    map, predicted mask, segmentation result. ``image`` uint8 or [0, 1] float [H, W(, 3)];
    ``anomaly_map`` [H, W] in anomaly units; ``ground_truth`` [H, W] in [0, 1]; ``region``
    [H, W] bool, the predicted mask when given (the verdict's region, which predict.py and
    infer.py count in predictions.csv), else ``predicted_mask``. Panels are at the image's own
    size, downscaled when its longer side exceeds PANEL_SIDE_LIMIT."""
    image = as_rgb_uint8(image)
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly map {anomaly_map.shape} and image {image.shape[:2]} differ in size")
    mask = predicted_mask(anomaly_map, pixel_threshold) if region is None else np.asarray(region, dtype=bool)
    if mask.shape != anomaly_map.shape:
        raise ValueError(f"region {mask.shape} and anomaly map {anomaly_map.shape} differ in size")
    height, width = anomaly_map.shape
    scale = min(1.0, PANEL_SIDE_LIMIT / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    shown = _downscaled(image, size, Image.BILINEAR)
    shown_mask = _downscaled(mask.astype(np.uint8) * np.uint8(255), size, Image.BILINEAR)
    panels = [("Image", shown)]
    if ground_truth is not None:
        panels.append(("GroundTruth", _downscaled(_grey(ground_truth), size, Image.BILINEAR)))
    panels.append(("Predicted heat map", heat_overlay(shown, _downscaled(anomaly_map, size, Image.BILINEAR),
                                                      vmin, vmax)))
    panels.append(("Predicted mask", shown_mask))
    panels.append(("Segmentation result", mark_contour(shown, shown_mask > 127)))
    return panels


# Layout, in pixels.
MARGIN = 12
PANEL_GAP = 24
TITLE_SIZE = 13
PANEL_TITLE_SIZE = 16
TICK_SIZE = 11
BAR_WIDTH = 14
BAR_GAP = 20
TICK_LENGTH = 4


@lru_cache(maxsize=None)
def font(size: int):
    """DejaVu Sans from matplotlib's data folder (found without importing matplotlib), else PIL's
    own scalable default."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if candidate.is_file():
            return ImageFont.truetype(str(candidate), size)
    return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text)
    return right - left, bottom - top


def _draw_text(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, size: int, anchor: str) -> None:
    draw.text((x, y), text, fill=(0, 0, 0), font=font(size), anchor=anchor)


def _fit_text(text: str, size: int, width: int) -> str:
    """``text``, shortened in the middle with '...' until it fits ``width`` pixels."""
    if _text_size(text, size)[0] <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        shortened = text[:(keep + 1) // 2] + "..." + text[len(text) - keep // 2:]
        if _text_size(shortened, size)[0] <= width:
            return shortened
    return "..."


def nice_ticks(vmin: float, vmax: float, target: int = 6) -> list[float]:
    """Round values (steps of 1, 2, 2.5 or 5 times a power of ten) inside [vmin, vmax]."""
    if not vmax > vmin:
        return [vmin]
    raw = (vmax - vmin) / target
    power = 10.0 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = np.ceil(vmin / step - 1e-9) * step
    count = int(np.floor((vmax - first) / step + 1e-9)) + 1
    return [float(first + k * step) for k in range(count)]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, int(-np.floor(np.log10(step) + 1e-9)))
    if abs(step / 10.0 ** np.floor(np.log10(step) + 1e-9) - 2.5) < 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _colour_bar(height: int, vmin: float, vmax: float) -> Image.Image:
    """The scale at the heat panel's opacity (jet over white), vmax at the top, with ticks and the
    'Anomaly Score' label."""
    rows = vmax - (np.arange(height, dtype=np.float64) + 0.5) / height * (vmax - vmin) if vmax > vmin \
        else np.full(height, vmin)
    colours = (JET[jet_indices(rows, vmin, vmax)].astype(np.uint16) + 255 + 1) // 2
    bar = np.repeat(colours.astype(np.uint8)[:, None, :], BAR_WIDTH, axis=1)
    ticks = nice_ticks(vmin, vmax)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    labels = [_tick_label(t, step) for t in ticks]
    label_width = max(_text_size(label, TICK_SIZE)[0] for label in labels)
    name = "Anomaly Score"
    name_width, name_height = _text_size(name, TICK_SIZE)
    width = BAR_WIDTH + TICK_LENGTH + 3 + label_width + 8 + name_height + 4
    canvas = Image.new("RGB", (width, height + TICK_SIZE), (255, 255, 255))
    top = TICK_SIZE // 2
    canvas.paste(Image.fromarray(bar), (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, top, BAR_WIDTH - 1, top + height - 1), outline=(0, 0, 0))
    for value, label in zip(ticks, labels):
        y = top + (vmax - value) / (vmax - vmin) * (height - 1) if vmax > vmin else top + height / 2
        draw.line((BAR_WIDTH, y, BAR_WIDTH + TICK_LENGTH - 1, y), fill=(0, 0, 0))
        _draw_text(draw, BAR_WIDTH + TICK_LENGTH + 3, y, label, TICK_SIZE, "lm")
    upright = Image.new("RGB", (name_width + 4, name_height + 6), (255, 255, 255))
    _draw_text(ImageDraw.Draw(upright), upright.width / 2, upright.height / 2, name, TICK_SIZE, "mm")
    sideways = upright.rotate(90, expand=True)
    canvas.paste(sideways, (width - sideways.width, top + max(0, (height - sideways.height) // 2)))
    return canvas


def compose_figure(panels: list[tuple[str, np.ndarray]], vmin: float, vmax: float,
                   title: str | None = None) -> Image.Image:
    """Panels side by side, each framed under its title, the colour bar on the right, ``title``
    above all."""
    panel_height = max(array.shape[0] for _, array in panels)
    bar = _colour_bar(panel_height, vmin, vmax)
    panels_width = sum(array.shape[1] for _, array in panels) + PANEL_GAP * (len(panels) - 1)
    width = MARGIN + panels_width + BAR_GAP + bar.width + MARGIN
    title_height = int(TITLE_SIZE * 1.8) if title else 0
    panel_title_height = int(PANEL_TITLE_SIZE * 1.6)
    top = MARGIN + title_height + panel_title_height
    canvas = Image.new("RGB", (width, top + panel_height + MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        _draw_text(draw, width / 2, MARGIN + title_height / 2, _fit_text(title, TITLE_SIZE, width - 2 * MARGIN),
                   TITLE_SIZE, "mm")
    x = MARGIN
    for name, array in panels:
        height, panel_width = array.shape[:2]
        y = top + (panel_height - height) // 2
        canvas.paste(Image.fromarray(array).convert("RGB"), (x, y))
        draw.rectangle((x - 1, y - 1, x + panel_width, y + height), outline=(0, 0, 0))
        _draw_text(draw, x + panel_width / 2, top - panel_title_height / 2,
                   _fit_text(name, PANEL_TITLE_SIZE, panel_width + PANEL_GAP), PANEL_TITLE_SIZE, "mm")
        x += panel_width + PANEL_GAP
    canvas.paste(bar, (x - PANEL_GAP + BAR_GAP, top - TICK_SIZE // 2))
    return canvas


def save_picture(picture: Image.Image, path) -> Path:
    """Write through a temp file beside ``path`` (format from its suffix, PNG when none)."""
    path = Path(path)
    suffix = path.suffix or ".png"
    options = {"compress_level": 1} if suffix.lower() == ".png" else {"quality": 95}
    with temp_path_beside(path, suffix=suffix) as temp_name:
        picture.save(temp_name, format=None if path.suffix else "PNG", **options)
    return path


def draw_panels(path, image, anomaly_map, pixel_threshold: float, vmin: float, vmax: float,
                ground_truth=None, title: str | None = None, region=None) -> Path:
    """Compose and save the 5-panel (with ground truth, as val) or 4-panel (as predict/infer)
    picture (``region``: see panel_arrays)."""
    panels = panel_arrays(image, anomaly_map, pixel_threshold, vmin, vmax, ground_truth, region)
    return save_picture(compose_figure(panels, vmin, vmax, title), path)


class PictureError(RuntimeError):
    """One or more pictures could not be drawn or written."""


_watching_parent = False


def _prepare_worker() -> None:
    """Each worker's start (also submitted as a job, to start the workers early)."""
    global _watching_parent
    for size in (TITLE_SIZE, PANEL_TITLE_SIZE, TICK_SIZE):
        font(size)
    parent = multiprocessing.parent_process()
    if parent is not None and not _watching_parent:
        _watching_parent = True
        # A worker holds both ends of its job queue, so it would outlive a parent killed by
        # SIGKILL (and keep the parent's stdout open): it exits when the parent does.
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def _exit_with_parent(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _draw_job(job: dict) -> str:
    return str(draw_panels(**job))


def default_picture_workers() -> int:
    """Half the CPUs this process may use (at least one): the other half keeps scoring."""
    from utils.numbers import available_cpus
    return max(1, available_cpus() // 2)


class PictureWriter:
    """Draws panel pictures in worker processes while the caller goes on.

    ``submit`` takes the same arguments as draw_panels and returns at once unless ``max_pending``
    pictures are already waiting, in which case it waits for one to finish (so a slow disk cannot
    pile images up in memory). ``close`` waits for every picture and raises PictureError naming
    the ones that failed; leaving a ``with`` block on an exception cancels the pictures not yet
    started instead. Each picture is written through a temp file and renamed, so none is ever
    half-written. ``workers=0`` draws in the calling process (no pool: for a single picture).

    Workers are started with 'spawn' (or 'forkserver'), never by forking a process that may have
    imported Paddle; like any multiprocessing start method but fork, this re-imports the main
    script in each worker, so scripts keep their heavy imports inside main().
    """

    def __init__(self, workers: int | None = None, max_pending: int | None = None, start_method: str = "spawn"):
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        self.workers = default_picture_workers() if workers is None else int(workers)
        self.max_pending = max(1, max_pending if max_pending is not None else 4 * max(1, self.workers))
        self._pending: deque = deque()
        self._failures: list[tuple[str, str]] = []
        self._written: list[Path] = []
        self._closed = False
        self._pool = None
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(start_method),
                                             initializer=_prepare_worker)
            # Start the workers now so that their start-up overlaps the caller's own.
            for _ in range(self.workers):
                self._pending.append((None, self._pool.submit(_prepare_worker)))

    @property
    def written(self) -> list[Path]:
        """The pictures written so far, in the order they finished."""
        return list(self._written)

    def submit(self, path, image, anomaly_map, pixel_threshold: float, vmin: float, vmax: float,
               ground_truth=None, title: str | None = None, region=None) -> None:
        if self._closed:
            raise PictureError("this PictureWriter is closed")
        job = dict(path=Path(path), image=np.asarray(image), anomaly_map=np.asarray(anomaly_map),
                   pixel_threshold=float(pixel_threshold), vmin=float(vmin), vmax=float(vmax),
                   ground_truth=None if ground_truth is None else np.asarray(ground_truth), title=title,
                   region=None if region is None else np.asarray(region, dtype=bool))
        if self._pool is None:
            try:
                self._written.append(draw_panels(**job))
            except Exception as exc:  # noqa: BLE001 - reported at close, with the picture's path
                self._failures.append((str(path), f"{type(exc).__name__}: {exc}"))
            return
        while len(self._pending) >= self.max_pending:
            self._collect(block=True)
        try:
            future = self._pool.submit(_draw_job, job)
        except BrokenProcessPool as exc:
            raise PictureError(f"the picture workers stopped: {exc}") from exc
        self._pending.append((job["path"], future))
        self._collect(block=False)

    def _collect(self, block: bool) -> int:
        """Record the outcome of finished pictures (waiting for at least one when ``block``);
        returns how many pictures finished."""
        if block and self._pending:
            wait([future for _, future in self._pending], return_when=FIRST_COMPLETED)
        still, finished = deque(), 0
        for path, future in self._pending:
            if not future.done():
                still.append((path, future))
                continue
            finished += path is not None
            error = future.exception()
            if error is not None:
                self._failures.append((str(path) if path else "(worker start)", f"{type(error).__name__}: {error}"))
            elif path is not None:
                self._written.append(Path(future.result()))
        self._pending = still
        return finished

    def close(self, progress: str | None = None) -> list[Path]:
        """Wait for every picture; return their paths or raise PictureError. ``progress``: the
        description of a progress bar over the pictures still pending."""
        if not self._closed:
            self._closed = True
            from tqdm import tqdm

            with tqdm(total=sum(path is not None for path, _ in self._pending), desc=progress,
                      disable=progress is None) as bar:
                while self._pending:
                    bar.update(self._collect(block=True))
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        if self._failures:
            first_path, first_error = self._failures[0]
            raise PictureError(f"{len(self._failures)} picture(s) failed; first {first_path}: {first_error}")
        return self.written

    def abort(self) -> None:
        """Cancel the pictures not yet started and wait for those being drawn; no error raised."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
