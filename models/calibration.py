"""Verdict thresholds from scores of normal images that the scoring model has not seen, and the
rules that tie verdict, threshold and region together. NumPy only: no files, no Paddle.

The user's knob is a target false-alarm rate ``a`` (the share of normal images called anomalous).
The image threshold is the split-conformal quantile of ``n`` calibration scores: the ``k``-th
smallest with ``k = ceil((n+1)(1-a))``. For a new normal image exchangeable with them,
P(score > threshold) = (n+1-k)/(n+1) <= a (exactly, when scores have no ties; ties only lower
it), and > a - 1/(n+1). Rates below 1/(n+1) cannot be guaranteed with ``n`` images: see
:func:`conformal_threshold`.

The calibration scores come from the training images themselves, each scored as the model
fitted on the others would score it (:func:`leave_one_out_distances`, exact up to a ridge
factor on the safe side), so the final model keeps every training image and no second fit runs.
A new image is scored by the model of all N images, one more than each calibration score saw,
which on average scores new normal images no higher: the rate stays at or below the guarantee.
Neither shortcut works: a model that has seen an image scores it far lower than a new one (a
threshold from those scores flags most normal images), and a model fitted without a held-out
share scores new images far higher than the final one (with few images per feature dimension
the covariance estimate degrades fast), which costs recall.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from utils.morphology import OPENING_RADIUS, open_mask

DEFAULT_FALSE_ALARM_RATE = 0.01
# How far below zero 1 - N q/(N-1)² may come out for an image of the fit: float32 distances summed
# over hundreds of channels are off by a few 1e-5 relative.
FLOAT32_SLACK = 1e-4
# Memory for the embeddings of the calibration images, kept until the fit is finalized: what the
# calibration adds to the fit's memory (otherwise independent of the number of images). Every
# training image calibrates when they fit in it; else as many as fit (ResNet18 at 224: about 200),
# never fewer than the rate needs (images_needed).
CALIBRATION_MEMORY_BYTES = 256 << 20
# The pixel threshold's rate as a share of the image rate. An image score is the maximum of many
# correlated pixels, so a pixel must be far rarer than an image to mark where a defect lies; at
# this share the regions of real defects come out close to those of the test split's F1-max
# pixel threshold, while the image rate's own pixel quantile paints a wide halo around them.
PIXEL_RATE_SHARE = 0.01
VERDICT_SOURCES = ("calibrated", "f1_max")
MAX_SOURCE_CHARS = 1000


class CalibrationError(ValueError):
    """The calibration cannot be done as asked (no images, a rate out of range, too few images)."""


def _check_rate(false_alarm_rate) -> Fraction:
    """The rate as an exact fraction of what the user typed (0.01, not its binary neighbour), so
    that (n+1)(1-a) is an integer exactly when it is one on paper."""
    rate = float(false_alarm_rate)
    if not (0.0 < rate < 1.0):
        raise CalibrationError(f"the false-alarm rate must lie strictly between 0 and 1, got {false_alarm_rate!r}")
    return Fraction(repr(rate))


def conformal_rank(n: int, false_alarm_rate: float) -> int:
    """k = ceil((n+1)(1-a)), the 1-based rank of the conformal threshold among n sorted scores;
    k > n means the rate is not reachable with n images."""
    if n < 1:
        raise CalibrationError("calibration needs at least one normal image")
    return math.ceil((n + 1) * (1 - _check_rate(false_alarm_rate)))


def guaranteed_rate(n: int, rank: int) -> float:
    """P(a new exchangeable normal score > the rank-th smallest of n) without ties: (n+1-k)/(n+1)."""
    return (n + 1 - rank) / (n + 1)


def smallest_achievable_rate(n: int) -> float:
    """The lowest rate n calibration images can guarantee: the largest score's, 1/(n+1)."""
    return 1.0 / (n + 1)


def images_needed(false_alarm_rate: float) -> int:
    """The fewest calibration images for which the rate is reachable: n >= (1-a)/a."""
    rate = _check_rate(false_alarm_rate)
    return math.ceil((1 - rate) / rate)


def conformal_threshold(scores, false_alarm_rate: float, strict: bool = False) -> float:
    """The split-conformal image threshold: the k-th smallest of ``scores`` [n] (normal images,
    unseen by the model that scored them), k = ceil((n+1)(1-a)). Verdicts call a score strictly
    above it anomalous.

    When a < 1/(n+1), k > n and no threshold taken from the scores guarantees the rate: the rule
    then returns the largest score, whose guaranteed rate is 1/(n+1) (the smallest achievable;
    :class:`Calibration` stores it as ``guaranteed_rate`` so the log can say so). With ``strict``
    it raises :class:`CalibrationError` instead, naming that rate and the images needed.
    """
    values = np.asarray(scores).ravel()
    if values.dtype.kind != "f":   # float32 maps stay float32: the k-th smallest is the same number
        values = values.astype(np.float64)
    if values.size == 0:
        raise CalibrationError("calibration needs at least one normal image")
    if not np.all(np.isfinite(values)):
        raise CalibrationError("calibration scores must be finite")
    n = values.size
    rank = conformal_rank(n, false_alarm_rate)
    if rank > n:
        if strict:
            raise CalibrationError(
                f"a false-alarm rate of {float(false_alarm_rate):g} needs at least "
                f"{images_needed(false_alarm_rate)} calibration images; with {n} the smallest "
                f"achievable rate is 1/{n + 1} = {smallest_achievable_rate(n):.4g}")
        rank = n
    return float(np.partition(values, rank - 1)[rank - 1])


def consistent_pixel_threshold(image_threshold: float, pixel_threshold: float) -> float:
    """The pixel threshold never above the image threshold. The image score is the map's maximum,
    so score > image threshold >= pixel threshold puts at least one pixel above the pixel
    threshold: every anomalous verdict has a region to show."""
    return float(min(pixel_threshold, image_threshold))


@dataclass(frozen=True)
class Calibration:
    """The thresholds stored with a model, in the anomaly map's units (Mahalanobis distance).

    ``image_threshold``/``pixel_threshold``: from :func:`calibrate` on ``n_calibration`` normal
    images for the target ``false_alarm_rate`` (images) and ``pixel_false_alarm_rate`` (pixels);
    ``guaranteed_rate`` is the bound that number of images actually gives (above the target when
    there are too few images, see :func:`conformal_threshold`). ``verdicts`` says which pair
    predict/infer use: ``calibrated`` or ``f1_max`` (val.py's F1-max thresholds on the test split,
    kept in ``f1_image_threshold`` and ``f1_pixel_threshold`` once val.py has run). ``source``
    says in words how they were made.
    """
    image_threshold: float
    pixel_threshold: float
    false_alarm_rate: float
    pixel_false_alarm_rate: float
    n_calibration: int
    guaranteed_rate: float
    source: str
    verdicts: str = "calibrated"
    f1_image_threshold: float | None = None
    f1_pixel_threshold: float | None = None

    def __post_init__(self):
        _finite("image_threshold", self.image_threshold)
        _finite("pixel_threshold", self.pixel_threshold)
        if self.pixel_threshold > self.image_threshold:
            raise CalibrationError("the calibrated pixel threshold lies above the image threshold")
        _check_rate(self.false_alarm_rate)
        _check_rate(self.pixel_false_alarm_rate)
        if not 0.0 < float(self.guaranteed_rate) <= 1.0:
            raise CalibrationError(f"guaranteed_rate must lie in (0, 1], got {self.guaranteed_rate!r}")
        if isinstance(self.n_calibration, bool) or not isinstance(self.n_calibration, (int, np.integer)) \
                or self.n_calibration < 1:
            raise CalibrationError(f"n_calibration must be a positive integer, got {self.n_calibration!r}")
        if not isinstance(self.source, str) or len(self.source) > MAX_SOURCE_CHARS:
            raise CalibrationError(f"source must be a text of at most {MAX_SOURCE_CHARS} characters")
        if self.verdicts not in VERDICT_SOURCES:
            raise CalibrationError(f"verdicts must be one of {', '.join(VERDICT_SOURCES)}, got {self.verdicts!r}")
        f1 = (self.f1_image_threshold, self.f1_pixel_threshold)
        if (f1[0] is None) != (f1[1] is None):
            raise CalibrationError("the F1-max thresholds come as a pair")
        if f1[0] is not None:
            _finite("f1_image_threshold", f1[0])
            _finite("f1_pixel_threshold", f1[1])
        elif self.verdicts == "f1_max":
            raise CalibrationError("verdicts from f1_max need the F1-max thresholds (run val.py)")

    def verdict_thresholds(self) -> tuple[float, float, str]:
        """(image threshold, pixel threshold, where they come from) for predict/infer; the pixel
        threshold capped at the image threshold (:func:`consistent_pixel_threshold`)."""
        if self.verdicts == "f1_max":
            return (float(self.f1_image_threshold),
                    consistent_pixel_threshold(self.f1_image_threshold, self.f1_pixel_threshold),
                    "F1-max on the test split (val.py)")
        return float(self.image_threshold), float(self.pixel_threshold), self.source

    def to_dict(self) -> dict:
        """Plain JSON values for the model file's metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values) -> "Calibration":
        """From the model file's metadata, which is untrusted: unknown or missing keys and values
        of the wrong type raise :class:`CalibrationError`."""
        if not isinstance(values, dict):
            raise CalibrationError("calibration must be a mapping")
        names = set(cls.__dataclass_fields__)
        unknown = set(values) - names
        if unknown:
            raise CalibrationError(f"unknown calibration field(s): {', '.join(sorted(map(str, unknown)))}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise CalibrationError(f"incomplete calibration: {exc}") from None


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value):
        raise CalibrationError(f"{name} must be a finite number, got {value!r}")


def pixel_quantile(maps, false_alarm_rate: float) -> float:
    """The conformal quantile of every pixel of the calibration maps [N, H, W] at the pixel rate
    ``false_alarm_rate``: at most that share of normal pixels lie above it."""
    return conformal_threshold(np.asarray(maps, dtype=np.float32).reshape(-1), false_alarm_rate)


def calibrate(maps, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, source: str | None = None,
              pixel_false_alarm_rate: float | None = None) -> Calibration:
    """Thresholds from the anomaly maps [N, H, W] of N normal images, each scored by a model that
    has not seen it (e.g. maps of :func:`leave_one_out_distances`).

    Image threshold: :func:`conformal_threshold` of the image scores (the maps' maxima). Pixel
    threshold: the pixel-level conformal quantile at ``pixel_false_alarm_rate`` (default: the
    image rate times :data:`PIXEL_RATE_SHARE`), so the region of an anomalous image holds its
    pixels that stand out like at most that share of normal pixels; capped at the image
    threshold (:func:`consistent_pixel_threshold`), so that region is never empty. (At the image
    rate itself the cap never binds: the k images whose maximum is <= t = s_(k) hold kP >=
    (nP+1)(1-a) pixels <= t, at least the pixel rank K = ceil((nP+1)(1-a)).)
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise CalibrationError(f"calibration maps must be [N, H, W] with N >= 1, got shape {maps.shape}")
    n = int(maps.shape[0])
    scores = maps.reshape(n, -1).max(axis=1)
    image_threshold = conformal_threshold(scores, false_alarm_rate)
    if pixel_false_alarm_rate is None:
        pixel_false_alarm_rate = float(false_alarm_rate) * PIXEL_RATE_SHARE
    pixel_threshold = consistent_pixel_threshold(image_threshold, pixel_quantile(maps, pixel_false_alarm_rate))
    rank = min(conformal_rank(n, false_alarm_rate), n)
    if source is None:
        source = f"calibrated on {n} normal image(s) for a false-alarm rate of {float(false_alarm_rate):g}"
    return Calibration(image_threshold, pixel_threshold, float(false_alarm_rate), float(pixel_false_alarm_rate), n,
                       guaranteed_rate(n, rank), source)


def anomaly_region(anomaly_map: np.ndarray, pixel_threshold: float, anomalous: bool,
                   opening_radius: int = OPENING_RADIUS) -> np.ndarray:
    """The region shown for one image: [H, W] bool.

    A normal verdict shows no region. An anomalous one shows the pixels above the pixel threshold
    cleaned by an opening with a disk (as the original); when the opening erases them all (a
    peak narrower than the disk), the pixels above the threshold themselves, and when there are
    none (a pixel threshold above the score, given by hand), the map's peak: an anomalous
    verdict always shows where.
    """
    anomaly_map = np.asarray(anomaly_map)
    if not anomalous:
        return np.zeros(anomaly_map.shape, dtype=bool)
    above = anomaly_map > pixel_threshold
    if not above.any():
        return anomaly_map >= anomaly_map.max()
    if opening_radius > 0:
        opened = open_mask(above, opening_radius)
        if opened.any():
            return opened
    return above


def false_alarm_rate(scores, labels, threshold: float) -> float | None:
    """Share of normal images (label 0) scored above ``threshold``; None without normal images."""
    scores, labels = _scores_and_labels(scores, labels)
    normal = labels == 0
    return float(np.mean(scores[normal] > threshold)) if normal.any() else None


def defect_recall(scores, labels, threshold: float) -> float | None:
    """Share of defective images (label 1) scored above ``threshold``; None without defects."""
    scores, labels = _scores_and_labels(scores, labels)
    defective = labels == 1
    return float(np.mean(scores[defective] > threshold)) if defective.any() else None


def verdict_metrics(scores, labels, threshold: float) -> dict:
    """What val.py reports for a threshold: the counts and the two rates (None when undefined)."""
    scores, labels = _scores_and_labels(scores, labels)
    return {
        "threshold": float(threshold),
        "normal_images": int(np.sum(labels == 0)),
        "false_alarms": int(np.sum((labels == 0) & (scores > threshold))),
        "false_alarm_rate": false_alarm_rate(scores, labels, threshold),
        "defective_images": int(np.sum(labels == 1)),
        "defects_found": int(np.sum((labels == 1) & (scores > threshold))),
        "defect_recall": defect_recall(scores, labels, threshold),
    }


def _scores_and_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    return scores, labels


def calibration_images(n_images: int, bytes_per_image: int, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                       budget_bytes: int = CALIBRATION_MEMORY_BYTES) -> np.ndarray:
    """Which of the ``n_images`` sorted training images calibrate (sorted int64 indices): all of
    them when their embeddings (``bytes_per_image`` each, e.g. P·d·4) fit in ``budget_bytes``,
    else as many as fit, but never fewer than :func:`images_needed` for the rate (or all images
    when there are fewer). A subset is spread evenly over the sorted list, so a folder sorted by
    capture time or batch is sampled across its whole range; the same list gives the same plan.
    """
    n = int(n_images)
    if n < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images!r}")
    fitting = int(budget_bytes) // max(int(bytes_per_image), 1)
    count = min(n, max(fitting, images_needed(false_alarm_rate)))
    if count == n:
        return np.arange(n, dtype=np.int64)
    # consecutive picks lie n / count >= 1 apart: all different
    return ((np.arange(count) + 0.5) * n / count).astype(np.int64)


def leave_one_out_distances(distances, n_fit: int) -> np.ndarray:
    """Distances of fitted images as a model fitted without each of them would give them.

    ``distances``: Mahalanobis distances (any shape, e.g. [B, P]) of images that are among the
    ``n_fit`` images of the model, under that model (covariance S/(N-1) + eps·I per position).
    Removing one image x from the sums moves the mean by -u/(N-1) and the scatter by -N/(N-1) u uᵀ,
    u = x - mean; by Sherman-Morrison the squared distance q = uᵀ C⁻¹ u becomes, for the model
    without x with the ridge scaled to eps·(N-1)/(N-2), exactly q_out·(N-2)/(N-1) where

        q_out = (N/(N-1))² q / (1 - N q / (N-1)²)

    A smaller ridge only raises a distance, by at most that factor, so the true leave-one-out
    squared distance (ridge eps) lies in [q_out·(N-2)/(N-1), q_out]; q_out is returned (as a
    distance): calibration on the safe side, from the final model and the calibration images'
    embeddings alone, without a second fit.
    """
    n = int(n_fit)
    if n < 3:
        raise CalibrationError(f"leave-one-out scores need a model of at least 3 images, got {n}")
    squared = np.square(np.asarray(distances, dtype=np.float64))
    remaining = 1.0 - n * squared / (n - 1) ** 2
    if not np.all(remaining > -FLOAT32_SLACK):
        raise CalibrationError("a distance is too large for an image of the fit: leave-one-out scores are only "
                               "defined for images the model was fitted on")
    # An image that alone spans a direction of its position's embeddings (likely when d exceeds
    # the number of images) has 1 - N q/(N-1)² at the level of the float32 scoring's rounding:
    # the model without it would score it very high, which is what the floor gives.
    remaining = np.maximum(remaining, np.finfo(np.float32).eps)
    return np.sqrt((n / (n - 1)) ** 2 * squared / remaining)
