"""The PaDiM model as tensors: embedding, streaming Gaussian fit, Mahalanobis scoring, smoothing.

Nothing here reads files or parses flags. Shapes: B images, d selected channels, P = h*w
feature positions, (H, W) the input image size.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from scipy.linalg import lapack
from scipy.ndimage import gaussian_filter1d

DEFAULT_SEED = 7
DEFAULT_EPS = 0.01
DEFAULT_SIGMA = 4.0


def channel_indices(total_channels: int, d: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The original's channel draw: ``random.seed(seed); random.sample(range(C), d)``, in draw order."""
    if not 0 < d <= total_channels:
        raise ValueError(f"d must be in 1..{total_channels} for this backbone, got {d}")
    return np.asarray(random.Random(seed).sample(range(total_channels), d), dtype=np.int64)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target index for nearest upsampling (``F.interpolate(mode='nearest')``)."""
    return np.floor(np.arange(target) * (source / target)).astype(np.int64)


def bilinear_matrix(source: int, target: int) -> np.ndarray:
    """[target, source] matrix of 1-D bilinear interpolation with align_corners=False."""
    scale = source / target
    position = np.maximum((np.arange(target) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(position).astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    weight_high = position - low
    matrix = np.zeros((target, source), dtype=np.float64)
    rows = np.arange(target)
    np.add.at(matrix, (rows, low), 1.0 - weight_high)
    np.add.at(matrix, (rows, high), weight_high)
    return matrix


def smoothing_matrix(source: int, target: int, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """[target, source]: bilinear upsampling then scipy's Gaussian blur (reflect, truncate 4).

    Both steps are linear along each axis, so their product applied on both sides equals
    ``gaussian_filter(interpolate(D), sigma)``; blurring the identity gives the blur matrix.
    """
    upsample = bilinear_matrix(source, target)
    if sigma <= 0:
        return upsample
    blur = gaussian_filter1d(np.eye(target), sigma, axis=0, mode="reflect", truncate=4.0)
    return blur @ upsample


def smoothing_pair(grid: tuple[int, int], image_size: tuple[int, int], sigma: float = DEFAULT_SIGMA):
    """(rows [H, h], cols transposed [w, W]) float32 tensors for ``smooth``."""
    rows = smoothing_matrix(grid[0], image_size[0], sigma).astype(np.float32)
    cols = smoothing_matrix(grid[1], image_size[1], sigma).astype(np.float32)
    return paddle.to_tensor(rows), paddle.to_tensor(np.ascontiguousarray(cols.T))


def smooth(grid: paddle.Tensor, rows: paddle.Tensor, cols_t: paddle.Tensor) -> paddle.Tensor:
    """[N, h, w] distances -> [N, H, W] upsampled and blurred map: rows @ grid @ cols_t."""
    return paddle.matmul(paddle.matmul(rows, grid), cols_t)


# PaDiM.smooth calls the function through this alias: paddle.jit.to_static mistakes a call to a
# module function from a method of the same name for the method ("takes 2 positional arguments").
_smooth = smooth


class GaussianFit:
    """Streaming per-position mean and covariance of embeddings [B, d, P].

    Keeps float64 sums of (x - shift) and of the upper triangle of (x - shift)(x - shift)ᵀ per
    position, in chunks of positions, so memory is O(P·d²/2) whatever the number of images and
    no embedding is kept. ``shift`` is the first batch's mean: centring first keeps the float32
    per-batch products accurate (no cancellation), and the float64 sums keep them accurate
    across any number of batches. The products run on the device; the sums live in host
    memory as NumPy arrays, which go back to the system chunk by chunk in ``finalize`` (Paddle's
    allocator would keep them cached, doubling the peak for WR50-Rd550).
    """

    def __init__(self, chunk_bytes: int = 64 << 20):
        self.chunk_bytes = chunk_bytes
        self.n_ = 0
        self._shift = None          # [P, d] float32
        self._sum = None            # [P, d] float64
        self._outer = None          # list of [p_chunk, d(d+1)/2] float64
        self._chunks = None         # list of (start, stop)
        self._triu = None

    def _start(self, first: paddle.Tensor):
        positions, _, d = first.shape
        per_position = d * d * 4
        step = max(1, min(positions, self.chunk_bytes // per_position))
        self._chunks = [(s, min(s + step, positions)) for s in range(0, positions, step)]
        rows, cols = np.triu_indices(d)
        self._triu_host = rows * d + cols
        self._triu = paddle.to_tensor(self._triu_host)
        self._shift = first.mean(axis=1)
        self._shift_host = self._shift.numpy()
        self._sum = np.zeros((positions, d), dtype=np.float64)
        self._outer = [np.zeros((stop - start, len(rows)), dtype=np.float64) for start, stop in self._chunks]
        self.d_, self.positions_ = d, positions

    @paddle.no_grad()
    def update(self, embeddings: paddle.Tensor) -> "GaussianFit":
        batch, d, positions = embeddings.shape
        if self._sum is not None and (d, positions) != (self.d_, self.positions_):
            raise ValueError(f"embedding shape changed from {(self.d_, self.positions_)} to {(d, positions)}")
        if paddle.get_device() == "cpu":
            self._update_host(embeddings.numpy())
        else:
            self._update_device(embeddings)
        self.n_ += batch
        return self

    def _update_device(self, embeddings: paddle.Tensor) -> None:
        x = embeddings.astype("float32").transpose([2, 0, 1])           # [P, B, d]
        if self._sum is None:
            self._start(x)
        x = x - self._shift.unsqueeze(1)
        self._sum += x.sum(axis=1).numpy()
        d = x.shape[2]
        for (start, stop), outer in zip(self._chunks, self._outer):
            block = x[start:stop]
            gram = paddle.matmul(block, block, transpose_x=True)           # [p, d, d]
            outer += paddle.index_select(gram.reshape([stop - start, d * d]), self._triu, axis=1).numpy()

    def _update_host(self, embeddings: np.ndarray) -> None:
        # Same sums as _update_device; on the CPU NumPy's stacked matmul and take are several
        # times faster than Paddle's eager kernels for these shapes.
        x = np.ascontiguousarray(embeddings.transpose(2, 0, 1), dtype=np.float32)  # [P, B, d]
        if self._sum is None:
            self._start(paddle.to_tensor(x))
        x -= self._shift_host[:, None, :]
        self._sum += x.sum(axis=1)
        triu = self._triu_host
        for (start, stop), outer in zip(self._chunks, self._outer):
            block = x[start:stop]
            gram = np.matmul(block.transpose(0, 2, 1), block)               # [p, d, d]
            outer += gram.reshape(stop - start, -1).take(triu, axis=1)

    @paddle.no_grad()
    def finalize(self, eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
        """(mean [P, d] float32, whitening [P, d, d] float32) with cov = N-1 estimate + eps·I.

        ``whitening`` is L⁻ᵀ for the Cholesky factor L of each covariance, so that
        ‖(x - mean) @ whitening‖ is the Mahalanobis distance. Sums are freed as they are used.
        """
        if self.n_ < 2:
            raise ValueError(f"need at least 2 training images to fit a covariance, got {self.n_}")
        d, n = self.d_, self.n_
        centred_mean = self._sum / n                                      # [P, d] float64
        rows, cols = np.triu_indices(d)
        packed_position = np.empty((d, d), dtype=np.int64)
        packed_position[rows, cols] = np.arange(len(rows))
        packed_position[cols, rows] = np.arange(len(rows))
        unpack = packed_position.reshape(-1)
        whiten = _whiten_host if paddle.get_device() == "cpu" else _whiten_device
        whitening = np.empty((self.positions_, d, d), dtype=np.float32)
        for (start, stop) in self._chunks:
            outer = self._outer.pop(0)
            m = centred_mean[start:stop]
            second = outer.take(unpack, axis=1).reshape(stop - start, d, d)
            del outer
            second -= n * m[:, :, None] * m[:, None, :]
            second /= n - 1
            second[:, np.arange(d), np.arange(d)] += eps
            whiten(second, whitening[start:stop])
        self._outer = None
        mean = self._shift_host.astype(np.float64) + centred_mean
        return mean.astype(np.float32), whitening


def _whiten_host(cov: np.ndarray, out: np.ndarray) -> None:
    """out[k] = L⁻ᵀ with cov[k] = L Lᵀ, by LAPACK per position (float64; cov is overwritten)."""
    for k in range(len(cov)):
        lower, info = lapack.dpotrf(cov[k], lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"covariance at position {k} is not positive definite (dpotrf info {info})")
        inverse, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"singular Cholesky factor at position {k} (dtrtri info {info})")
        out[k] = inverse.T


def _whiten_device(cov: np.ndarray, out: np.ndarray) -> None:
    """``_whiten_host`` as batched Paddle ops on the current device."""
    d = cov.shape[1]
    identity = paddle.eye(d, dtype="float64").expand([len(cov), d, d])
    lower = paddle.linalg.cholesky(paddle.to_tensor(cov))
    inverse = paddle.linalg.triangular_solve(lower, identity, upper=False)
    out[:] = inverse.transpose([0, 2, 1]).astype("float32").numpy()


def covariance_from_whitening(whitening: np.ndarray) -> np.ndarray:
    """Recover the covariances: Σ⁻¹ = W Wᵀ, so Σ = (W Wᵀ)⁻¹ (float64; for tests and inspection)."""
    w = whitening.astype(np.float64)
    return np.linalg.inv(w @ np.swapaxes(w, 1, 2))


def mahalanobis(embeddings: paddle.Tensor, mean: paddle.Tensor, whitening: paddle.Tensor) -> paddle.Tensor:
    """[B, d, P] embeddings -> [B, P] distances ‖(x - μ) W‖, batched over positions."""
    delta = embeddings.transpose([2, 0, 1]) - mean.unsqueeze(1)          # [P, B, d]
    whitened = paddle.matmul(delta, whitening)                           # [P, B, d]
    return paddle.sqrt((whitened * whitened).sum(axis=2)).transpose([1, 0])


def mahalanobis_in_chunks(embeddings: paddle.Tensor, mean: np.ndarray, whitening: np.ndarray,
                          chunk: int = 256) -> paddle.Tensor:
    """``mahalanobis`` with host arrays moved to the device a slice of positions at a time, so
    scoring during the fit needs no second full copy of the whitening matrices."""
    positions = mean.shape[0]
    parts = []
    for start in range(0, positions, chunk):
        stop = min(start + chunk, positions)
        parts.append(mahalanobis(embeddings[:, :, start:stop], paddle.to_tensor(mean[start:stop]),
                                 paddle.to_tensor(whitening[start:stop])))
    return paddle.concat(parts, axis=1)


def upsample_nearest(x: paddle.Tensor, height: int, width: int) -> paddle.Tensor:
    """``F.interpolate(x, (height, width), mode='nearest')`` without an interpolate op: a
    reshape + expand for integer factors (the ResNet/MobileNet stages), gathers otherwise."""
    channels, source_h, source_w = x.shape[1], x.shape[2], x.shape[3]
    if height % source_h == 0 and width % source_w == 0:
        step_h, step_w = height // source_h, width // source_w
        x = x.reshape([-1, channels, source_h, 1, source_w, 1])
        x = x.expand([x.shape[0], channels, source_h, step_h, source_w, step_w])
        return x.reshape([-1, channels, height, width])
    rows = paddle.to_tensor(nearest_indices(source_h, height))
    cols = paddle.to_tensor(nearest_indices(source_w, width))
    return paddle.index_select(paddle.index_select(x, rows, axis=2), cols, axis=3)


class Embedding(nn.Layer):
    """Stage features -> the d selected channels at the first stage's grid, [B, d, P], in
    stage-grouped order: the channels of ``idx`` that come from stage 1 (in draw order), then
    stage 2, then stage 3. ``to_idx_order`` gives the original's order (nearest-upsample every
    stage, concatenate, gather ``idx``).

    Each stage's channels are picked by a one-hot 1×1 convolution (exact in float32; it runs in
    oneDNN/cuDNN where a gather would not) and only those are upsampled, by reshape + expand: no
    gather or interpolate op in the graph for the usual integer stage ratios.
    """

    def __init__(self, channels: Sequence[int], idx: np.ndarray):
        super().__init__()
        offsets = np.cumsum([0] + list(channels))
        idx = np.asarray(idx, dtype=np.int64)
        self.stages_used = []
        grouped_positions = []
        for stage, (low, high) in enumerate(zip(offsets[:-1], offsets[1:])):
            positions = [k for k, channel in enumerate(idx) if low <= channel < high]
            if not positions:
                continue
            selection = np.zeros((len(positions), high - low, 1, 1), dtype=np.float32)
            selection[np.arange(len(positions)), idx[positions] - low] = 1.0
            self.stages_used.append(stage)
            self.register_buffer(f"stage{stage}_selection", paddle.to_tensor(selection))
            grouped_positions.extend(positions)
        # grouped channel k is idx[grouped_positions[k]]; idx channel j is grouped channel order[j]
        self.grouped_positions = np.asarray(grouped_positions, dtype=np.int64)
        self.order = np.argsort(self.grouped_positions)

    def forward(self, features: list) -> paddle.Tensor:
        height, width = features[0].shape[2], features[0].shape[3]
        parts = []
        for stage in self.stages_used:
            part = F.conv2d(features[stage], getattr(self, f"stage{stage}_selection"))
            if part.shape[2] != height or part.shape[3] != width:
                part = upsample_nearest(part, height, width)
            parts.append(part)
        return paddle.concat(parts, axis=1).flatten(2)

    def to_idx_order(self, embeddings: paddle.Tensor) -> paddle.Tensor:
        return paddle.index_select(embeddings, paddle.to_tensor(self.order), axis=1)

    def to_grouped_order(self, mean: np.ndarray, whitening: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Gaussian of idx-ordered embeddings expressed for grouped embeddings: mean columns
        and whitening rows permuted (‖(x-μ)W‖ is unchanged when x, μ and W's rows move together).
        The whitening rows are permuted in place, a slice of positions at a time, so a 3.8 GB
        array is not copied."""
        positions = self.grouped_positions
        mean = np.ascontiguousarray(mean[:, positions])
        for start in range(0, whitening.shape[0], 256):
            whitening[start:start + 256] = whitening[start:start + 256][:, positions, :]
        return mean, whitening


class PaDiM(nn.Layer):
    """Image batch [N,3,H,W] -> (anomaly map [N,H,W] in Mahalanobis units, image score [N])."""

    def __init__(self, backbone: nn.Layer, idx: np.ndarray, mean: np.ndarray, whitening: np.ndarray,
                 image_size: tuple[int, int], feature_grid: tuple[int, int], sigma: float = DEFAULT_SIGMA):
        super().__init__()
        self.backbone = backbone
        self.embedding = Embedding(backbone.channels, idx)
        self.image_size = tuple(int(v) for v in image_size)
        self.feature_grid = tuple(int(v) for v in feature_grid)
        # Buffers, not parameters: no initialiser run over 3.8 GB for WR50, still saved in the
        # exported parameters file; on the CPU they share the host arrays' memory (one copy).
        self._host_arrays = []
        # The model file keeps the original's idx order; the graph works in grouped order.
        # ``whitening`` is permuted in place: the caller hands it over.
        mean, whitening = self.embedding.to_grouped_order(mean, np.require(whitening, np.float32, ["C", "W"]))
        self.register_buffer("mean", self._device_tensor(mean))
        self.register_buffer("whitening", self._device_tensor(whitening))
        rows, cols_t = smoothing_pair(self.feature_grid, self.image_size, sigma)
        self.register_buffer("row_smoothing", rows)
        self.register_buffer("col_smoothing_t", cols_t)
        self.eval()

    def _device_tensor(self, array: np.ndarray) -> paddle.Tensor:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if paddle.get_device() != "cpu":
            return paddle.to_tensor(array)
        self._host_arrays.append(array)  # the zero-copy tensor borrows this memory: keep it alive
        return paddle.Tensor(array, paddle.CPUPlace(), False, True)

    def embed(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.embedding(self.backbone(images))

    def distance_grid(self, embeddings: paddle.Tensor) -> paddle.Tensor:
        """[N, h, w] Mahalanobis distances at the feature grid, before upsampling and blur."""
        distances = mahalanobis(embeddings, self.mean, self.whitening)
        return distances.reshape([-1, self.feature_grid[0], self.feature_grid[1]])

    def smooth(self, grid: paddle.Tensor) -> paddle.Tensor:
        return _smooth(grid, self.row_smoothing, self.col_smoothing_t)

    def score_embeddings(self, embeddings: paddle.Tensor) -> paddle.Tensor:
        """[N, d, P] embeddings -> [N, H, W] anomaly maps."""
        return self.smooth(self.distance_grid(embeddings))

    def forward(self, images: paddle.Tensor):
        anomaly_map = self.score_embeddings(self.embed(images))
        image_score = anomaly_map.max(axis=[1, 2])
        return anomaly_map, image_score
