"""The PaDiM model as tensors: embedding, streaming Gaussian fit, Mahalanobis scoring, smoothing.

Nothing here reads files or parses flags. Shapes: B images, d selected channels, P = h*w
feature positions, (H, W) the input image size.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from threadpoolctl import ThreadpoolController

from models.native import gaussian_kernels
from utils.numbers import available_cpus

DEFAULT_SEED = 7
DEFAULT_EPS = 0.01
DEFAULT_SIGMA = 4.0
# The fit uses the compiled kernels up to this d. Beyond it their packed float64 factorisation of
# 16 positions outgrows the caches (19 MB at WR50's d=550), where LAPACK's cache-blocked Cholesky
# through the NumPy path was the faster of the two when compared on random data.
NATIVE_FIT_MAX_D = 256


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
    """Streaming per-position mean and covariance of embeddings [B, d, P] (or [P, B, d]).

    Keeps the sum of (x - shift) [P, d] (float64) and the Gram matrices of (x - shift)
    [P, d, d] (float32) per position, so memory is O(P·d²) whatever the number of images and
    no embedding is kept. ``shift`` is the first batch's mean: centring first keeps the float32
    products accurate (no cancellation between Σxxᵀ and n·μμᵀ). ``finalize`` writes the
    whitening matrices over the Gram array, a slice of positions at a time, so the fit never
    holds two [P, d, d] arrays (3.8 GB each for WR50-Rd550).

    On the CPU the work runs in ``threads`` threads over slices of positions: through
    models/native's compiled kernels when they are built and d <= NATIVE_FIT_MAX_D (positions as
    vector lanes; the Gram lower triangles packed in blocks of 16 positions inside the array that
    becomes the whitening), else in NumPy (BLAS limited to one thread each: these are many small
    matrices, where BLAS's own threading only adds overhead). On a GPU the products run as
    batched Paddle matmuls.
    """

    def __init__(self, chunk_bytes: int = 16 << 20, threads: int | None = None):
        self.chunk_bytes = chunk_bytes
        self.threads = threads or available_cpus()
        self.n_ = 0
        # NumPy path layouts; with the kernels: shift [d, P], sums [blocks, d, 16], and the Gram
        # triangles packed per block of 16 positions (models/native/gaussian.c)
        self._shift = None          # [P, d] float32
        self._sum = None            # [P, d] float64
        self._gram = None           # [P, d, d] float32
        self._chunks = None         # list of (start, stop) position slices (blocks with the kernels)
        self._kernels = None        # models.native's compiled kernels, when the fit runs on the host

    def _start(self, first: np.ndarray, on_host: bool = False, positions_first: bool = False):
        """``first``: the first batch as [B, d, P] float32 ([P, B, d] with ``positions_first``)."""
        if positions_first:
            positions, _, d = first.shape
        else:
            _, d, positions = first.shape
        self.d_, self.positions_ = d, positions
        self._kernels = gaussian_kernels() if on_host and d <= NATIVE_FIT_MAX_D else None
        # any value near the mean keeps float32 accurate: the first batch's, [P, d] (summed in
        # float32 for the kernels: in float64 this took as long as a batch's Gram update)
        batch_mean = first.mean(axis=1 if positions_first else 0, dtype=None if self._kernels else np.float64)
        if not positions_first:
            batch_mean = batch_mean.T
        if self._kernels is not None:
            # models/native/gaussian.c: positions as vector lanes, the Gram lower triangles packed
            # in blocks of lanes inside an array the size of the whitening it becomes
            blocks = self._kernels.blocks(positions)
            self._shift = np.ascontiguousarray(batch_mean.T, dtype=np.float32)     # [d, P]
            # no zeroing pass: the first update writes the sums
            self._sum = np.empty((blocks, d, self._kernels.lanes), dtype=np.float64)
            # not zeroed, and not touched here: where the heap keeps freed blocks (utils/memory.py,
            # val.py's setting and the benchmark's) this is memory the process already touched;
            # else a fresh mapping, which the first update maps in 2 MiB pages, each thread its
            # own slice (gaussian.c's populate), instead of a fault per 4 KiB page
            self._gram = np.empty((blocks * self._kernels.lanes, d, d), dtype=np.float32)
            self._chunks = _even_slices(blocks, 4 * self.threads)
            return
        step = max(1, min(64, self.chunk_bytes // (d * d * 4)))
        self._chunks = [(s, min(s + step, positions)) for s in range(0, positions, step)]
        # the factorisations work in float64 on smaller slices that stay in cache
        step = max(1, min(step, (3 << 19) // (d * d * 8)))
        self._finalize_chunks = [(s, min(s + step, positions)) for s in range(0, positions, step)]
        self._shift = np.ascontiguousarray(batch_mean, dtype=np.float32)
        self._sum = np.zeros((positions, d), dtype=np.float64)
        self._gram = np.zeros((positions, d, d), dtype=np.float32)

    @paddle.no_grad()
    def update(self, embeddings, positions_first: bool = False) -> "GaussianFit":
        """Add a batch of embeddings [B, d, P], or [P, B, d] with ``positions_first`` (the layout
        PaDiM.embed gives by default; the compiled kernels read it sequentially, faster), as a
        Paddle tensor or a NumPy array."""
        if len(embeddings.shape) != 3:
            raise ValueError(f"embeddings must have 3 dimensions, got shape {list(embeddings.shape)}")
        if positions_first:
            positions, batch, d = embeddings.shape
        else:
            batch, d, positions = embeddings.shape
        if self._sum is not None and (d, positions) != (self.d_, self.positions_):
            raise ValueError(f"embedding shape changed from {(self.d_, self.positions_)} to {(d, positions)}")
        if isinstance(embeddings, np.ndarray):
            self._update_host(np.asarray(embeddings, dtype=np.float32), positions_first)
        elif paddle.get_device() == "cpu" or self._kernels is not None:   # a fit started on the host stays there
            self._update_host(host_array(embeddings), positions_first)
        else:
            self._update_device(embeddings, positions_first)
        self.n_ += batch
        return self

    def _update_device(self, embeddings: paddle.Tensor, positions_first: bool) -> None:
        x = embeddings.astype("float32")
        if not positions_first:
            x = x.transpose([2, 0, 1])                                             # [P, B, d]
        if self._sum is None:
            self._start(x.numpy(), positions_first=True)
        x = x - paddle.to_tensor(self._shift).unsqueeze(1)
        self._sum += x.sum(axis=1).numpy()
        for start, stop in self._chunks:
            block = x[start:stop]
            self._gram[start:stop] += paddle.matmul(block, block, transpose_x=True).numpy()

    def _update_host(self, x: np.ndarray, positions_first: bool) -> None:
        """Per slice of positions: the batch as a centred [p, B, d] block, then its Gram
        matrices. (Gathering several batches first would mean fewer passes over the sums, but the
        held batches keep Paddle's allocator from reusing their memory: peak RSS grew with N.)"""
        if self._sum is None:
            self._start(x, on_host=True, positions_first=positions_first)
        if self._kernels is not None:
            x, first = np.ascontiguousarray(x, dtype=np.float32), self.n_ == 0
            run_over_chunks(lambda b0, b1: self._kernels.gram_update(x, self._shift, self._gram, self._sum, b0, b1,
                                                                     first, positions_first),
                            self._chunks, self.threads)
            return

        def work(start, stop):
            if positions_first:
                block = x[start:stop] - self._shift[start:stop, None, :]
            else:   # a contiguous copy of the slice first: transposing it is then cache-friendly
                block = np.ascontiguousarray(x[:, :, start:stop]).transpose(2, 0, 1) - self._shift[start:stop, None, :]
            self._sum[start:stop] += block.sum(axis=1)
            self._gram[start:stop] += np.matmul(block.transpose(0, 2, 1), block)

        run_over_chunks(work, self._chunks, self.threads)

    @paddle.no_grad()
    def finalize(self, eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
        """(mean [P, d] float32, whitening [P, d, d] float32) with cov = N-1 estimate + eps·I.

        ``whitening`` is L⁻ᵀ for the Cholesky factor L of each covariance, so that
        ‖(x - mean) @ whitening‖ is the Mahalanobis distance. It is written over the Gram
        array, which the fit no longer holds afterwards.
        """
        if self.n_ < 2:
            raise ValueError(f"need at least 2 training images to fit a covariance, got {self.n_}")
        n, d = self.n_, self.d_
        if self._kernels is not None:
            return self._finalize_native(eps)
        centred_mean = self._sum / n                                      # [P, d] float64
        gram, self._gram = self._gram, None
        on_device = paddle.get_device() != "cpu"

        def work(start, stop):
            m = centred_mean[start:stop]
            cov = gram[start:stop].astype(np.float64)
            cov -= n * m[:, :, None] * m[:, None, :]
            cov /= n - 1
            cov[:, np.arange(d), np.arange(d)] += eps
            finite = np.isfinite(cov).all(axis=(1, 2))
            if not finite.all():
                raise ValueError(f"the embeddings at feature position {start + int(np.argmin(finite))} are not "
                                 "finite (NaN or inf): check the backbone weights and the input images")
            gram[start:stop] = _whiten_device(cov) if on_device else _whiten_host(cov, start)

        run_over_chunks(work, self._finalize_chunks, 1 if on_device else self.threads)
        mean = self._shift.astype(np.float64) + centred_mean
        return mean.astype(np.float32), gram

    def _finalize_native(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        n, d, positions = self.n_, self.d_, self.positions_
        gram, self._gram = self._gram, None
        failures = []

        def work(block0, block1):
            bad, nonfinite = self._kernels.whitening(gram, self._sum, n, d, positions, eps, block0, block1)
            if bad >= 0:
                failures.append((bad, nonfinite))

        run_over_chunks(work, self._chunks, self.threads)
        if failures:
            bad, nonfinite = min(failures)
            if nonfinite:
                raise ValueError(f"the embeddings at feature position {bad} are not finite (NaN or inf): check the "
                                 "backbone weights and the input images")
            raise np.linalg.LinAlgError(f"covariance at position {bad} is not positive definite")
        centred_mean = self._sum.transpose(0, 2, 1).reshape(-1, d)[:positions] / n       # [P, d] float64
        mean = self._shift.T.astype(np.float64) + centred_mean
        return mean.astype(np.float32), gram[:positions]


def _even_slices(total: int, parts: int) -> list:
    bounds = np.linspace(0, total, max(1, min(parts, total)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def host_array(tensor: paddle.Tensor) -> np.ndarray:
    """A CPU tensor as float32 NumPy without a copy where DLPack allows (the array keeps the
    tensor's memory alive)."""
    if tensor.dtype != paddle.float32:
        tensor = tensor.astype("float32")
    try:
        return np.from_dlpack(tensor)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return tensor.numpy()


_POOL = {}   # threads -> ThreadPoolExecutor, kept for the process (starting threads costs per call)
_BLAS = []   # one threadpoolctl controller: building one scans every loaded library (~1 ms)


def run_over_chunks(work, chunks, threads: int) -> None:
    """``work(start, stop)`` for every chunk, on ``threads`` threads with BLAS at one thread each
    (NumPy releases the GIL in its matmul, linalg and ufunc loops)."""
    if threads <= 1 or len(chunks) <= 1:
        for start, stop in chunks:
            work(start, stop)
        return
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="padim"))
    with _BLAS[0].limit(limits=1, user_api="blas"):
        for future in [pool.submit(work, start, stop) for start, stop in chunks]:
            future.result()


def _triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverses of a stack of lower-triangular matrices [k, d, d] by 2x2 block recursion:
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]. Batched matmuls do the work that
    3136 separate LAPACK calls would (NumPy's stacked inv on the small diagonal blocks)."""
    d = lower.shape[-1]
    if d <= 24:
        return np.linalg.inv(lower)
    h = d // 2
    top = _triangular_inverse(lower[:, :h, :h])
    bottom = _triangular_inverse(lower[:, h:, h:])
    inverse = np.zeros_like(lower)
    inverse[:, :h, :h] = top
    inverse[:, h:, h:] = bottom
    inverse[:, h:, :h] = -np.matmul(bottom, np.matmul(lower[:, h:, :h], top))
    return inverse


def _whiten_host(cov: np.ndarray, first_position: int = 0) -> np.ndarray:
    """[k, d, d] float64 covariances -> [k, d, d] float32 L⁻ᵀ with cov = L Lᵀ (L in float64)."""
    try:
        lower = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        bad = next(k for k in range(len(cov)) if not _positive_definite(cov[k]))
        raise np.linalg.LinAlgError(
            f"covariance at position {first_position + bad} is not positive definite") from None
    # float32 for the inverse: its products run at twice the float64 rate, and the whitening is
    # stored float32 anyway (the benchmark's distances stay within 1.5e-5 of the per-patch loop's).
    return np.swapaxes(_triangular_inverse(lower.astype(np.float32)), 1, 2)


def _positive_definite(matrix: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(matrix)
        return True
    except np.linalg.LinAlgError:
        return False


def _whiten_device(cov: np.ndarray) -> np.ndarray:
    """``_whiten_host`` as batched Paddle ops on the current device."""
    d = cov.shape[1]
    identity = paddle.eye(d, dtype="float64").expand([len(cov), d, d])
    lower = paddle.linalg.cholesky(paddle.to_tensor(cov))
    inverse = paddle.linalg.triangular_solve(lower, identity, upper=False)
    return inverse.transpose([0, 2, 1]).astype("float32").numpy()


def covariance_from_whitening(whitening: np.ndarray) -> np.ndarray:
    """Recover the covariances: Σ⁻¹ = W Wᵀ, so Σ = (W Wᵀ)⁻¹ (float64; for tests and inspection)."""
    w = whitening.astype(np.float64)
    return np.linalg.inv(w @ np.swapaxes(w, 1, 2))


def mahalanobis(embeddings: paddle.Tensor, mean: paddle.Tensor, whitening: paddle.Tensor) -> paddle.Tensor:
    """[B, d, P] embeddings -> [B, P] distances ‖(x - μ) W‖, batched over positions."""
    return mahalanobis_positions_first(embeddings.transpose([2, 0, 1]), mean, whitening)


def mahalanobis_positions_first(embeddings: paddle.Tensor, mean: paddle.Tensor,
                                whitening: paddle.Tensor) -> paddle.Tensor:
    """``mahalanobis`` of [P, B, d] embeddings (the layout the batched matmul needs) -> [B, P]."""
    whitened = paddle.matmul(embeddings - mean.unsqueeze(1), whitening)   # [P, B, d]
    return paddle.sqrt((whitened * whitened).sum(axis=2)).transpose([1, 0])


def whitening_rows(whitening: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The zero structure of [P, d, d] whitening matrices for models/native's scoring: (order,
    first_column), the rows sorted by the first column that holds a non-zero at any position.
    A fit's L⁻ᵀ is upper triangular (a model's rows are permuted into grouped order), so about
    40% of the products are of zeros the scoring can skip. One pass over the matrices (half of
    them for triangular ones): compute once per model, not per batch. None without the kernels."""
    kernels = gaussian_kernels()
    if kernels is None:
        return None
    whitening = np.ascontiguousarray(whitening, dtype=np.float32)
    positions, d, _ = whitening.shape
    threads = threads or available_cpus()
    support = {}

    def work(start, stop):
        first = np.full(d, d, dtype=np.int32)
        kernels.row_support(whitening, start, stop, first)
        support[start] = first

    run_over_chunks(work, _even_slices(positions, threads), threads)
    first = np.min(list(support.values()), axis=0)
    order = np.argsort(first, kind="stable").astype(np.int32)
    return order, np.ascontiguousarray(first[order])


def mahalanobis_host(embeddings: np.ndarray, mean: np.ndarray, whitening: np.ndarray,
                     threads: int | None = None, chunk_positions: int = 64,
                     rows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``mahalanobis_positions_first`` on the host for the CPU: [P, B, d] float32 -> [B, P]
    float32, the positions split over threads: models/native's kernel, else NumPy's batched
    matmul. Paddle's eager batched matmul is several times slower on the CPU for these many
    small products. ``rows``: ``whitening_rows(whitening)``, so the kernel skips the zeros of
    triangular whitening matrices (None: treated as dense)."""
    positions, batch, _ = embeddings.shape
    threads = threads or available_cpus()
    kernels = gaussian_kernels()
    if kernels is not None:
        embeddings, mean, whitening = (np.ascontiguousarray(a, dtype=np.float32) for a in (embeddings, mean, whitening))
        out = np.empty((batch, positions), dtype=np.float32)
        # few large slices: each one costs a thread hand-off and a position without prefetching
        run_over_chunks(lambda start, stop: kernels.mahalanobis(embeddings, mean, whitening, out, start, stop, rows),
                        _even_slices(positions, 2 * threads), threads)
        return out
    chunks = [(s, min(s + chunk_positions, positions)) for s in range(0, positions, chunk_positions)]
    distances = np.empty((positions, batch), dtype=np.float32)

    def work(start, stop):
        whitened = np.matmul(embeddings[start:stop] - mean[start:stop, None, :], whitening[start:stop])
        np.sqrt(np.einsum("pbd,pbd->pb", whitened, whitened), out=distances[start:stop])

    run_over_chunks(work, chunks, threads)
    return np.ascontiguousarray(distances.T)


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


def upsample_nearest_positions_first(x: paddle.Tensor, height: int, width: int) -> paddle.Tensor:
    """``upsample_nearest`` of [h, w, B, c] features -> [height, width, B, c]."""
    source_h, source_w, channels = x.shape[0], x.shape[1], x.shape[3]
    if height % source_h == 0 and width % source_w == 0:
        step_h, step_w = height // source_h, width // source_w
        x = x.reshape([source_h, 1, source_w, 1, -1, channels])
        x = x.expand([source_h, step_h, source_w, step_w, x.shape[4], channels])
        return x.reshape([height, width, -1, channels])
    rows = paddle.to_tensor(nearest_indices(source_h, height))
    cols = paddle.to_tensor(nearest_indices(source_w, width))
    return paddle.index_select(paddle.index_select(x, rows, axis=0), cols, axis=1)


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

    def forward(self, features: list, positions_first: bool = False) -> paddle.Tensor:
        """[B, d, P] embeddings, or [P, B, d] with ``positions_first`` (what scoring needs: then
        each stage is transposed before it is upsampled, on 1/4 or 1/16 of the data)."""
        height, width = features[0].shape[2], features[0].shape[3]
        parts = []
        for stage in self.stages_used:
            part = F.conv2d(features[stage], getattr(self, f"stage{stage}_selection"))     # [B, c, h, w]
            resize = part.shape[2] != height or part.shape[3] != width
            if positions_first:
                part = part.transpose([2, 3, 0, 1])                                        # [h, w, B, c]
                if resize:
                    part = upsample_nearest_positions_first(part, height, width)
                parts.append(part.flatten(0, 1))
            else:
                parts.append(upsample_nearest(part, height, width) if resize else part)
        if positions_first:
            return paddle.concat(parts, axis=2)
        return paddle.concat(parts, axis=1).flatten(2)

    def to_idx_order(self, embeddings: paddle.Tensor, positions_first: bool = False) -> paddle.Tensor:
        """Grouped embeddings [B, d, P] (or [P, B, d]) in the original's idx order."""
        return paddle.index_select(embeddings, paddle.to_tensor(self.order), axis=2 if positions_first else 1)

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
        # on the CPU, eager scoring runs in NumPy on the same memory (None on a GPU)
        self._host_gaussian = tuple(self._host_arrays) if self._host_arrays else None
        self._whitening_rows = None   # the whitening's zero structure, found at the first host scoring
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

    def host_scoring(self) -> bool:
        """Eager on the CPU, scoring runs in NumPy threads on the Gaussian's host memory; in a
        GPU or exported graph, as Paddle ops."""
        return self._host_gaussian is not None and paddle.in_dynamic_mode()

    def embed(self, images: paddle.Tensor, positions_first: bool = True) -> paddle.Tensor:
        """Embeddings in grouped order: [P, B, d], the layout scoring takes (under Paddle Inference
        with oneDNN the whole model ran 1.08x faster than with [B, d, P] and a transpose:
        logs/compare_exports_demo_resnet18.log), or [B, d, P] with ``positions_first=False``."""
        return self.embedding(self.backbone(images), positions_first)

    def distances(self, embeddings: paddle.Tensor) -> paddle.Tensor:
        """[P, B, d] embeddings -> [B, P] Mahalanobis distances."""
        if self.host_scoring():
            mean, whitening = self._host_gaussian
            if self._whitening_rows is None:       # once per model: a pass over the matrices
                self._whitening_rows = whitening_rows(whitening)
            return paddle.to_tensor(mahalanobis_host(host_array(embeddings), mean, whitening,
                                                     rows=self._whitening_rows))
        return mahalanobis_positions_first(embeddings, self.mean, self.whitening)

    def smooth(self, distances: paddle.Tensor) -> paddle.Tensor:
        """[B, P] distances -> [B, H, W] upsampled and blurred anomaly maps."""
        grid = distances.reshape([-1, self.feature_grid[0], self.feature_grid[1]])
        return _smooth(grid, self.row_smoothing, self.col_smoothing_t)

    def forward(self, images: paddle.Tensor):
        anomaly_map = self.smooth(self.distances(self.embed(images)))
        image_score = anomaly_map.max(axis=[1, 2])
        return anomaly_map, image_score
