"""MVTec AD layout reader and the image/mask transforms of the original PaDiM-Paddle.

Layout: ``<root>/<category>/{train,test}/<defect_type>/*.png`` with masks in
``<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png``. Any folder in that layout
works, not only the 15 MVTec categories.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

CLASS_NAMES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A user-facing problem with the data: missing folder, empty split, unreadable image."""


def parse_size(value) -> tuple[int, int]:
    """``224`` or ``"224"`` -> (224, 224); ``"224x320"`` / ``"224,320"`` -> (224, 320) as (H, W)."""
    if isinstance(value, (tuple, list)):
        height, width = (int(v) for v in value)
    else:
        text = str(value).lower().replace(",", "x")
        parts = text.split("x")
        if len(parts) == 1:
            height = width = int(parts[0])
        elif len(parts) == 2:
            height, width = int(parts[0]), int(parts[1])
        else:
            raise ValueError(f"size must be N or HxW, got {value!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return height, width


def _resize_shorter_side(image: Image.Image, size: int, resample) -> Image.Image:
    # Same rule as paddle.vision.transforms.Resize(int): shorter side to `size`, the other
    # side scaled and truncated with int(), no resize when the shorter side already matches.
    width, height = image.size
    if (width <= height and width == size) or (height <= width and height == size):
        return image
    if width < height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    return image.resize((new_w, new_h), resample)


def _center_crop(image: Image.Image, crop: tuple[int, int]) -> Image.Image:
    width, height = image.size
    crop_h, crop_w = crop
    if crop_h > height or crop_w > width:
        raise DataError(
            f"crop {crop_h}x{crop_w} is larger than the resized image {height}x{width}; "
            "lower --crop_size or raise --resize")
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def read_rgb(path) -> Image.Image:
    """Decode an image file as RGB (grey, palette and RGBA images are converted)."""
    try:
        with Image.open(path) as image:
            image.load()
            # convert() copies even an RGB image (a full pass over a 900x900 bottle image)
            return image if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


class ImageTransform:
    """Resize (shorter side, PIL bilinear) -> CenterCrop -> [0,1] -> ImageNet normalisation.

    The original used paddle.vision.transforms with the same defaults; this is the same
    arithmetic in NumPy so that decoding can run in threads without touching Paddle.
    """

    def __init__(self, resize: int = 256, crop_size=224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.resize = int(resize)
        self.crop_size = parse_size(crop_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def to_display(self, image: Image.Image) -> np.ndarray:
        """The resized and cropped image as uint8 HWC, as shown in the figures."""
        image = _resize_shorter_side(image, self.resize, Image.BILINEAR)
        return np.asarray(_center_crop(image, self.crop_size), dtype=np.uint8)

    def normalise(self, display: np.ndarray) -> np.ndarray:
        chw = display.astype(np.float32).transpose(2, 0, 1) / 255.0
        return (chw - self.mean) / self.std

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalise(self.to_display(image))

    def mask(self, path) -> np.ndarray:
        """A ground-truth mask resized with nearest (the original used bilinear + truncation)."""
        try:
            with Image.open(path) as mask:
                mask = mask.convert("L")
                mask = _resize_shorter_side(mask, self.resize, Image.NEAREST)
                return np.asarray(_center_crop(mask, self.crop_size)) > 127
        except FileNotFoundError:
            raise DataError(f"mask not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read mask {path}: {exc}") from None


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
    found = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and ((p / "train" / "good").is_dir() or (p / "test").is_dir()))
    if not found:
        raise DataError(f"no category in MVTec layout (<category>/train/good) under {root}")
    return found


class MVTecDataset:
    """The samples of one category and split, sorted by defect type then file name."""

    def __init__(self, data_path, category: str, split: str = "train", resize: int = 256,
                 crop_size=224):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(data_path)
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
        self.category = category
        self.split = split
        self.transform = ImageTransform(resize, crop_size)
        self.samples = self._list_samples(category_dir, split_dir)
        if not self.samples:
            raise DataError(f"the {split} split of {category} is empty: no images under {split_dir}")

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

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(normalised image [3,H,W] float32, mask [H,W] bool) for one sample."""
        sample = self.samples[index]
        image = self.transform(read_rgb(sample.path))
        if sample.mask_path is None:
            mask = np.zeros(self.transform.crop_size, dtype=bool)
        else:
            mask = self.transform.mask(sample.mask_path)
        return image, mask


@dataclass
class Batch:
    images: np.ndarray      # [B,3,H,W] float32, normalised
    masks: np.ndarray       # [B,H,W] bool
    samples: list


def iterate_batches(dataset: MVTecDataset, batch_size: int, num_workers: int = 2,
                    prefetch: int = 2) -> Iterator[Batch]:
    """Batches in dataset order; decoding runs in threads ahead of the consumer.

    PIL releases the GIL while decoding and resizing, so threads overlap image decoding with
    the backbone's forward pass without the cost of worker processes.
    """
    indices = list(range(len(dataset)))
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    workers = max(1, int(num_workers))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for chunk in chunks[:prefetch]:
            pending.append([pool.submit(dataset.load, i) for i in chunk])
        for position, chunk in enumerate(chunks):
            futures = pending.pop(0)
            next_position = position + prefetch
            if next_position < len(chunks):
                pending.append([pool.submit(dataset.load, i) for i in chunks[next_position]])
            loaded = [f.result() for f in futures]
            yield Batch(np.stack([item[0] for item in loaded]),
                        np.stack([item[1] for item in loaded]),
                        [dataset.samples[i] for i in chunk])


class ImageList:
    """Loose image files (a file or a folder, searched recursively, sorted) for prediction."""

    def __init__(self, picture_path, resize: int = 256, crop_size=224):
        root = Path(picture_path)
        if root.is_dir():
            paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not paths:
                raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        elif root.is_file():
            paths = [root]
        else:
            raise DataError(f"picture not found: {root}")
        self.root = root
        self.category = root.name
        self.split = "predict"
        self.transform = ImageTransform(resize, crop_size)
        self.samples = [Sample(str(p), -1, "", None) for p in paths]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.transform(read_rgb(self.samples[index].path))
        return image, np.zeros(self.transform.crop_size, dtype=bool)
