"""Binary morphology of masks in NumPy alone (no SciPy or scikit-image import): the opening that
cleans a predicted region and the boundary drawn around it, with scikit-image's border rule."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# Radius of the disk that opens a predicted region (the original's disk(4)).
OPENING_RADIUS = 4


def _shifted_reduce(mask: np.ndarray, offsets, reduce) -> np.ndarray:
    """``reduce`` (np.logical_and: erosion, np.logical_or: dilation) of ``mask`` shifted by each
    (dy, dx) offset, with the border mirrored (d c b a | a b c d) as scikit-image's default."""
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = np.pad(mask, reach, mode="symmetric")
    height, width = mask.shape
    result = None
    for dy, dx in offsets:
        window = padded[reach + dy:reach + dy + height, reach + dx:reach + dx + width]
        result = window.copy() if result is None else reduce(result, window, out=result)
    return result


@lru_cache(maxsize=None)
def _disk_offsets(radius: int) -> tuple:
    return tuple((dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                 if dy * dy + dx * dx <= radius * radius)


_CROSS_OFFSETS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def open_mask(mask: np.ndarray, radius: int = OPENING_RADIUS) -> np.ndarray:
    """Binary opening (erosion, then dilation) by a disk: removes specks narrower than the disk."""
    offsets = _disk_offsets(radius)
    eroded = _shifted_reduce(np.asarray(mask, dtype=bool), offsets, np.logical_and)
    return _shifted_reduce(eroded, offsets, np.logical_or)


def thick_boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels on either side of the mask's edge (scikit-image's find_boundaries, mode 'thick')."""
    mask = np.asarray(mask, dtype=bool)
    grown = _shifted_reduce(mask, _CROSS_OFFSETS, np.logical_or)
    shrunk = _shifted_reduce(mask, _CROSS_OFFSETS, np.logical_and)
    return grown & ~shrunk
