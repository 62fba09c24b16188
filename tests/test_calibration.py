"""models.calibration: the conformal threshold's finite-sample guarantee, the region rule, the
stored record, the val.py counts and the choice of calibration images."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import ndtr

from models.calibration import (Calibration, CalibrationError, anomaly_region, calibrate, calibration_images,
                                conformal_rank, conformal_threshold, consistent_pixel_threshold, defect_recall,
                                false_alarm_rate, images_needed, leave_one_out_distances, smallest_achievable_rate,
                                verdict_metrics)


@pytest.mark.parametrize("rate, expected", [
    # n = 5, sorted scores 1..5; k = ceil(6 (1 - a)) worked out by hand
    (0.5, 3.0),     # 6 * 0.5 = 3 exactly
    (0.34, 4.0),    # 6 * 0.66 = 3.96 -> 4
    (0.2, 5.0),     # 6 * 0.8 = 4.8 -> 5, the largest
    (1 / 6, 5.0),   # 6 * 5/6 = 5 exactly: still reachable
])
def test_threshold_is_the_hand_computed_order_statistic(rate, expected):
    assert conformal_threshold([3.0, 1.0, 2.0, 5.0, 4.0], rate) == expected


def test_an_exact_product_is_not_pushed_up_by_binary_rounding():
    # (99 + 1)(1 - 0.01) = 99 on paper: the 99th of 99 scores, not "unreachable"
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(98, 0.01) == 99        # 99 * 0.99 = 98.01 -> 99 > 98
    assert images_needed(0.01) == 99
    assert images_needed(0.05) == 19
    assert images_needed(0.1) == 9


def test_unreachable_rate_takes_the_largest_score_or_raises_when_strict():
    scores = np.arange(50, dtype=float)
    assert conformal_threshold(scores, 0.01) == 49.0
    assert smallest_achievable_rate(50) == pytest.approx(1 / 51)
    with pytest.raises(CalibrationError, match=r"at least 99 calibration images.*1/51"):
        conformal_threshold(scores, 0.01, strict=True)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan")])
def test_rates_outside_the_open_interval_are_refused(bad):
    with pytest.raises(CalibrationError):
        conformal_threshold([1.0, 2.0], bad)


def test_no_scores_or_non_finite_scores_are_refused():
    with pytest.raises(CalibrationError):
        conformal_threshold([], 0.1)
    with pytest.raises(CalibrationError):
        conformal_threshold([1.0, float("inf")], 0.1)


def _exceedance(thresholds: np.ndarray) -> np.ndarray:
    """P(N(0,1) > t), exact."""
    return ndtr(-thresholds)


@pytest.mark.parametrize("rate", [0.1, 0.05])
def test_false_alarm_rate_on_fresh_normal_draws_is_within_the_finite_sample_bounds(rate):
    """2000 calibrations of n = 50 standard-normal scores, each judged on 200 fresh draws."""
    rng = np.random.default_rng(0)
    n, repeats, fresh = 50, 2000, 200
    calibration = rng.standard_normal((repeats, n))
    thresholds = np.array([conformal_threshold(row, rate) for row in calibration])
    empirical = np.mean(rng.standard_normal((repeats, fresh)) > thresholds[:, None])
    k = math.ceil((n + 1) * (1 - rate))
    exact = (n + 1 - k) / (n + 1)      # the rank of a fresh draw among n + 1 is uniform
    # Monte-Carlo error: the per-calibration rate is Beta(n+1-k, k); plus the binomial of the draws
    alpha, beta = n + 1 - k, k
    spread = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    sigma = math.sqrt(spread / repeats + exact * (1 - exact) / (repeats * fresh))
    assert abs(empirical - exact) < 4 * sigma
    assert rate - 1 / (n + 1) - 4 * sigma <= empirical <= rate + 4 * sigma
    # the same guarantee from the exact tail probability, without draw noise
    assert rate - 1 / (n + 1) - 4 * math.sqrt(spread / repeats) <= _exceedance(thresholds).mean() \
        <= rate + 4 * math.sqrt(spread / repeats)
    # the plain empirical quantile overshoots the target: the bound above can fail
    naive = np.quantile(calibration, 1 - rate, axis=1)
    assert _exceedance(naive).mean() > rate + 4 * math.sqrt(spread / repeats)


def _blob_maps(rng, count, size=32):
    """Smooth random maps: a few Gaussian bumps of random height on a noisy floor."""
    yy, xx = np.mgrid[:size, :size]
    maps = rng.uniform(0, 1, (count, size, size)).astype(np.float32)
    for m in maps:
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            width = rng.uniform(1.0, 6.0)
            m += rng.uniform(0, 6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    return maps


def test_calibrated_pixel_threshold_never_exceeds_the_image_threshold():
    rng = np.random.default_rng(1)
    for rate in (0.5, 0.1, 0.01, 1e-4):
        maps = _blob_maps(rng, 40)
        for pixel_rate in (None, rate, 1e-7):
            calibration = calibrate(maps, rate, pixel_false_alarm_rate=pixel_rate)
            assert calibration.pixel_threshold <= calibration.image_threshold
    # at the image rate itself the pixel quantile lies at or below the image threshold uncapped
    from models.calibration import pixel_quantile
    maps = _blob_maps(rng, 40)
    assert pixel_quantile(maps, 0.1) <= conformal_threshold(maps.reshape(40, -1).max(axis=1), 0.1)
    # a pixel rate no pixel count can reach: capped at the image threshold
    tiny = calibrate(maps, 0.1, pixel_false_alarm_rate=1e-9)
    assert tiny.pixel_threshold == tiny.image_threshold < maps.max()
    # the cap itself, for thresholds that come from elsewhere
    assert consistent_pixel_threshold(5.0, 7.0) == 5.0 and consistent_pixel_threshold(5.0, 3.0) == 3.0


def test_calibrate_matches_a_hand_count():
    maps = np.arange(16, dtype=np.float32).reshape(4, 4).T.reshape(4, 2, 2)    # map i: i, i+4, i+8, i+12
    scores = maps.reshape(4, -1).max(axis=1)
    assert sorted(scores) == [12.0, 13.0, 14.0, 15.0]
    result = calibrate(maps, 0.4, pixel_false_alarm_rate=0.4)   # k = ceil(5 * 0.6) = 3 -> 14; pixels:
    assert (result.image_threshold, result.pixel_threshold) == (14.0, 10.0)     # ceil(17 * 0.6) = 11 -> 10
    # the default pixel rate 0.4 / 100: ceil(17 * 0.996) = 17 > 16 pixels -> the largest, capped at 14
    assert calibrate(maps, 0.4).pixel_threshold == 14.0
    assert result.n_calibration == 4 and result.guaranteed_rate == pytest.approx(2 / 5)


def test_every_anomalous_verdict_has_a_region():
    rng = np.random.default_rng(2)
    calibration = calibrate(_blob_maps(rng, 60), 0.1)
    maps = _blob_maps(rng, 300) * rng.uniform(0.8, 1.6, (300, 1, 1)).astype(np.float32)
    # and maps whose only excess is a one-pixel spike just above the threshold: the original's
    # opening by a disk erases it
    spikes = rng.uniform(0, 1, (20, 32, 32)).astype(np.float32) * calibration.pixel_threshold * 0.5
    spikes[:, 16, 16] = calibration.image_threshold + 1e-3
    maps = np.concatenate([maps, spikes])
    scores = maps.reshape(len(maps), -1).max(axis=1)
    anomalous = scores > calibration.image_threshold
    assert anomalous.sum() > 40 and (~anomalous).sum() > 40
    for m, verdict in zip(maps, anomalous):
        region = anomaly_region(m, calibration.pixel_threshold, verdict)
        assert (region.sum() > 0) == verdict
    # the spike is the case that needs the fallback: an opening alone leaves nothing
    from skimage import morphology
    assert not morphology.opening(spikes[0] > calibration.pixel_threshold, morphology.disk(4)).any()


def test_region_is_the_opened_mask_when_that_is_not_empty():
    m = np.zeros((30, 30), np.float32)
    m[5:20, 5:20] = 5.0     # a 15x15 square survives an opening by disk(4), less its corners...
    m[25, 25] = 5.0         # ...a lone pixel does not
    region = anomaly_region(m, 1.0, True)
    square = m == 5.0
    square[25, 25] = False
    # an opening is the union of the disks that fit inside: built here by brute force
    yy, xx = np.mgrid[-4:5, -4:5]
    disk = yy ** 2 + xx ** 2 <= 16
    expected = np.zeros_like(square)
    for cy in range(4, 26):
        for cx in range(4, 26):
            if square[cy - 4:cy + 5, cx - 4:cx + 5][disk].all():
                expected[cy - 4:cy + 5, cx - 4:cx + 5] |= disk
    np.testing.assert_array_equal(region, expected)
    assert region[9:16, 9:16].all() and not region[25, 25] and region.sum() < square.sum()
    # a threshold given by hand above the score: the peak is shown
    peak = anomaly_region(m, 9.0, True)
    assert peak.sum() == 226 and peak[25, 25]


def test_counts_for_val_by_hand():
    scores = [1.0, 5.0, 3.0, 7.0, 2.0, 6.0]
    labels = [0, 0, 0, 1, 1, 1]
    # threshold 2.5: normals 5, 3 above -> 2/3; defects 7, 6 above, 2 not -> 2/3; equal is not above
    assert false_alarm_rate(scores, labels, 2.5) == pytest.approx(2 / 3)
    assert defect_recall(scores, labels, 2.5) == pytest.approx(2 / 3)
    assert false_alarm_rate(scores, labels, 5.0) == pytest.approx(0.0)
    metrics = verdict_metrics(scores, labels, 5.0)
    assert metrics == {"threshold": 5.0, "normal_images": 3, "false_alarms": 0, "false_alarm_rate": 0.0,
                       "defective_images": 3, "defects_found": 2, "defect_recall": pytest.approx(2 / 3)}
    assert defect_recall([1.0], [0], 0.5) is None and false_alarm_rate([1.0], [1], 0.5) is None
    json.dumps(verdict_metrics([1.0], [1], 0.5))   # None, not NaN: valid JSON


def _record(**changes):
    values = dict(image_threshold=10.0, pixel_threshold=8.0, false_alarm_rate=0.01, pixel_false_alarm_rate=1e-4,
                  n_calibration=99,
                  guaranteed_rate=0.01, source="calibrated on 99 held-out images")
    values.update(changes)
    return values


def test_record_round_trips_through_json_and_says_which_pair_the_verdicts_use():
    stored = Calibration(**_record())
    loaded = Calibration.from_dict(json.loads(json.dumps(stored.to_dict())))
    assert loaded == stored
    assert loaded.verdict_thresholds() == (10.0, 8.0, "calibrated on 99 held-out images")
    f1 = Calibration(**_record(verdicts="f1_max", f1_image_threshold=12.0, f1_pixel_threshold=14.0))
    image, pixel, source = f1.verdict_thresholds()
    assert (image, pixel) == (12.0, 12.0) and "F1" in source      # pixel capped at the image threshold


@pytest.mark.parametrize("changes", [
    {"image_threshold": float("nan")}, {"pixel_threshold": "8"}, {"pixel_threshold": 11.0},
    {"false_alarm_rate": 1.5}, {"pixel_false_alarm_rate": 0}, {"n_calibration": 0}, {"n_calibration": True}, {"n_calibration": 2.5},
    {"verdicts": "whatever"}, {"verdicts": "f1_max"}, {"f1_image_threshold": 3.0},
    {"guaranteed_rate": 0.0}, {"source": "x" * 5000}, {"unexpected": 1},
])
def test_record_from_an_untrusted_file_is_checked(changes):
    with pytest.raises(CalibrationError):
        Calibration.from_dict(_record(**changes))
    with pytest.raises(CalibrationError):
        Calibration.from_dict([1, 2])
    with pytest.raises(CalibrationError):
        Calibration.from_dict({"image_threshold": 1.0})


def test_calibration_images_all_when_they_fit_else_spread_evenly():
    np.testing.assert_array_equal(calibration_images(209, 1000, 0.01, budget_bytes=10 ** 6), np.arange(209))
    picked = calibration_images(1000, 10 ** 4, 0.01, budget_bytes=2 * 10 ** 6)     # 200 fit
    assert len(picked) == 200 and picked.tolist() == list(range(2, 1000, 5))
    # fewer than the rate needs fit in the budget: the rate wins
    assert len(calibration_images(1000, 10 ** 6, 0.01, budget_bytes=10 ** 6)) == 99
    assert len(calibration_images(40, 10 ** 6, 0.01, budget_bytes=10 ** 6)) == 40
    assert len(calibration_images(0, 1, 0.01)) == 0


def _fit(x, eps):
    """float64 reference: x [N, d] -> mean, covariance S/(N-1) + eps I."""
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False, ddof=1) + eps * np.eye(x.shape[1])
    return mean, cov


def _distance(x, mean, cov):
    u = x - mean
    return np.sqrt(np.einsum("...i,ij,...j->...", u, np.linalg.inv(cov), u))


@pytest.mark.parametrize("n, d, eps", [(30, 6, 0.0), (30, 6, 0.01), (12, 20, 0.01), (5, 3, 0.5)])
def test_leave_one_out_matches_an_explicit_refit(n, d, eps):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, d)
    mean, cov = _fit(x, eps)
    formula = leave_one_out_distances(_distance(x, mean, cov), n)
    refit = np.array([_distance(x[j], *_fit(np.delete(x, j, axis=0), eps)) for j in range(n)])
    shrink = (n - 2) / (n - 1)
    if eps == 0.0:      # no ridge to rescale: the lower end of the bracket is the refit
        np.testing.assert_allclose(formula ** 2 * shrink, refit ** 2, rtol=1e-9)
    # the squared refit lies in [formula² (n-2)/(n-1), formula²]
    assert np.all(formula ** 2 >= refit ** 2 * (1 - 1e-9))
    assert np.all(formula ** 2 * shrink <= refit ** 2 * (1 + 1e-9))
    assert np.all(formula > _distance(x, mean, cov))


def test_leave_one_out_refuses_images_outside_the_fit():
    with pytest.raises(CalibrationError, match="only defined for images the model was fitted on"):
        leave_one_out_distances([1.0, 100.0], 10)     # 10 * 100^2 / 81 > 1: no member is that far
    with pytest.raises(CalibrationError):
        leave_one_out_distances([1.0], 2)


def test_leave_one_out_calibration_holds_the_rate_on_new_images():
    """Gaussian 'images' of one pixel: fit on 40, calibrate on their leave-one-out scores, judge
    fresh draws with the model of all 40; 1500 repeats."""
    rng = np.random.default_rng(3)
    n, d, rate, repeats, fresh = 40, 4, 0.1, 1500, 100
    rates, in_sample_rates = [], []
    for _ in range(repeats):
        x = rng.standard_normal((n, d))
        mean, cov = _fit(x, 0.01)
        seen = _distance(x, mean, cov)
        new = _distance(rng.standard_normal((fresh, d)), mean, cov)
        rates.append(np.mean(new > conformal_threshold(leave_one_out_distances(seen, n), rate)))
        in_sample_rates.append(np.mean(new > conformal_threshold(seen, rate)))
    k = math.ceil((n + 1) * (1 - rate))
    alpha, beta = n + 1 - k, k
    sigma = math.sqrt(alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1)) / repeats
                      + rate * (1 - rate) / (repeats * fresh))
    assert rate - 1 / (n + 1) - 4 * sigma <= np.mean(rates) <= rate + 4 * sigma
    # scores of images the model has seen give a threshold that misses the rate by far
    assert np.mean(in_sample_rates) > 1.5 * rate
