"""Evaluation maths: image / pixel ROC-AUC, the F1-max threshold and PRO (AUPRO).

numpy, scipy and scikit-learn only (no paddle), so it is fast to import and easy to test.

Conventions: ``labels`` are per-image 0/1 (1 = anomalous), ``scores`` the matching floats;
``masks`` are ground-truth masks [N, H, W] (bool, or numbers that are all 0 or 1; [H, W] and
[N, 1, H, W] are accepted too) and ``maps`` the anomaly maps of the same shape. A higher score
means more anomalous; a pixel or image is called anomalous at threshold t when its score >= t.

PRO follows the MVTec AD evaluation (Bergmann et al.) that the PaDiM paper reports:
- regions are the connected components of each ground-truth mask, labelled per image with
  8-connectivity (a 3x3 structure of ones, as the official ``scipy.ndimage.label(gt, structure=
  np.ones((3, 3)))`` call does); components never join across images;
- at a threshold t, PRO(t) is the mean over all regions of all images of the fraction of the
  region's pixels with score >= t, and FPR(t) is the fraction of normal pixels (outside every
  mask, in every image, good images included) with score >= t;
- the curve is integrated over FPR in [0, fpr_limit] (0.3 in the paper) with the trapezoid rule,
  interpolating linearly at exactly fpr_limit, and divided by fpr_limit, so a perfect map gets 1.
The curve is exact (every distinct score is a threshold), computed by one sort of all pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "roc_points",
    "f1_max_threshold",
    "pro_curve",
    "pro_auc",
]


# --------------------------------------------------------------------------- input checks

def _binary(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what} must be bool or 0/1 numbers, got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        example = a[bad].flat[0]
        raise ValueError(f"{what} must be binary (bool or 0/1), found the value {example!r}; "
                         "threshold soft masks (e.g. mask > 0.5) before evaluation")
    return a == 1


def _finite(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{what} must be real numbers, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} contain NaN or inf")
    return a


def _pair(truth, score, truth_name: str, score_name: str):
    t = _binary(truth, truth_name)
    s = _finite(score, score_name)
    if t.shape != s.shape:
        raise ValueError(f"{truth_name} {t.shape} and {score_name} {s.shape} differ in shape")
    if t.size == 0:
        raise ValueError(f"{truth_name} is empty")
    return t.ravel(), s.ravel()


def _both_classes(t: np.ndarray, what: str) -> None:
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.size:
        only = "anomalous" if n_pos else "normal"
        raise ValueError(f"ROC-AUC needs both normal and anomalous samples, but every {what} "
                         f"is {only}")


# --------------------------------------------------------------------------- ROC-AUC

def image_auroc(labels, scores) -> float:
    """Image-level ROC-AUC (sklearn's ``roc_auc_score``) of per-image labels and scores."""
    t, s = _pair(labels, scores, "labels", "scores")
    _both_classes(t, "image")
    return float(roc_auc_score(t, s))


def pixel_auroc(masks, maps) -> float:
    """Pixel-level ROC-AUC of ground-truth masks [N, H, W] and anomaly maps [N, H, W]."""
    t, s = _pair(masks, maps, "masks", "maps")
    _both_classes(t, "pixel")
    return float(roc_auc_score(t, s))


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve (sklearn's ``roc_curve``), for plotting. Any shape, flattened."""
    t, s = _pair(labels, scores, "labels", "scores")
    _both_classes(t, "sample")
    fpr, tpr, _ = roc_curve(t, s)
    return fpr, tpr


# --------------------------------------------------------------------------- F1-max threshold

def f1_max_threshold(labels, scores) -> tuple[float, float]:
    """(threshold, F1) at the maximum F1 over sklearn's precision-recall curve.

    The original PaDiM-Paddle rule: ``precision_recall_curve``, F1 = 2PR/(P+R) with 0 where
    P+R = 0, threshold = ``thresholds[argmax(F1)]``. ``precision_recall_curve`` returns one more
    (P, R) point than thresholds, the final (P=1, R=0) with F1 = 0; the argmax is taken over the
    points that have a threshold, which gives the original's answer and never indexes past the end.
    Works on images (labels, scores) or pixels (masks, maps), any shape.
    """
    t, s = _pair(labels, scores, "labels", "scores")
    if not t.any():
        raise ValueError("F1 needs at least one anomalous sample, but every label is normal")
    precision, recall, thresholds = precision_recall_curve(t, s)
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1[: len(thresholds)]))
    return float(thresholds[best]), float(f1[best])


def decision_threshold(scores, threshold: float) -> float:
    """A cut for the rule ``score > cut`` that classifies every given score exactly as
    ``score >= threshold`` does: midway between ``threshold`` and the largest score below it.

    F1-max thresholds are themselves scores; stored as such, the image that defines them sits
    on the boundary and flips with the last bit of float noise (oneDNN, ONNX Runtime, threads).
    """
    s = _finite(np.asarray(scores, dtype=np.float64).ravel(), "scores")
    below = s[s < threshold]
    if below.size == 0:
        return float(np.nextafter(threshold, -np.inf))
    return float((threshold + below.max()) / 2.0)


# --------------------------------------------------------------------------- PRO

def _as_stack(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"expected masks/maps of shape [N, H, W] (or [H, W], [N, 1, H, W]), "
                         f"got {a.shape}")
    return a


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: (fpr, pro), both non-decreasing, from (0, 0) to (1, 1).

    One point per distinct score (threshold = that score, pixels >= it are positive), plus the
    starting point (0, 0) for a threshold above every score. See the module docstring.
    """
    m = _binary(masks, "masks")
    s = _finite(maps, "maps")
    if m.shape != s.shape:
        raise ValueError(f"masks {m.shape} and maps {s.shape} differ in shape")
    m, s = _as_stack(m), _as_stack(s)

    # 8-connected components inside each image, none across images.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(m, structure=structure)
    if n_regions == 0:
        raise ValueError("PRO needs at least one anomalous region, but every mask is empty")
    regions = regions.ravel()
    sizes = np.bincount(regions, minlength=n_regions + 1)
    n_normal = int(sizes[0])
    if n_normal == 0:
        raise ValueError("PRO needs normal pixels for its FPR, but every pixel is in a mask")

    # Each region pixel carries 1 / (region size * number of regions): summing the weights of
    # the pixels at or above a threshold gives the mean per-region overlap at that threshold.
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (sizes[1:].astype(np.float64) * n_regions)

    flat = s.ravel()
    order = np.argsort(flat, kind="stable")[::-1]  # descending scores
    sorted_scores = flat[order]
    sorted_regions = regions[order]
    fp = np.cumsum(sorted_regions == 0, dtype=np.int64)
    pro = np.cumsum(weight[sorted_regions])
    # A threshold admits all pixels with equal scores at once: keep the last of each tie run.
    last = np.empty(flat.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=last[:-1])
    last[-1] = True
    fpr = np.concatenate(([0.0], fp[last] / n_normal))
    pro = np.concatenate(([0.0], np.clip(pro[last], 0.0, 1.0)))
    pro[-1] = 1.0  # the lowest threshold covers every region (cumsum rounding aside)
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing, for x in [x[0], x_max]."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max: x[:k]
    area = float(np.trapezoid(y[:k], x[:k])) if k > 1 else 0.0
    if 0 < k < len(x) and x[k - 1] < x_max:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_max) * (x_max - x0)
    return area


def pro_auc(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (paper: 0.3); 1 is perfect."""
    if not (0.0 < float(fpr_limit) <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(masks, maps)
    return _area_up_to(fpr, pro, float(fpr_limit)) / float(fpr_limit)
