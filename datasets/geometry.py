"""Image geometry: how an input image of any shape becomes the model's fixed input size.

``--resize N`` scales the shorter side to N (the original's Resize(int): the other side scaled and
truncated with int(), no resampling when the shorter side already is N); ``--resize HxW`` scales
to exactly H rows and W columns (aspect ratio not kept). ``--crop_size HxW`` (or N) then keeps the
centre; ``--crop_size none`` keeps everything, which needs ``--resize HxW`` so that every image
gets the same size. Sizes are (height, width) throughout; PIL's are (width, height).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from PIL import Image

from datasets import DataError

# The original's Resize 256 -> CenterCrop 224 trims 23.4% of a square image's area, a border the
# MVTec objects do not reach; a crop that discards more than this share is worth a log line.
CROP_NOTICE_SHARE = 0.25
# A side beyond this is a typo or a hostile model file, not an image size for a CNN.
MAX_SIDE = 16384
NO_CROP = "none"
# (geometry, width, height) already noticed in this process: one notice per image shape.
_NOTICED: set = set()
_NOTICED_LOCK = threading.Lock()


class GeometryError(DataError):
    """A resize/crop setting that cannot work (in a flag or a model file)."""


def _side(value, what: str) -> int:
    if isinstance(value, bool):
        raise GeometryError(f"{what} must be a positive integer, got {value!r}")
    try:
        side = int(value)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} must be a positive integer, got {value!r}") from None
    if side != value and str(side) != str(value).strip():
        raise GeometryError(f"{what} must be a positive integer, got {value!r}")
    if not 1 <= side <= MAX_SIDE:
        raise GeometryError(f"{what} must lie between 1 and {MAX_SIDE}, got {value!r}")
    return side


def _pair(value, what: str) -> tuple[int, int]:
    """(H, W) from "HxW", "H,W" or a 2-sequence."""
    if isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = str(value).lower().replace(",", "x").split("x")
    if len(parts) != 2:
        raise GeometryError(f"{what} must be N or HxW, got {value!r}")
    return _side(parts[0], what), _side(parts[1], what)


def parse_resize(value) -> int | tuple[int, int]:
    """``--resize``: ``"256"`` -> 256 (shorter side); ``"224x448"`` -> (224, 448), exact (H, W)."""
    if isinstance(value, (tuple, list)) or any(sep in str(value).lower() for sep in "x,"):
        return _pair(value, "--resize")
    return _side(value, "--resize")


def parse_size(value, what: str = "size") -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"224x320"`` -> (224, 320) as (H, W)."""
    if isinstance(value, (tuple, list)) or any(sep in str(value).lower() for sep in "x,"):
        return _pair(value, what)
    side = _side(value, what)
    return side, side


def parse_crop(value) -> tuple[int, int] | None:
    """``--crop_size``: ``"none"`` (or None) -> None, no crop; ``"224"`` -> (224, 224);
    ``"224x320"`` -> (224, 320) as (H, W)."""
    if value is None or str(value).strip().lower() == NO_CROP:
        return None
    return parse_size(value, "--crop_size")


@dataclass(frozen=True)
class Geometry:
    """``resize``: int (shorter side) or (H, W) (exact); ``crop``: (H, W) centre crop or None."""
    resize: int | tuple[int, int] = 256
    crop: tuple[int, int] | None = (224, 224)

    def __post_init__(self):
        object.__setattr__(self, "resize", parse_resize(self.resize))
        object.__setattr__(self, "crop", parse_crop(self.crop))
        if self.crop is None and isinstance(self.resize, int):
            raise GeometryError(
                f"--crop_size {NO_CROP} needs an exact --resize HxW: with --resize {self.resize} (the shorter "
                "side) the size would change with each image's shape")
        if self.crop is not None and isinstance(self.resize, tuple) and (
                self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]):
            raise GeometryError(f"--crop_size {self.crop[0]}x{self.crop[1]} is larger than --resize "
                                f"{self.resize[0]}x{self.resize[1]}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image the model sees."""
        return self.crop if self.crop is not None else self.resize

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) after the resize of a ``width`` x ``height`` image."""
        if width < 1 or height < 1:
            raise GeometryError(f"empty image: {width}x{height} pixels")
        if isinstance(self.resize, tuple):
            return self.resize
        size = self.resize
        if width < height:
            return int(size * height / width), size
        return size, int(size * width / height)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of a ``width`` x ``height`` image after resize and crop (the crop must fit)."""
        self._check_crop_fits(self.resized_size(width, height))
        return self.image_size

    def _check_crop_fits(self, resized: tuple[int, int]) -> None:
        if self.crop is not None and (self.crop[0] > resized[0] or self.crop[1] > resized[1]):
            raise GeometryError(f"crop {self.crop[0]}x{self.crop[1]} is larger than the resized image "
                                f"{resized[0]}x{resized[1]}; lower --crop_size or raise --resize")

    def apply(self, image: Image.Image, resample=Image.BILINEAR) -> Image.Image:
        """Resize (``resample``: bilinear for images, nearest for masks), then the centre crop."""
        height, width = self.resized_size(*image.size)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample)
        if self.crop is None:
            return image
        self._check_crop_fits((height, width))
        crop_h, crop_w = self.crop
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
        return image.crop((left, top, left + crop_w, top + crop_h))

    def discarded_share(self, width: int, height: int) -> float:
        """Share of a ``width`` x ``height`` image's area that the crop removes (0 without crop)."""
        if self.crop is None:
            return 0.0
        resized_h, resized_w = self.resized_size(width, height)
        return max(0.0, 1.0 - (self.crop[0] * self.crop[1]) / (resized_h * resized_w))

    def crop_notice(self, width: int, height: int) -> str | None:
        """A log line when the crop discards more than :data:`CROP_NOTICE_SHARE` of the image's
        area (a defect there is never seen), else None. Callers log it once per image shape."""
        share = self.discarded_share(width, height)
        if share <= CROP_NOTICE_SHARE:
            return None
        resized_h, resized_w = self.resized_size(width, height)
        return (f"the centre crop {self.crop[0]}x{self.crop[1]} of {height}x{width} images (resized to "
                f"{resized_h}x{resized_w}) discards {share:.0%} of their area: defects there are not seen; "
                f"--resize {resized_h}x{resized_w} --crop_size {NO_CROP} keeps it all")

    def first_crop_notice(self, width: int, height: int) -> str | None:
        """:meth:`crop_notice` the first time this process meets a ``width`` x ``height`` image
        under this geometry, else None (safe to call from decoding threads)."""
        key = (self, int(width), int(height))
        with _NOTICED_LOCK:
            if key in _NOTICED:
                return None
            _NOTICED.add(key)
        return self.crop_notice(width, height)

    def to_meta(self) -> dict:
        """JSON values for the model file: resize N or [H, W]; crop_size [H, W] or None."""
        resize = self.resize if isinstance(self.resize, int) else list(self.resize)
        return {"resize": resize, "crop_size": None if self.crop is None else list(self.crop)}
