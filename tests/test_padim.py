"""The PaDiM maths against independent float64 NumPy/SciPy references written here."""
import random

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from models.padim import (AnomalyMap, Embedding, GaussianFit, GaussianSums, PaDiM, channel_indices,
                          covariance_from_whitening, gram_dtype, grouped_by_stage, mahalanobis, mahalanobis_on_host)

BACKENDS = ["numpy", "paddle"]   # the Paddle backend runs here on CPU tensors
# memory budgets for the Gram matrices in float64 (GaussianFit's float64_max_bytes): the default,
# which every fit here is far below, and none, the float32 Gram of the largest models
GRAM_BUDGETS = {"float64": None, "float32": 0}
# how close the whitening comes to float64 NumPy's, relative to each position's largest entry
WHITENING_RTOL = {"float64": 1e-6, "float32": 5e-5}


def correlated_features(n, d, positions, seed=0):
    """[P, N, d] float32 embeddings, correlated channels, a different Gaussian per position."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(positions, d, d)) / np.sqrt(d)
    base = rng.normal(size=(positions, n, d))
    features = np.einsum("pnk,pkd->pnd", base, mixing) + rng.normal(size=(positions, 1, d)) * 3
    return features.astype(np.float32)


def ill_conditioned_features(n, d, positions, seed=0):
    """[P, N, d] float32 embeddings whose covariance at each position has its variances spread
    over three decades along random directions, about a mean far from zero: the sums then
    need float64, as float32 Gram matrices move the whitening by some 1e-5 of its largest entry."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(positions, d, d)))[0]
    base = rng.normal(size=(positions, n, d)) * 10.0 ** np.linspace(0, -1.5, d)
    features = np.einsum("pnk,pdk->pnd", base, directions) + rng.normal(size=(positions, 1, d)) * 5
    return features.astype(np.float32)


def reference_gaussian(features, eps=0.01):
    """The original's per-position loop: np.cov(rowvar=False) + eps·I, in float64 -> (mean, cov)."""
    x = features.astype(np.float64)
    cov = np.stack([np.cov(x[p], rowvar=False) + eps * np.eye(x.shape[2]) for p in range(len(x))])
    return x.mean(axis=1), cov


def reference_whitening(cov):
    """L⁻ᵀ for the Cholesky factor L of each float64 covariance [P, d, d]."""
    return np.linalg.inv(np.linalg.cholesky(cov)).transpose(0, 2, 1)


def reference_distances(test, mean, cov):
    """scipy's Mahalanobis distance per patch: test [P, B, d] -> [B, P]."""
    return np.array([[scipy_mahalanobis(test[p, b].astype(np.float64), mean[p], np.linalg.inv(cov[p]))
                      for p in range(test.shape[0])] for b in range(test.shape[1])])


def assert_close(actual, expected, rtol):
    """Equal to ``rtol`` relative to each position's largest entry (covariances have entries near 0)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    axes = tuple(range(1, expected.ndim))
    error = np.abs(actual - expected).max(axis=axes) / np.abs(expected).max(axis=axes)
    assert error.max() <= rtol, f"relative error {error.max():.2e} at position {error.argmax()}"


def float64(array):
    return np.asarray(array.numpy() if isinstance(array, paddle.Tensor) else array, dtype=np.float64)


def batches(features, batch_size, backend):
    for start in range(0, features.shape[1], batch_size):
        batch = np.ascontiguousarray(features[:, start:start + batch_size])
        yield paddle.to_tensor(batch) if backend == "paddle" else batch


def dtype_name(array):
    return str(array.dtype).replace("paddle.", "")


def new_fit(backend, d, gram="float64"):
    """Slices of 3 positions (the last one shorter), two threads; ``gram``: the Gram's dtype."""
    budget = {} if GRAM_BUDGETS[gram] is None else {"float64_max_bytes": GRAM_BUDGETS[gram]}
    return GaussianFit(backend=backend, threads=2, chunk_bytes=3 * 4 * d * d, **budget)


def fit(features, batch_size, backend="numpy", eps=0.01, gram="float64"):
    gaussian = new_fit(backend, features.shape[2], gram)
    for batch in batches(features, batch_size, backend):
        gaussian.update(batch)
    return gaussian.finalize(eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 7, 40])
@pytest.mark.parametrize("gram", GRAM_BUDGETS)
def test_fit_matches_numpy_cov_reference(backend, batch_size, gram):
    features = correlated_features(n=40, d=10, positions=13)
    mean, whitening = fit(features, batch_size, backend, gram=gram)
    ref_mean, ref_cov = reference_gaussian(features)
    assert mean.dtype == whitening.dtype == np.float32
    assert_close(mean, ref_mean, 1e-6)
    assert_close(covariance_from_whitening(whitening), ref_cov, 1e-5)
    # the whitening is L⁻ᵀ of the Cholesky factor L of the covariance
    assert_close(whitening, reference_whitening(ref_cov), WHITENING_RTOL[gram])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_is_the_same_however_the_images_are_grouped_or_split(backend):
    """Batches of one image, one batch of all, and two fits whose sums are brought to one shift
    and added in float64 (two ranks of a data-parallel fit): the same mean and whitening, within
    1e-6 of each other and of float64 np.cov + eps·I and its Cholesky factor's inverse."""
    features, eps = ill_conditioned_features(n=48, d=8, positions=5), 1e-4
    models = {"batches of 1": fit(features, 1, backend, eps), "one batch": fit(features, 48, backend, eps)}
    halves = [new_fit(backend, 8), new_fit(backend, 8)]
    for gaussian, part in zip(halves, (features[:, :19], features[:, 19:])):
        for batch in batches(part, 6, backend):
            gaussian.update(batch)
    states = [gaussian.state() for gaussian in halves]
    pooled = sum(s.n * float64(s.shift) + float64(s.sums) for s in states) / sum(s.n for s in states)
    for gaussian in halves:
        gaussian.recentre(pooled)
    states = [gaussian.state() for gaussian in halves]
    assert all(dtype_name(s.gram) == "float64" for s in states)
    merged = new_fit(backend, 8)
    merged.load_state(GaussianSums(sum(s.n for s in states), states[0].shift, sum(float64(s.sums) for s in states),
                                   sum(float64(s.gram) for s in states)))
    models["two ranks"] = merged.finalize(eps)
    ref_mean, ref_cov = reference_gaussian(features, eps)
    ref_whitening = reference_whitening(ref_cov)
    for mean, whitening in models.values():
        assert_close(mean, ref_mean, 1e-6)
        assert_close(whitening, ref_whitening, 1e-6)
    (mean, whitening), *others = models.values()
    for other_mean, other_whitening in others:
        assert_close(other_mean, mean, 1e-6)
        assert_close(other_whitening, whitening, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gram_matrices_are_float64_within_their_memory_budget(backend):
    """float64 up to ``float64_max_bytes`` of Gram array, float32 beyond; by default float64 for
    ResNet18's d=100 at 56 x 56 positions, float32 for WR50-Rd550's d=550."""
    assert (gram_dtype(3136, 100), gram_dtype(3136, 550)) == ("float64", "float32")
    features = correlated_features(n=9, d=4, positions=3, seed=9)
    ref_mean, ref_cov = reference_gaussian(features)
    for budget, dtype in ((3 * 4 * 4 * 8, "float64"), (3 * 4 * 4 * 8 - 1, "float32")):
        gaussian = GaussianFit(backend=backend, threads=2, float64_max_bytes=budget)
        gaussian.update(features[:, :5]).update(features[:, 5:])
        assert dtype_name(gaussian.state().gram) == dtype
        mean, whitening = gaussian.finalize(0.01)
        assert mean.dtype == whitening.dtype == np.float32
        assert_close(mean, ref_mean, 1e-6)
        assert_close(whitening, reference_whitening(ref_cov), 1e-5)


def test_paddle_backend_keeps_its_sums_on_the_device_and_equals_the_numpy_backend():
    features = correlated_features(n=23, d=7, positions=10, seed=6)
    fits = {backend: new_fit(backend, 7) for backend in BACKENDS}
    for backend, gaussian in fits.items():
        for batch in batches(features, 4, backend):
            gaussian.update(batch)
    state = fits["paddle"].state()
    assert all(isinstance(a, paddle.Tensor) for a in (state.shift, state.sums, state.gram))
    assert state.sums.dtype == state.gram.dtype == paddle.float64 and state.n == 23
    host = fits["numpy"].state()
    np.testing.assert_allclose(state.shift.numpy(), host.shift, rtol=1e-6)
    np.testing.assert_allclose(state.sums.numpy(), host.sums, rtol=1e-5, atol=1e-5)
    assert_close(state.gram.numpy(), host.gram, 1e-6)
    (mean_p, whitening_p), (mean_n, whitening_n) = (fits[b].finalize(0.01) for b in BACKENDS)
    assert_close(mean_p, mean_n, 1e-6)
    assert_close(whitening_p, whitening_n, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mahalanobis_matches_scipy_per_patch(backend):
    train = correlated_features(n=30, d=6, positions=9, seed=1)
    test = correlated_features(n=5, d=6, positions=9, seed=2)
    mean, whitening = fit(train, 30, backend)
    expected = reference_distances(test, *reference_gaussian(train))
    distances = mahalanobis(paddle.to_tensor(test), paddle.to_tensor(mean), paddle.to_tensor(whitening)).numpy()
    np.testing.assert_allclose(distances, expected, rtol=1e-5)
    on_host = mahalanobis_on_host(test, mean, whitening, threads=2, step=4)      # slices of 4, 4, 1
    np.testing.assert_allclose(on_host, expected, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_names_the_position_of_non_finite_embeddings_or_a_singular_covariance(backend):
    features = correlated_features(n=5, d=4, positions=6, seed=7)
    features[4, 2, 1] = np.nan
    with pytest.raises(ValueError, match="position 4 are not finite"):
        fit(features, 5, backend)
    features = correlated_features(n=12, d=4, positions=6, seed=7)
    features[3] = 1.0     # no variance at position 3: with eps < 0 its covariance is not positive definite
    with pytest.raises(np.linalg.LinAlgError, match="position 3 is not positive definite"):
        fit(features, 5, backend, eps=-1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_needs_two_images_and_one_shape(backend):
    gaussian = new_fit(backend, 4)
    with pytest.raises(ValueError, match="no embeddings"):
        gaussian.finalize()
    gaussian.update(correlated_features(1, 4, 3))
    with pytest.raises(ValueError, match="at least 2 training images"):
        gaussian.finalize()
    with pytest.raises(ValueError, match=r"shape \[P, B, d\]"):
        gaussian.update(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="5 channels after 3 x 4"):
        gaussian.update(np.zeros((3, 2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="backend"):
        GaussianFit(backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_recentred_halves_sum_to_the_fit_of_all_images(backend):
    """Two ranks of a data-parallel fit: each streams half of the images about its own first
    batch's mean; both are recentred to one shift, their sums added in float64 (an all-reduce),
    and the totals equal the float64 np.cov of all the images."""
    features = correlated_features(n=36, d=8, positions=11, seed=3)
    halves = [new_fit(backend, 8), new_fit(backend, 8)]
    for gaussian, part in zip(halves, (features[:, :17], features[:, 17:])):
        for batch in batches(part, 5, backend):
            gaussian.update(batch)
    common = features.astype(np.float64).mean(axis=1) + 0.5      # any shift near the data
    for gaussian in halves:
        gaussian.recentre(common)
    states = [gaussian.state() for gaussian in halves]
    total = GaussianSums(sum(s.n for s in states), states[0].shift,
                         sum(float64(s.sums) for s in states), sum(float64(s.gram) for s in states))
    # the recentred sums are the sums about the common shift, computed here directly in float64
    shift = float64(total.shift)
    centred = features.astype(np.float64) - shift[:, None, :]
    np.testing.assert_allclose(total.sums, centred.sum(axis=1), rtol=1e-6, atol=1e-6 * np.abs(centred).max())
    assert_close(total.gram, np.einsum("pni,pnj->pij", centred, centred), 1e-6)
    # the covariance they give, against np.cov of all the images
    n, centred_mean = total.n, total.sums / total.n
    covariance = (total.gram - n * centred_mean[:, :, None] * centred_mean[:, None, :]) / (n - 1)
    ref_mean, ref_cov = reference_gaussian(features, eps=0.0)
    assert n == 36
    assert_close(shift + centred_mean, ref_mean, 1e-6)
    assert_close(covariance, ref_cov, 1e-6)
    # loaded into a fit, they finalize to the model of all the images
    merged = new_fit(backend, 8)
    merged.load_state(total)
    mean, whitening = merged.finalize(0.01)
    ref_mean, ref_cov = reference_gaussian(features)
    assert_close(mean, ref_mean, 1e-6)
    assert_close(covariance_from_whitening(whitening), ref_cov, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finalized_fit_takes_no_more_images(backend):
    train = correlated_features(n=5, d=3, positions=4, seed=10)
    gaussian = new_fit(backend, 3)
    for batch in batches(train, 8, backend):
        gaussian.update(batch)
    gaussian.finalize(0.01)
    with pytest.raises(RuntimeError, match="finalized"):
        gaussian.update(batch)


def test_channel_indices_follow_the_original_draw_and_group_by_stage():
    random.seed(7)
    expected = random.sample(range(448), 100)
    idx = channel_indices(448, 100, 7)
    assert idx.tolist() == expected
    grouped = grouped_by_stage(idx)
    assert sorted(grouped.tolist()) == sorted(expected)
    stage = np.searchsorted([64, 192, 448], grouped, side="right")   # ResNet18 layer1..3
    assert np.all(np.diff(stage) >= 0)
    with pytest.raises(ValueError):
        channel_indices(448, 449)


@pytest.mark.parametrize("size", [(56, 56), (28, 40)])
def test_anomaly_map_equals_interpolate_then_gaussian_filter(size):
    grid = (size[0] // 4, size[1] // 4)
    rng = np.random.default_rng(4)
    distances = rng.random((2, *grid)).astype(np.float32) * 5
    upsampled = F.interpolate(paddle.to_tensor(distances[:, None]), size=list(size), mode="bilinear",
                              align_corners=False).numpy()[:, 0]
    expected = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in upsampled])
    ours = AnomalyMap(grid, size, 4.0)(paddle.to_tensor(distances.reshape(2, -1))).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * expected.max())


def reference_embedding(features, sizes, idx):
    """The original: nearest-interpolate every stage to the first's grid, concatenate, gather idx
    -> [P, B, d]."""
    reference = paddle.concat([features[0]] + [F.interpolate(f, size=list(sizes[0]), mode="nearest")
                                               for f in features[1:]], axis=1)
    gathered = paddle.index_select(reference, paddle.to_tensor(idx), axis=1).numpy()
    return gathered.reshape(*gathered.shape[:2], -1).transpose(2, 0, 1)


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2)], [(8, 10), (3, 5), (2, 3)]])
@pytest.mark.parametrize("order", ["grouped", "drawn"])
def test_embedding_equals_interpolate_concat_index_select(sizes, order):
    """In the order of the idx given: grouped by stage (what a fit stores), or the original's draw."""
    rng = np.random.default_rng(5)
    features = [paddle.to_tensor(rng.normal(size=(2, c, *hw)).astype(np.float32)) for c, hw in zip((4, 6, 5), sizes)]
    idx = channel_indices(15, 7, seed=3)
    idx = grouped_by_stage(idx) if order == "grouped" else idx
    embedding = Embedding([4, 6, 5], idx)
    assert (embedding.order is None) == (order == "grouped")
    np.testing.assert_array_equal(embedding(features).numpy(), reference_embedding(features, sizes, idx))


class TinyBackbone(paddle.nn.Layer):
    channels = [3, 4]

    def __init__(self):
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 3, 3, stride=4, padding=1)
        self.conv2 = paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        first = self.conv1(x)
        return [first, self.conv2(first)]


@pytest.mark.parametrize("order", ["grouped", "drawn"])
def test_padim_forward_is_embedding_distance_upsample_blur_max(order):
    paddle.seed(0)
    backbone = TinyBackbone()
    idx = channel_indices(7, 5, seed=1)
    idx = grouped_by_stage(idx) if order == "grouped" else idx
    images = paddle.to_tensor(np.random.default_rng(6).normal(size=(6, 3, 32, 32)).astype(np.float32))
    train = Embedding(backbone.channels, idx)(backbone(images)).numpy()               # [P, 6, d]
    mean, whitening = fit(train, 4)
    given = (mean.copy(), whitening.copy())
    model = PaDiM(backbone, idx, mean, whitening, (32, 32), (8, 8))
    np.testing.assert_array_equal(mean, given[0])          # the caller's arrays are left as they were
    np.testing.assert_array_equal(whitening, given[1])
    test = images[:2] * 1.5
    anomaly_map, score = model(test)
    sizes = [(8, 8), (4, 4)]
    emb = reference_embedding(backbone(test), sizes, idx)
    grid = reference_distances(emb, *reference_gaussian(train)).reshape(2, 8, 8)
    upsampled = F.interpolate(paddle.to_tensor(grid[:, None].astype(np.float32)), size=[32, 32],
                              mode="bilinear", align_corners=False).numpy()[:, 0]
    expected = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in upsampled])
    np.testing.assert_allclose(anomaly_map.numpy(), expected, rtol=1e-5, atol=1e-5 * expected.max())
    np.testing.assert_allclose(score.numpy(), expected.reshape(2, -1).max(axis=1), rtol=1e-5)
