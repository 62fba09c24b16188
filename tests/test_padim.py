"""The PaDiM maths against independent float64 NumPy/SciPy references written here."""
import random

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from models.padim import (Embedding, GaussianFit, PaDiM, channel_indices, covariance_from_whitening,
                          mahalanobis, mahalanobis_host, smoothing_matrix)


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def gaussian_path(request, monkeypatch):
    """Every test runs with the compiled Gaussian kernels (models/native) and with the NumPy path."""
    from models.native import gaussian_kernels, kernel_status

    if request.param == "numpy":
        monkeypatch.setattr("models.padim.gaussian_kernels", lambda: None)
    elif gaussian_kernels() is None:
        pytest.skip(kernel_status())
    return request.param


def correlated_features(n, d, positions, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(positions, d, d)) / np.sqrt(d)
    base = rng.normal(size=(n, positions, d))
    features = np.einsum("npk,pkd->npd", base, mixing) + rng.normal(size=(positions, d)) * 3
    return np.ascontiguousarray(features.transpose(0, 2, 1)).astype(np.float32)   # [N, d, P]


def reference_gaussian(features):
    """The original's per-position loop: np.cov(rowvar=False) + 0.01·I, in float64."""
    n, d, positions = features.shape
    x = features.astype(np.float64)
    mean = x.mean(axis=0).T                                   # [P, d]
    cov = np.stack([np.cov(x[:, :, p], rowvar=False) + 0.01 * np.eye(d) for p in range(positions)])
    return mean, cov


def fit(features, batch_size):
    gaussian = GaussianFit(chunk_bytes=5 * 8 * features.shape[1] ** 2)   # several position chunks
    for start in range(0, len(features), batch_size):
        gaussian.update(paddle.to_tensor(features[start:start + batch_size]))
    return gaussian.finalize(0.01)


def test_fit_matches_numpy_cov_reference():
    features = correlated_features(n=40, d=10, positions=13)
    mean, whitening = fit(features, batch_size=7)
    ref_mean, ref_cov = reference_gaussian(features)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(covariance_from_whitening(whitening), ref_cov, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["paddle", "numpy_threads"])
def test_mahalanobis_matches_scipy_per_patch(path):
    train = correlated_features(n=30, d=6, positions=9, seed=1)
    test = correlated_features(n=5, d=6, positions=9, seed=2)
    mean, whitening = fit(train, batch_size=30)
    ref_mean, ref_cov = reference_gaussian(train)
    if path == "paddle":
        distances = mahalanobis(paddle.to_tensor(test), paddle.to_tensor(mean), paddle.to_tensor(whitening)).numpy()
    else:   # the eager CPU path on [P, B, d], positions split over two threads in slices of 2
        distances = mahalanobis_host(np.ascontiguousarray(test.transpose(2, 0, 1)), mean, whitening,
                                     threads=2, chunk_positions=2)
    expected = np.array([[scipy_mahalanobis(test[i, :, p].astype(np.float64), ref_mean[p], np.linalg.inv(ref_cov[p]))
                          for p in range(9)] for i in range(5)])
    np.testing.assert_allclose(distances, expected, rtol=1e-4)


def test_fit_in_threads_equals_reference():
    """Two threads over slices of 3 positions (the last one shorter)."""
    features = correlated_features(n=23, d=7, positions=10, seed=6)
    gaussian = GaussianFit(chunk_bytes=3 * 4 * 7 * 7, threads=2)
    for start in range(0, 23, 4):
        gaussian.update(paddle.to_tensor(features[start:start + 4]))
    mean, whitening = gaussian.finalize(0.01)
    ref_mean, ref_cov = reference_gaussian(features)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(covariance_from_whitening(whitening), ref_cov, rtol=1e-4, atol=1e-5)


def test_fit_names_the_position_of_non_finite_embeddings_or_a_singular_covariance():
    features = correlated_features(n=5, d=4, positions=6, seed=7)
    features[2, 1, 4] = np.nan
    with pytest.raises(ValueError, match="position 4 are not finite"):
        GaussianFit(threads=2, chunk_bytes=4 * 4 * 4).update(paddle.to_tensor(features)).finalize(0.01)
    features = correlated_features(n=5, d=4, positions=6, seed=7)
    features[:, :, 3] = 1.0     # no variance at position 3: with eps < 0 its covariance is not positive definite
    with pytest.raises(np.linalg.LinAlgError, match="position 3 is not positive definite"):
        GaussianFit().update(paddle.to_tensor(features)).finalize(-1e-3)


@pytest.mark.parametrize("batch_size", [1, 3, 16, 50])
def test_streaming_fit_equals_one_shot(batch_size):
    features = correlated_features(n=50, d=8, positions=11, seed=3)
    mean_once, whitening_once = fit(features, batch_size=50)
    mean, whitening = fit(features, batch_size=batch_size)
    np.testing.assert_allclose(mean, mean_once, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whitening, whitening_once, rtol=1e-4, atol=1e-5)


def test_fit_needs_two_images():
    gaussian = GaussianFit().update(paddle.to_tensor(correlated_features(1, 4, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian.finalize()


def test_channel_indices_follow_the_original_draw():
    random.seed(7)
    expected = random.sample(range(448), 100)
    assert channel_indices(448, 100, 7).tolist() == expected
    with pytest.raises(ValueError):
        channel_indices(448, 449)


@pytest.mark.parametrize("size", [(56, 56), (28, 40)])
def test_upsample_and_blur_equal_interpolate_then_gaussian_filter(size):
    grid = (size[0] // 4, size[1] // 4)
    rng = np.random.default_rng(4)
    distances = rng.random((2, *grid)).astype(np.float32) * 5
    upsampled = F.interpolate(paddle.to_tensor(distances[:, None]), size=list(size), mode="bilinear",
                              align_corners=False).numpy()[:, 0]
    expected = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in upsampled])
    rows = smoothing_matrix(grid[0], size[0], 4.0)
    cols = smoothing_matrix(grid[1], size[1], 4.0)
    ours = np.einsum("hi,nij,wj->nhw", rows, distances.astype(np.float64), cols)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2)], [(8, 10), (3, 5), (2, 3)]])
def test_embedding_equals_interpolate_concat_index_select(sizes):
    rng = np.random.default_rng(5)
    features = [rng.normal(size=(2, c, *hw)) for c, hw in zip((4, 6, 5), sizes)]
    features = [paddle.to_tensor(f.astype(np.float32)) for f in features]
    idx = channel_indices(15, 7, seed=3)
    reference = features[0]
    for feature in features[1:]:
        reference = paddle.concat([reference, F.interpolate(feature, size=list(sizes[0]), mode="nearest")], axis=1)
    positions = sizes[0][0] * sizes[0][1]
    expected = paddle.index_select(reference, paddle.to_tensor(idx), axis=1).numpy().reshape(2, 7, positions)
    embedding = Embedding([4, 6, 5], idx)
    ours = embedding.to_idx_order(embedding(features)).numpy()
    np.testing.assert_array_equal(ours, expected)
    # the [P, B, d] layout of the scoring path holds the same numbers, grouped order in the last axis
    positions_first = embedding(features, positions_first=True).numpy()
    np.testing.assert_array_equal(positions_first[:, :, embedding.order].transpose(1, 2, 0), expected)


class TinyBackbone(paddle.nn.Layer):
    channels = [3, 4]

    def __init__(self):
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 3, 3, stride=4, padding=1)
        self.conv2 = paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        first = self.conv1(x)
        return [first, self.conv2(first)]


@pytest.mark.parametrize("scoring", ["numpy_threads", "paddle_ops"])
def test_padim_forward_is_embedding_distance_upsample_blur_max(scoring):
    paddle.seed(0)
    backbone = TinyBackbone()
    idx = channel_indices(7, 5, seed=1)
    images = paddle.to_tensor(np.random.default_rng(6).normal(size=(6, 3, 32, 32)).astype(np.float32))
    embedding = Embedding(backbone.channels, idx)
    train = embedding.to_idx_order(embedding(backbone(images))).numpy()
    mean, whitening = fit(train, batch_size=4)
    model = PaDiM(backbone, idx, mean, whitening, (32, 32), (8, 8))
    if scoring == "paddle_ops":   # the path of GPUs and exported graphs
        model._host_gaussian = None
    test = images[:2] * 1.5
    anomaly_map, score = model(test)
    emb = embedding.to_idx_order(embedding(backbone(test))).numpy().astype(np.float64)
    ref_mean, ref_cov = reference_gaussian(train)
    inverse = np.linalg.inv(ref_cov)
    delta = emb.transpose(0, 2, 1) - ref_mean
    grid = np.sqrt(np.einsum("npi,pij,npj->np", delta, inverse, delta)).reshape(2, 8, 8)
    upsampled = F.interpolate(paddle.to_tensor(grid[:, None].astype(np.float32)), size=[32, 32],
                              mode="bilinear", align_corners=False).numpy()[:, 0]
    expected = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in upsampled])
    np.testing.assert_allclose(anomaly_map.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(score.numpy(), expected.reshape(2, -1).max(axis=1), rtol=1e-4)


def test_device_update_path_equals_host_path(monkeypatch):
    """The GPU code path (Paddle ops) runs here on CPU tensors and must give the host path's fit."""
    features = correlated_features(n=24, d=7, positions=10, seed=8)
    mean_host, whitening_host = fit(features, batch_size=5)
    monkeypatch.setattr("models.padim.paddle.get_device", lambda: "gpu:0")
    mean_device, whitening_device = fit(features, batch_size=5)
    np.testing.assert_allclose(mean_device, mean_host, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whitening_device, whitening_host, rtol=1e-4, atol=1e-5)


def test_fits_above_the_kernels_d_limit_take_the_numpy_path(monkeypatch):
    """WR50's d=550 fits through NumPy/LAPACK (NATIVE_FIT_MAX_D), with the same result."""
    monkeypatch.setattr("models.padim.NATIVE_FIT_MAX_D", 6)
    features = correlated_features(n=30, d=7, positions=9, seed=9)
    gaussian = GaussianFit()
    gaussian.update(paddle.to_tensor(features[:15])).update(paddle.to_tensor(features[15:]))
    assert gaussian._kernels is None
    mean, whitening = gaussian.finalize(0.01)
    ref_mean, ref_cov = reference_gaussian(features)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(covariance_from_whitening(whitening), ref_cov, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batches", [[7, 7, 6], [1, 19]])
def test_gaussian_fit_of_positions_first_batches_equals_the_reference(batches):
    """[P, B, d] batches (what the fit's extractor hands over) give the same Gaussian as the
    float64 per-position loop; 37 positions cross a block of 16."""
    features = correlated_features(n=sum(batches), d=9, positions=37, seed=12)
    gaussian = GaussianFit(threads=2)
    start = 0
    for size in batches:
        gaussian.update(paddle.to_tensor(features[start:start + size].transpose(2, 0, 1).copy()), positions_first=True)
        start += size
    mean, whitening = gaussian.finalize(0.01)
    ref_mean, ref_cov = reference_gaussian(features)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(covariance_from_whitening(whitening), ref_cov, rtol=1e-4, atol=1e-5)


def test_whitening_rows_of_a_model_order_triangle():
    """A fit's triangles with rows permuted, as PaDiM holds them: the structure lists every row
    by its first non-zero column, and the scoring with it equals the dense float64 distances."""
    import models.padim as padim

    rng = np.random.default_rng(8)
    positions, d, batch = 50, 23, 3
    permutation = rng.permutation(d)
    whitening = np.ascontiguousarray(np.triu(rng.normal(size=(positions, d, d)) + 2)[:, permutation].astype(np.float32))
    rows = padim.whitening_rows(whitening, threads=2)
    if padim.gaussian_kernels() is None:                      # the NumPy path needs no structure
        assert rows is None
        return
    order, first_column = rows
    np.testing.assert_array_equal(first_column, np.arange(d))
    np.testing.assert_array_equal(permutation[order], np.arange(d))
    test = rng.normal(size=(positions, batch, d)).astype(np.float32)
    mean = rng.normal(size=(positions, d)).astype(np.float32)
    centred = test.astype(np.float64) - mean[:, None, :]
    expected = np.sqrt((np.einsum("pbi,pij->pbj", centred, whitening.astype(np.float64)) ** 2).sum(axis=2)).T
    np.testing.assert_allclose(mahalanobis_host(test, mean, whitening, threads=2, rows=rows), expected, rtol=2e-5)
