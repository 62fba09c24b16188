"""utils.metrics against hand computations and slow, obviously-correct references."""

import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from utils.metrics import (f1_max_threshold, image_auroc, pixel_auroc, pro_auc, pro_curve,
                           roc_points)


# --------------------------------------------------------------------------- references

def mann_whitney_auc(labels, scores):
    """P(score of an anomalous sample > score of a normal one), ties counting one half."""
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def slow_pro_auc(masks, maps, fpr_limit=0.3):
    """Loop over every threshold and every region; clip the trapezoids at fpr_limit."""
    regions = []  # boolean masks of each region, as full [N, H, W] arrays
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        for k in range(1, n + 1):
            r = np.zeros(masks.shape, dtype=bool)
            r[i] = lab == k
            regions.append(r)
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above & r).sum() / r.sum() for r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / fpr_limit


# --------------------------------------------------------------------------- PRO by hand

def two_images():
    """Image 0 (4x7) has region A of 4 px, image 1 (4x7) region B of 12 px; 40 normal pixels."""
    masks = np.zeros((2, 4, 7), dtype=bool)
    masks[0, 0:2, 0:2] = True  # A: 2x2 = 4 px
    masks[1, 0:3, 3:7] = True  # B: 3x4 = 12 px
    assert (~masks).sum() == 40
    return masks


def test_pro_hand_steps():
    masks = two_images()
    maps = np.zeros(masks.shape)
    maps[0][masks[0]] = 10.0             # A fully found at the top threshold
    b = np.argwhere(masks[1])
    maps[1][tuple(b[:6].T)] = 10.0       # half of B at the top threshold ...
    maps[1][tuple(b[6:].T)] = 3.0        # ... the other half only below the false positives
    maps[0, 3, 3:7] = 5.0                # 4 of 40 normal pixels: FPR 0.1 at threshold 5
    # Curve: (0,0) -> (0, (1+0.5)/2) -> (0.1, 0.75) -> (0.1, 1) -> (1, 1)
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 1])
    np.testing.assert_allclose(pro, [0, 0.75, 0.75, 1, 1])
    expected = (0.1 * 0.75 + 0.2 * 1.0) / 0.3
    assert pro_auc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pro_auc(masks, maps, fpr_limit=0.05) == pytest.approx(0.75, abs=1e-12)
    assert pro_auc(masks, maps) == pytest.approx(slow_pro_auc(masks, maps), abs=1e-12)


def test_pro_hand_interpolated_at_limit():
    masks = two_images()
    maps = np.zeros(masks.shape)
    maps[0][masks[0]] = 10.0
    b = np.argwhere(masks[1])
    maps[1][tuple(b[:6].T)] = 10.0
    maps[1][tuple(b[6:].T)] = 0.0        # tied with 36 normal pixels: one sloped step
    maps[0, 3, 3:7] = 5.0
    # (0,0) -> (0,0.75) -> (0.1,0.75) -> (1, 1); at FPR 0.3: 0.75 + 0.25 * 0.2 / 0.9
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 1])
    np.testing.assert_allclose(pro, [0, 0.75, 0.75, 1])
    y03 = 0.75 + 0.25 * 0.2 / 0.9
    expected = (0.1 * 0.75 + 0.2 * (0.75 + y03) / 2) / 0.3
    assert pro_auc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pro_perfect_and_constant_and_inverted():
    masks = two_images()
    assert pro_auc(masks, masks.astype(float)) == pytest.approx(1.0)
    # A constant map: one step from (0, 0) to (1, 1); area 0.3 * 0.3 / 2, normalised 0.15.
    const = np.full(masks.shape, 0.7)
    assert pro_auc(masks, const) == pytest.approx(0.15)
    fpr, pro = pro_curve(masks, const)
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(pro, [0, 1])
    # Anomalies scored lowest: PRO stays 0 until FPR 1.
    assert pro_auc(masks, -masks.astype(float)) == pytest.approx(0.0)


def test_pro_uses_8_connectivity_per_image():
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: ONE region of 2 px
    masks[0, 4, 4] = True                    # a second region of 1 px
    masks[1, 0, 1] = True                    # next to image 0 (1,1) only across the stack
    maps = np.zeros(masks.shape)
    maps[0, 0, 0] = maps[0, 4, 4] = 1.0
    fpr, pro = pro_curve(masks, maps)
    # 8-connected and per image: regions {2 px, 1 px, 1 px}; at the top: (0.5 + 1 + 0) / 3.
    assert fpr[1] == 0.0
    assert pro[1] == pytest.approx(1.5 / 3)


def test_pro_equals_slow_reference_on_random_data():
    rng = np.random.default_rng(1)
    for trial in range(4):
        masks = ndimage.gaussian_filter(rng.standard_normal((3, 14, 16)), (0, 1.5, 1.5)) > 0.25
        masks[0] = False  # a good image
        maps = rng.standard_normal(masks.shape) + 1.2 * masks
        if trial == 1:
            maps = np.round(maps, 1)  # many ties
        for limit in (0.3, 0.05, 1.0):
            assert pro_auc(masks, maps, limit) == pytest.approx(
                slow_pro_auc(masks, maps, limit), abs=1e-9)


def test_pro_accepts_channel_dim_and_int_masks():
    masks = two_images()
    maps = np.random.default_rng(0).random(masks.shape)
    a = pro_auc(masks, maps)
    assert pro_auc(masks[:, None].astype(np.int64), maps[:, None]) == pytest.approx(a)
    assert pro_auc(masks.astype(np.float32), maps.astype(np.float32)) == pytest.approx(a, abs=1e-6)


def test_pro_errors():
    masks = two_images()
    maps = np.zeros(masks.shape)
    with pytest.raises(ValueError, match="region"):
        pro_auc(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="normal pixels"):
        pro_auc(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="binary"):
        pro_auc(masks * 0.5, maps)
    with pytest.raises(ValueError, match="shape"):
        pro_auc(masks, maps[:1])
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(masks, maps, fpr_limit=0)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pro_auc(masks, bad)


def test_pro_is_fast_on_bottle_sized_input():
    rng = np.random.default_rng(0)
    n, h, w = 83, 224, 224
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(20, n):
        y, x = rng.integers(20, 200, 2)
        masks[i, y:y + 15, x:x + 25] = True
    maps = (rng.random((n, h, w)) + masks).astype(np.float32)
    t0 = time.perf_counter()
    value = pro_auc(masks, maps)
    elapsed = time.perf_counter() - t0
    assert 0.0 < value <= 1.0
    assert elapsed < 8.0, f"pro_auc took {elapsed:.1f} s on 83x224x224"


# --------------------------------------------------------------------------- ROC-AUC

def test_auroc_by_hand():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9]
    # pairs (pos, neg): 0.35 beats 0.1 only -> 1; 0.8 and 0.9 beat all three -> 6; total 7 of 9
    assert mann_whitney_auc(labels, scores) == pytest.approx(7 / 9)
    assert image_auroc(labels, scores) == pytest.approx(7 / 9)
    assert image_auroc(labels, [1, 1, 1, 1, 1, 1]) == pytest.approx(0.5)  # ties count half


def test_auroc_matches_sklearn_and_pair_counting_on_random_data():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert image_auroc(labels, scores) == pytest.approx(mann_whitney_auc(labels, scores))
    masks = rng.random((4, 9, 9)) > 0.8
    maps = rng.normal(size=masks.shape) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(
        mann_whitney_auc(masks.ravel(), maps.ravel()))


def test_auroc_one_class_raises():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc(np.zeros((2, 3, 3)), np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        roc_points([0, 0], [1, 2])


def test_roc_points():
    fpr, tpr = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


# --------------------------------------------------------------------------- F1-max

def test_f1_max_threshold_by_hand():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.5, 0.9]
    # threshold: (TP, FP) -> F1 = 2TP / (2TP + FP + FN), 3 positives
    # 0.9: (1,0) .5 | 0.8: (2,0) .8 | 0.5: (2,1) .667 | 0.4: (2,2) .571 | 0.35: (3,2) .75 | 0.1: .667
    threshold, f1 = f1_max_threshold(labels, scores)
    assert threshold == pytest.approx(0.8)
    assert f1 == pytest.approx(0.8)


def test_f1_max_threshold_edge_cases():
    # Perfect separation: the lowest anomalous score, F1 = 1.
    assert f1_max_threshold([0, 1, 1], [0.0, 2.0, 1.0]) == (pytest.approx(1.0), pytest.approx(1.0))
    # All scores equal: the only threshold, everything positive.
    t, f1 = f1_max_threshold([0, 1, 0, 1], [5.0] * 4)
    assert t == 5.0 and f1 == pytest.approx(2 * 0.5 * 1 / 1.5)
    # All anomalous: no IndexError.
    t, f1 = f1_max_threshold([1, 1], [0.3, 0.7])
    assert t == pytest.approx(0.3) and f1 == pytest.approx(1.0)
    # Pixel masks and maps work as well.
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 1, 1] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 1] = 4.0
    assert f1_max_threshold(masks, maps) == (pytest.approx(4.0), pytest.approx(1.0))
    with pytest.raises(ValueError, match="anomalous"):
        f1_max_threshold([0, 0], [0.1, 0.2])


def test_decision_threshold_keeps_the_f1_max_classification_away_from_every_score():
    from utils.metrics import decision_threshold
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2])
    labels = np.array([0, 1, 0, 1, 1, 0])
    threshold, _ = f1_max_threshold(labels, scores)
    assert threshold == 0.4                      # the best cut is a score itself
    cut = decision_threshold(scores, threshold)
    assert cut == pytest.approx((0.4 + 0.35) / 2)
    np.testing.assert_array_equal(scores > cut, scores >= threshold)
    assert np.min(np.abs(scores - cut)) > 0.02
    assert decision_threshold(scores, 0.1) < 0.1   # nothing below: just under the threshold
