"""MVTec AD layout reader and the image/mask transforms of the original PaDiM-Paddle.

Layout: ``<root>/<category>/{train,test}/<defect_type>/*.png`` with masks in
``<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png``. Any folder in that layout
works, not only the 15 MVTec categories.

Files are untrusted: every image and mask header is checked when a dataset is built (before
anything is fitted or written), images above PIL's decompression-bomb limit are refused, and
16-bit or float images are scaled to 8 bits by their value range (see ``to_8bit``).
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets import DataError
from datasets.geometry import Geometry

CLASS_NAMES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Grey modes PIL gives for more than 8 bits per pixel, with the top of their value range.
# PIL reads 16-bit PNG/TIFF as I;16*, 16-bit PGM as I (32-bit integers holding 0..65535), float
# TIFF as F (taken as 0..1); 16-bit RGB(A) PNGs it already reduces to 8 bits per channel.
HIGH_BIT_DEPTH_RANGES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
LOGGER = logging.getLogger("padim")

# An image above PIL's pixel limit (Image.MAX_IMAGE_PIXELS) is a possible decompression bomb:
# PIL only warns below twice the limit; here both are errors (see _open_image).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def check_category_name(category: str) -> str:
    """A category is a plain folder name (or 'all'): no path separator, not '.' or '..', not
    empty, so that <data_path>/<category> and <save_path>/<category> stay inside their roots."""
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if (not category or category in (".", "..") or "\0" in category
            or any(sep in category for sep in separators) or os.path.isabs(category)):
        raise DataError(f"category must be a plain folder name or 'all' (no path separator, '.' or '..'), "
                        f"got {category!r}")
    return category


def _open_image(path, what: str = "image") -> Image.Image:
    """Open `path` without decoding it (PIL reads the header); refuses a missing or unreadable
    file and an image above PIL's decompression-bomb limit, as a DataError naming the file."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{what} {path} is too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    width, height = image.size
    # Also when the warning filter above is not in force (a caller reset the filters).
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(f"{what} {path} is too large to decode safely: {width}x{height} pixels, more than "
                        f"PIL's limit of {Image.MAX_IMAGE_PIXELS}")
    return image


def image_size(path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with _open_image(path, what) as image:
        return image.size


def to_8bit(image: Image.Image, path="image") -> Image.Image:
    """An image PIL can convert to RGB/L: a high-bit-depth grey image (HIGH_BIT_DEPTH_RANGES) is
    scaled by its value range to 0..255 (value * 255 / top, rounded: 16-bit v*257 -> v), others
    are returned as they are. Values outside the range are an error, never clipped."""
    top = HIGH_BIT_DEPTH_RANGES.get(image.mode)
    if top is None:
        return image
    values = np.asarray(image, dtype=np.float32)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= top):
        raise DataError(f"cannot read image {path}: mode {image.mode} values outside 0..{top:g}")
    return Image.fromarray(np.rint(values * np.float32(255) / np.float32(top)).astype(np.uint8))


def _decode(path, what: str) -> Image.Image:
    """The decoded pixels of `path`, 8 bits per channel."""
    with _open_image(path, what) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read {what} {path}: {exc}") from None
        return to_8bit(image, path)


def read_rgb(path) -> Image.Image:
    """Decode an image file as RGB (grey, palette, RGBA and 16-bit images are converted)."""
    image = _decode(path, "image")
    try:
        # convert() copies even an RGB image (a full pass over a 900x900 bottle image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def mask_fits(mask_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether a ground-truth mask of `mask_size` (w, h) belongs to an image of `image_size`:
    the same size, or the image's size times one scale factor with each side rounded to the
    nearest pixel (the same aspect ratio up to that rounding). Such a mask is resized to the
    image with nearest-neighbour; any other size is an error, never a silent stretch."""
    (mask_w, mask_h), (image_w, image_h) = mask_size, image_size
    if mask_w <= 0 or mask_h <= 0:
        return False
    # Some s has |s*image_w - mask_w| <= 1/2 and |s*image_h - mask_h| <= 1/2.
    return ((2 * mask_w - 1) * image_h <= (2 * mask_h + 1) * image_w
            and (2 * mask_h - 1) * image_w <= (2 * mask_w + 1) * image_h)


def _check_mask_size(mask_path, mask_size, image_size, image_path=None) -> None:
    if not mask_fits(mask_size, image_size):
        image = f"its image {image_path}" if image_path else "its image"
        raise DataError(f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but {image} is "
                        f"{image_size[0]}x{image_size[1]}: a mask must have its image's size or aspect ratio")


class ImageTransform:
    """The image geometry (datasets.geometry: resize, then a centre crop or none; PIL bilinear for
    images, nearest for masks) -> [0,1] -> ImageNet normalisation.

    The original used paddle.vision.transforms with the same defaults; this is the same
    arithmetic in NumPy so that decoding can run in threads without touching Paddle. The first
    image of each shape whose crop discards a large share of it is logged once.
    """

    def __init__(self, resize=256, crop_size=224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.geometry = Geometry(resize, crop_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every transformed image and mask."""
        return self.geometry.image_size

    def to_display(self, image: Image.Image) -> np.ndarray:
        """The resized and cropped image as uint8 HWC, as shown in the figures."""
        notice = self.geometry.first_crop_notice(*image.size)
        if notice is not None:
            LOGGER.warning(f"warning: {notice}")
        return np.asarray(self.geometry.apply(image, Image.BILINEAR), dtype=np.uint8)

    def normalise(self, display: np.ndarray) -> np.ndarray:
        chw = display.astype(np.float32).transpose(2, 0, 1) / 255.0
        return (chw - self.mean) / self.std

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalise(self.to_display(image))

    def mask(self, path, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """A ground-truth mask, first brought to `image_size` (w, h) when that differs (see
        mask_fits), then resized and cropped as its image, all with nearest (the original used
        bilinear + truncation)."""
        mask = _decode(path, "mask")
        try:
            mask = mask.convert("L")
        except ValueError as exc:
            raise DataError(f"cannot read mask {path}: {exc}") from None
        if image_size is not None and mask.size != tuple(image_size):
            _check_mask_size(path, mask.size, image_size)
            mask = mask.resize(tuple(image_size), Image.NEAREST)
        return np.asarray(self.geometry.apply(mask, Image.NEAREST)) > 127


@dataclass(frozen=True)
class Sample:
    path: str
    label: int              # 0 normal, 1 anomalous
    defect_type: str
    mask_path: str | None   # None for normal images


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_categories(data_path) -> list[str]:
    """Every folder under ``data_path`` that has a ``train/good`` or ``test`` folder."""
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    try:
        found = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and ((p / "train" / "good").is_dir() or (p / "test").is_dir()))
    except OSError as exc:
        raise DataError(f"cannot read data folder {root}: {exc.strerror or exc}") from None
    if not found:
        raise DataError(f"no category in MVTec layout (<category>/train/good) under {root}")
    return found


# The Gaussian's covariance uses N - 1, and the calibration scores each training image with the
# model of the others (models.calibration.leave_one_out_distances): three images at the least.
MIN_TRAIN_IMAGES = 3


class MVTecDataset:
    """The samples of one category and split, sorted by defect type then file name.

    Built only from a usable split, checked before any image is decoded: at least
    MIN_TRAIN_IMAGES training images; a test split with both good and defective images (image
    ROC-AUC needs both); every image's and mask's header readable and under PIL's pixel limit;
    every defective image with its mask, of the image's size or aspect ratio (mask_fits).
    """

    def __init__(self, data_path, category: str, split: str = "train", resize=256, crop_size=224):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        check_category_name(category)
        root = Path(data_path)
        try:
            category_dir, split_dir = self._locate(root, category, split)
            self.samples = self._list_samples(category_dir, split_dir)
        except OSError as exc:
            raise DataError(f"cannot read {exc.filename or root}: {exc.strerror or exc}") from None
        self.category = category
        self.split = split
        self.transform = ImageTransform(resize, crop_size)
        self._check_split(split_dir)
        self._check_files()

    @staticmethod
    def _locate(root: Path, category: str, split: str) -> tuple[Path, Path]:
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        category_dir = root / category
        if not category_dir.is_dir():
            known = ", ".join(list_categories(root)) if any(root.iterdir()) else "none"
            raise DataError(f"unknown category {category!r}: no folder {category_dir} "
                            f"(categories found: {known})")
        split_dir = category_dir / split
        if not split_dir.is_dir():
            raise DataError(f"no {split} split for {category}: {split_dir} does not exist")
        return category_dir, split_dir

    @staticmethod
    def _list_samples(category_dir: Path, split_dir: Path) -> list[Sample]:
        samples = []
        for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for image_path in list_images(type_dir):
                if type_dir.name == "good":
                    samples.append(Sample(str(image_path), 0, "good", None))
                else:
                    mask = category_dir / "ground_truth" / type_dir.name / f"{image_path.stem}_mask.png"
                    samples.append(Sample(str(image_path), 1, type_dir.name, str(mask)))
        return samples

    def _check_split(self, split_dir: Path) -> None:
        name = f"the {self.split} split of {self.category}"
        if not self.samples:
            raise DataError(f"{name} is empty: no images under {split_dir}")
        if self.split == "train" and len(self.samples) < MIN_TRAIN_IMAGES:
            raise DataError(f"{name} has {len(self.samples)} image(s), at least {MIN_TRAIN_IMAGES} are needed "
                            f"to fit a Gaussian and calibrate its thresholds: add normal images under "
                            f"{split_dir / 'good'}")
        if self.split == "test":
            defective = sum(sample.label for sample in self.samples)
            if defective == 0:
                raise DataError(f"{name} has no defective images (only {split_dir / 'good'}): image ROC-AUC "
                                "needs both good and defective images")
            if defective == len(self.samples):
                raise DataError(f"{name} has no good images (no {split_dir / 'good'} images): image ROC-AUC "
                                "needs both good and defective images")

    def _check_files(self) -> None:
        """Every header (not the pixels), so that a bad file stops the run before it costs a fit
        or replaces a model."""
        missing = [s.mask_path for s in self.samples if s.mask_path is not None and not os.path.isfile(s.mask_path)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"mask not found: {missing[0]}{more} (each defective test image needs "
                            "ground_truth/<defect_type>/<name>_mask.png)")
        for sample in self.samples:
            size = image_size(sample.path)
            if sample.mask_path is not None:
                _check_mask_size(sample.mask_path, image_size(sample.mask_path, "mask"), size, sample.path)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(normalised image [3,H,W] float32, mask [H,W] bool) for one sample."""
        sample = self.samples[index]
        decoded = read_rgb(sample.path)
        image = self.transform(decoded)
        if sample.mask_path is None:
            mask = np.zeros(self.transform.image_size, dtype=bool)
        else:
            mask = self.transform.mask(sample.mask_path, decoded.size)
        return image, mask


@dataclass
class Batch:
    images: np.ndarray      # [B,3,H,W] float32, normalised
    masks: np.ndarray       # [B,H,W] bool
    samples: list
    # uint8 [H,W,3] each, the images as shown in pictures (an ImageList with ``with_display``)
    displays: list | None = None
    # (Sample, one-line message) of the images of this batch that could not be loaded (skip_errors)
    failed: list = field(default_factory=list)


def iterate_batches(dataset, batch_size: int, num_workers: int = 2, prefetch: int = 2,
                    skip_errors: bool = False) -> Iterator[Batch]:
    """Batches in dataset order; decoding runs in threads ahead of the consumer.

    PIL releases the GIL while decoding and resizing, so threads overlap image decoding with
    the backbone's forward pass without the cost of worker processes. An image that cannot be
    loaded (a DataError) stops the iteration, or with ``skip_errors`` goes to its batch's
    ``failed`` list while the others are loaded (a batch may then hold no image).
    """
    indices = list(range(len(dataset)))
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    workers = max(1, int(num_workers))
    height, width = dataset.transform.image_size
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = []
        for chunk in chunks[:prefetch]:
            pending.append([pool.submit(dataset.load, i) for i in chunk])
        for position, chunk in enumerate(chunks):
            futures = pending.pop(0)
            next_position = position + prefetch
            if next_position < len(chunks):
                pending.append([pool.submit(dataset.load, i) for i in chunks[next_position]])
            loaded, samples, failed = [], [], []
            for index, future in zip(chunk, futures):
                try:
                    loaded.append(future.result())
                except DataError as exc:
                    if not skip_errors:
                        raise
                    failed.append((dataset.samples[index], " ".join(str(exc).split())))
                    continue
                samples.append(dataset.samples[index])
            if not loaded:
                yield Batch(np.empty((0, 3, height, width), np.float32), np.empty((0, height, width), bool), [],
                            [], failed)
                continue
            displays = [item[2] for item in loaded] if len(loaded[0]) > 2 else None
            yield Batch(np.stack([item[0] for item in loaded]), np.stack([item[1] for item in loaded]), samples,
                        displays, failed)
    finally:   # a consumer that stops early does not wait for the decodes queued ahead of it
        pool.shutdown(wait=True, cancel_futures=True)


class ImageList:
    """Loose image files (a file or a folder, searched recursively, sorted) for prediction.

    Only the file list is checked here: an image that cannot be read fails when it is loaded, so
    that a run can report it and go on with the others (iterate_batches' ``skip_errors``). With
    ``with_display``, ``load`` also returns the image as shown in pictures.
    """

    def __init__(self, picture_path, resize=256, crop_size=224, with_display: bool = False):
        root = Path(picture_path)
        try:
            if root.is_dir():
                paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if not paths:
                    raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
            elif root.is_file():
                paths = [root]
            else:
                raise DataError(f"picture not found: {root}")
        except OSError as exc:
            raise DataError(f"cannot read {exc.filename or root}: {exc.strerror or exc}") from None
        self.root = root
        self.category = root.name
        self.split = "predict"
        self.transform = ImageTransform(resize, crop_size)
        self.with_display = with_display
        self.samples = [Sample(str(p), -1, "", None) for p in paths]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple:
        """(normalised image [3,H,W] float32, empty mask [H,W] bool), plus the displayed image
        uint8 [H,W,3] with ``with_display``."""
        display = self.transform.to_display(read_rgb(self.samples[index].path))
        empty = np.zeros(self.transform.image_size, dtype=bool)
        if self.with_display:
            return self.transform.normalise(display), empty, display
        return self.transform.normalise(display), empty
