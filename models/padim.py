"""The PaDiM model as tensors: embedding, streaming Gaussian fit, Mahalanobis scoring, anomaly map.

Nothing here reads files or parses flags. Shapes: B images, d selected channels, P = h*w
feature positions (row-major over the first stage's grid), (H, W) the input image size.
Embeddings have one layout everywhere: positions first, [P, B, d], the layout of the batched
per-position products of the fit and of the scoring.

    images [B, 3, H, W] -> backbone -> Embedding -> [P, B, d]
        fit:   GaussianFit.update (per batch) -> finalize -> mean [P, d], whitening [P, d, d]
        score: mahalanobis -> [B, P] -> AnomalyMap -> [B, H, W] -> max -> image score [B]
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from threadpoolctl import ThreadpoolController

from utils.numbers import available_cpus

DEFAULT_SEED = 7
DEFAULT_EPS = 0.01
DEFAULT_SIGMA = 4.0


# --------------------------------------------------------------------------- channels

def channel_indices(total_channels: int, d: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The original's channel draw: ``random.seed(seed); random.sample(range(C), d)``, in draw order."""
    if not 0 < d <= total_channels:
        raise ValueError(f"d must be in 1..{total_channels} for this backbone, got {d}")
    return np.asarray(random.Random(seed).sample(range(total_channels), d), dtype=np.int64)


def grouped_by_stage(idx: np.ndarray) -> np.ndarray:
    """The same channels in ascending order, which groups them by backbone stage (the stages'
    channels are concatenated in order): the order a fit stores, in which ``Embedding`` picks
    each stage's channels without a gather."""
    return np.sort(np.asarray(idx, dtype=np.int64))


# --------------------------------------------------------------------------- embedding

def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target index for nearest upsampling (``F.interpolate(mode='nearest')``)."""
    return np.floor(np.arange(target) * (source / target)).astype(np.int64)


def upsample_nearest(x: paddle.Tensor, height: int, width: int) -> paddle.Tensor:
    """``F.interpolate(mode='nearest')`` of [h, w, B, c] features -> [height, width, B, c], without
    an interpolate op: a reshape + expand for integer factors (the ResNet/MobileNet stages),
    gathers otherwise."""
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
    """Stage features [B, C_s, h_s, w_s] -> embeddings [P, B, d]: the channels ``idx`` of the
    concatenated stages, in the order of ``idx``, every stage nearest-upsampled to the first
    stage's grid (h, w).

    Each stage's channels are picked by a one-hot 1×1 convolution (exact in float32; it runs in
    oneDNN/cuDNN where a gather would not) and only those are upsampled, by reshape + expand: no
    gather or interpolate op in the graph for the usual integer stage ratios. An ``idx`` grouped
    by stage (``grouped_by_stage``, what a fit stores) is the concatenation's order already; any
    other order costs one gather at the end.
    """

    def __init__(self, channels: Sequence[int], idx: np.ndarray):
        super().__init__()
        idx = np.asarray(idx, dtype=np.int64)
        offsets = np.cumsum([0, *channels])
        if idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= offsets[-1]:
            raise ValueError(f"idx must list channels in 0..{offsets[-1] - 1}")
        stage_of = np.searchsorted(offsets, idx, side="right") - 1
        self.stages_used = [int(stage) for stage in np.unique(stage_of)]
        for stage in self.stages_used:
            chosen = idx[stage_of == stage] - offsets[stage]
            selection = np.zeros((len(chosen), channels[stage], 1, 1), dtype=np.float32)
            selection[np.arange(len(chosen)), chosen] = 1.0
            self.register_buffer(f"stage{stage}_selection", paddle.to_tensor(selection))
        concatenated = np.argsort(stage_of, kind="stable")   # idx[concatenated] is the concatenation's order
        self.order = None if np.array_equal(concatenated, np.arange(len(idx))) else np.argsort(concatenated)

    def forward(self, features: list) -> paddle.Tensor:
        height, width = features[0].shape[2], features[0].shape[3]
        parts = []
        for stage in self.stages_used:
            part = F.conv2d(features[stage], getattr(self, f"stage{stage}_selection"))
            # positions first before upsampling: the transpose then moves 1/4 or 1/16 of the data
            part = part.transpose([2, 3, 0, 1])                                      # [h, w, B, c]
            if part.shape[0] != height or part.shape[1] != width:
                part = upsample_nearest(part, height, width)
            parts.append(part.flatten(0, 1))                                         # [P, B, c]
        embeddings = paddle.concat(parts, axis=2)
        if self.order is not None:
            embeddings = paddle.index_select(embeddings, paddle.to_tensor(self.order), axis=2)
        return embeddings


# --------------------------------------------------------------------------- Gaussian

# The Gram matrices are summed in float64 whenever their float64 array takes at most this many
# bytes. In float64 the model does not depend, to float32 output precision, on how the images
# are grouped into batches or split over processes; in float32 every grouping rounds the sums
# differently, and the whitening inherits that rounding times the covariance's condition
# number. The array is P·d²·8 bytes: at 224 pixels ResNet18 and MobileNetV2 (d=100) take a few
# hundred MB. d=550 (WR50-Rd550, ResNet50: 7.6 GB in float64) is the exception: float64 would
# double the fit's largest array, so there the Gram matrices stay float32, centred to keep them
# accurate.
GRAM_FLOAT64_MAX_BYTES = 2 << 30
# The NumPy backend holds on to incoming batches, up to half the Gram array's bytes and at most
# this many, and adds their products in one pass over the Gram array: the array is far larger
# than the caches, so each pass costs memory traffic, and a few large products keep BLAS busier
# than many small ones. The cap keeps WR50-Rd550's batches of 32 (7 MB an image) from being held.
HELD_EMBEDDINGS_MAX_BYTES = 256 << 20


def gram_dtype(positions: int, d: int, float64_max_bytes: int = GRAM_FLOAT64_MAX_BYTES) -> str:
    """'float64' when P Gram matrices d×d fit ``float64_max_bytes`` in float64, else 'float32'."""
    return "float64" if positions * d * d * 8 <= float64_max_bytes else "float32"


@dataclass
class GaussianSums:
    """A fit's sufficient statistics, taken about ``shift``: all that a ``GaussianFit`` keeps.

    n      images added
    shift  [P, d] float32, the centre of the sums (the first batch's mean)
    sums   [P, d] float64, Σ (x - shift)
    gram   [P, d, d] float64, Σ (x - shift)(x - shift)ᵀ; float32 where the float64 array would
           exceed ``GRAM_FLOAT64_MAX_BYTES`` (``gram_dtype``)

    NumPy arrays in the NumPy backend, Paddle tensors in the Paddle backend. Two fits' sums about
    the same shift add up to the sums of one fit on all their images: a data-parallel fit brings
    its ranks to one shift (``GaussianFit.recentre``), all-reduces n, sums and gram in float64,
    and loads the totals (``GaussianFit.load_state``).
    """
    n: int
    shift: Any
    sums: Any
    gram: Any


class GaussianFit:
    """Streaming per-position mean and covariance of embeddings [P, B, d], then the whitening
    that turns them into Mahalanobis distances.

    Memory is O(P·d²) whatever the number of images: the fit holds ``GaussianSums`` (and, on
    the host, recent batches until they are added, at most half the Gram's bytes and
    ``held_max_bytes``). The per-position sums are float64, and so are the Gram matrices and
    their batch products, each batch centred in float64 on the first batch's mean (no
    cancellation between Σxxᵀ and n·μμᵀ), unless the float64 Gram array would exceed
    ``float64_max_bytes`` (``gram_dtype``): then the Gram matrices and products are float32,
    which the centring keeps accurate. ``finalize`` computes in float64 either way.

    Two backends, chosen once at construction (``backend``; default: 'numpy' when Paddle's
    device is the CPU, else 'paddle'):

    - 'numpy': on the host, the Gram matrices of several batches at once by batched BLAS over
      slices of positions, the slices spread over ``threads`` threads (BLAS at one thread each:
      these are many small products, where BLAS's own threading only adds overhead);
    - 'paddle': Paddle tensors on the current device; the sums stay there across updates and
      are copied to the host only in ``finalize``, a slice of positions at a time. The float64
      products run at the device's float64 rate, a small fraction of float32's on consumer GPUs
      (never measured here: no GPU).

    ``finalize`` runs on the host for both, in float64 over slices of positions in threads: the
    batched Cholesky factor L of cov = N-1 estimate + eps·I, then L's inverse.
    """

    def __init__(self, backend: str | None = None, threads: int | None = None, chunk_bytes: int = 16 << 20,
                 float64_max_bytes: int = GRAM_FLOAT64_MAX_BYTES, held_max_bytes: int = HELD_EMBEDDINGS_MAX_BYTES):
        if backend is None:
            backend = "numpy" if paddle.get_device() == "cpu" else "paddle"
        if backend not in ("numpy", "paddle"):
            raise ValueError(f"backend must be 'numpy' or 'paddle', got {backend!r}")
        self.backend = backend
        self.threads = threads or available_cpus()
        self.chunk_bytes = chunk_bytes
        self.float64_max_bytes = float64_max_bytes
        self.held_max_bytes = held_max_bytes
        self.n_ = 0
        self.positions_ = self.d_ = self.gram_dtype_ = None
        self._shift = self._sums = self._gram = None
        self._held, self._held_count = [], 0        # NumPy backend: batches not yet added, their image count
        self._finalized = False

    # ---- streaming

    @paddle.no_grad()
    def update(self, embeddings) -> "GaussianFit":
        """Add a batch of embeddings [P, B, d] (a Paddle tensor or a NumPy array). The NumPy
        backend may keep the batch's host array, without a copy, until later batches join it
        (``state``, ``recentre`` and ``finalize`` add what is held): don't write into it."""
        self._check_not_finalized()
        positions, batch, d = self._check_shape(embeddings, "embeddings")
        if self._shift is None:
            self._set_shape(positions, d)
        elif (positions, d) != (self.positions_, self.d_):
            raise ValueError(f"embeddings of {positions} positions x {d} channels after "
                             f"{self.positions_} x {self.d_}")
        if self.backend == "numpy":
            self._update_numpy(_host_float32(embeddings))
        else:
            self._update_paddle(_tensor_float32(embeddings))
        self.n_ += batch
        return self

    def _update_numpy(self, x: np.ndarray) -> None:
        if self._shift is None:
            self._shift = x.mean(axis=1, dtype=np.float64).astype(np.float32)
            self._sums = np.zeros((self.positions_, self.d_), dtype=np.float64)
            self._gram = np.zeros((self.positions_, self.d_, self.d_), dtype=self.gram_dtype_)
        capacity = min(self.held_max_bytes, self._gram.nbytes // 2) // (self.positions_ * self.d_ * 4)
        batch = x.shape[1]
        if self._held_count + batch > capacity:
            self._add_held()
        if 2 * batch > capacity:   # no other batch of its size would join it
            self._add_products([x])
        else:
            self._held.append(x)
            self._held_count += batch

    def _add_held(self) -> None:
        """Add the held batches' products to the sums."""
        if self._held:
            self._add_products(self._held)
            self._held, self._held_count = [], 0

    def _add_products(self, batches: list) -> None:
        """Add batches of embeddings [P, B_i, d] float32 to the host's sums, as one block per
        slice of positions centred in the Gram's dtype."""
        shift, sums, gram = self._shift, self._sums, self._gram
        count = sum(x.shape[1] for x in batches)

        def work(start, stop):
            block = np.empty((stop - start, count, self.d_), dtype=gram.dtype)               # [p, B, d]
            first = 0
            for x in batches:
                np.subtract(x[start:stop], shift[start:stop, None, :], out=block[:, first:first + x.shape[1]],
                            dtype=gram.dtype)
                first += x.shape[1]
            sums[start:stop] += block.sum(axis=1, dtype=np.float64)
            gram[start:stop] += np.matmul(block.transpose(0, 2, 1), block)

        run_over_chunks(work, self._slices(max_positions=64), self.threads)

    def _update_paddle(self, x: paddle.Tensor) -> None:
        if self._shift is None:
            self._shift = x.mean(axis=1)
            self._sums = paddle.zeros([self.positions_, self.d_], dtype="float64")
            self._gram = paddle.zeros([self.positions_, self.d_, self.d_], dtype=self.gram_dtype_)
        shift = self._shift.astype(self.gram_dtype_)
        # a slice at a time: the batch's products need no second [P, d, d] array
        for start, stop in self._slices():
            block = x[start:stop].astype(self.gram_dtype_) - shift[start:stop].unsqueeze(1)
            self._sums[start:stop] += paddle.sum(block, axis=1, dtype="float64")
            self._gram[start:stop] += paddle.matmul(block, block, transpose_x=True)

    # ---- the sums, for fits split over processes

    def state(self) -> GaussianSums:
        """The fit's own arrays (not copies), so that an all-reduce can sum them in place."""
        self._check_started()
        self._add_held()
        return GaussianSums(self.n_, self._shift, self._sums, self._gram)

    def load_state(self, state: GaussianSums) -> None:
        """Replace the sums, e.g. by their totals over ranks after an all-reduce; arrays of
        either kind are converted to this backend's (shift float32, sums float64, gram in
        ``gram_dtype`` of its shape)."""
        shape = tuple(state.sums.shape)
        if len(shape) != 2 or tuple(state.shift.shape) != shape or tuple(state.gram.shape) != (*shape, shape[1]):
            raise ValueError(f"inconsistent sums: shift {list(state.shift.shape)}, sums {list(state.sums.shape)}, "
                             f"gram {list(state.gram.shape)}")
        if self._shift is not None and shape != (self.positions_, self.d_):
            raise ValueError(f"sums of {shape[0]} positions x {shape[1]} channels for a fit of "
                             f"{self.positions_} x {self.d_}")
        self._set_shape(*shape)
        self._held, self._held_count = [], 0
        convert = _as_numpy if self.backend == "numpy" else _as_tensor
        self._shift, self._sums, self._gram = (convert(state.shift, "float32"), convert(state.sums, "float64"),
                                               convert(state.gram, self.gram_dtype_))
        self.n_, self._finalized = int(state.n), False

    @paddle.no_grad()
    def recentre(self, shift) -> None:
        """Re-express the sums about ``shift`` [P, d] (stored float32) instead of the current one.
        Exact algebra, in float64, a slice of positions at a time: with δ = old - new shift,
        S = Σ(x - old) and G = Σ(x - old)(x - old)ᵀ over the n images,

            Σ(x - new)            = S + n·δ
            Σ(x - new)(x - new)ᵀ  = G + S δᵀ + δ Sᵀ + n·δ δᵀ
        """
        self._check_started()
        self._add_held()
        convert = _as_numpy if self.backend == "numpy" else _as_tensor
        new = convert(shift, "float32")
        if tuple(new.shape) != (self.positions_, self.d_):
            raise ValueError(f"shift must have shape [{self.positions_}, {self.d_}], got {list(new.shape)}")
        n, sums, gram = self.n_, self._sums, self._gram
        delta = self._shift.astype("float64") - new.astype("float64")
        for start, stop in self._slices():
            s, dl = sums[start:stop], delta[start:stop]
            moved = (gram[start:stop].astype("float64") + s[:, :, None] * dl[:, None, :]
                     + dl[:, :, None] * s[:, None, :] + n * dl[:, :, None] * dl[:, None, :])
            gram[start:stop] = moved.astype(self.gram_dtype_)
        self._sums = sums + n * delta
        self._shift = new

    # ---- the Gaussian

    def finalize(self, eps: float = DEFAULT_EPS):
        """(mean [P, d] float32, whitening [P, d, d] float32), the covariance being the N-1
        estimate + eps·I; ``whitening`` is L⁻ᵀ for the Cholesky factor L of each covariance, so
        ‖(x - mean) @ whitening‖ is the Mahalanobis distance.

        Consumes the fit: on the host the whitening is computed over the Gram matrices, in their
        dtype, plus a few slices of positions per thread; a float64 whitening is then copied to
        float32, a peak of 12·P·d² bytes (4·P·d² for a float32 Gram, which becomes the
        whitening). With the Gram on a device, the host holds the float32 whitening, 4·P·d²
        bytes, and a slice of the Gram at a time.
        """
        self._check_started()
        n, positions, d = self.n_, self.positions_, self.d_
        if n < 2:
            raise ValueError(f"need at least 2 training images to fit a covariance, got {n}")
        self._add_held()
        shift, sums = _as_numpy(self._shift, "float32"), _as_numpy(self._sums, "float64")
        mean = np.empty((positions, d), dtype=np.float32)
        self._finalized = True
        on_host = self.backend == "numpy"
        gram = self._gram
        whitening = gram if on_host else np.empty((positions, d, d), dtype=np.float32)
        # float64 slices small enough to stay in cache
        step = max(1, (3 << 19) // (d * d * 8))

        for first, last in [(0, positions)] if on_host else self._slices():
            # the device's Gram matrices come to the host a slice at a time
            source = gram if on_host else gram[first:last].numpy()
            offset = 0 if on_host else first

            def work(start, stop, source=source, offset=offset):
                centred = source[start - offset:stop - offset].astype(np.float64, copy=False)
                slice_mean, slice_whitening = _gaussian(centred, sums[start:stop], n, eps, start)
                mean[start:stop] = shift[start:stop] + slice_mean
                whitening[start:stop] = slice_whitening

            run_over_chunks(work, [(s, min(s + step, last)) for s in range(first, last, step)], self.threads)
        self._gram = None
        return mean, whitening.astype(np.float32, copy=False)

    # ---- helpers

    def _set_shape(self, positions: int, d: int) -> None:
        self.positions_, self.d_ = positions, d
        self.gram_dtype_ = gram_dtype(positions, d, self.float64_max_bytes)

    def _slices(self, max_positions: int | None = None) -> list:
        """Slices of positions whose Gram matrices take at most ``chunk_bytes``."""
        step = max(1, self.chunk_bytes // (self.d_ * self.d_ * np.dtype(self.gram_dtype_).itemsize))
        step = min(step, max_positions) if max_positions else step
        return [(start, min(start + step, self.positions_)) for start in range(0, self.positions_, step)]

    @staticmethod
    def _check_shape(embeddings, name: str) -> tuple:
        if len(embeddings.shape) != 3 or 0 in tuple(embeddings.shape):
            raise ValueError(f"{name} must have shape [P, B, d], got {list(embeddings.shape)}")
        return tuple(int(v) for v in embeddings.shape)

    def _check_not_finalized(self) -> None:
        if self._finalized:
            raise RuntimeError("this fit was finalized: its sums became the whitening")

    def _check_started(self) -> None:
        self._check_not_finalized()
        if self._shift is None:
            raise ValueError("no embeddings were added to the fit")


def _gaussian(gram: np.ndarray, sums: np.ndarray, n: int, eps: float, first_position: int):
    """Sums of n images about a shift, Σ(x - shift) [p, d] and Σ(x - shift)(x - shift)ᵀ [p, d, d]
    (float64; ``gram`` is overwritten) -> (mean - shift [p, d], whitening L⁻ᵀ [p, d, d]) in
    float64, for cov = N-1 estimate + eps·I."""
    diagonal = np.einsum("pii->pi", gram)   # a view; a non-finite embedding shows in Σx and in Σx²
    finite = np.isfinite(sums).all(axis=1) & np.isfinite(diagonal).all(axis=1)
    if not finite.all():
        raise ValueError(f"the embeddings at feature position {first_position + int(np.argmin(finite))} are not "
                         "finite (NaN or inf): check the backbone weights and the input images")
    centred_mean = sums / n
    # (n - 1)·cov, in place; its factor is √(n - 1)·L, so L⁻ᵀ is √(n - 1) times the factor's inverse
    gram -= (n * centred_mean)[:, :, None] * centred_mean[:, None, :]
    diagonal += (n - 1) * eps
    whitening = _whitening(gram, first_position)
    whitening *= np.sqrt(n - 1)
    return centred_mean, whitening


def _whitening(cov: np.ndarray, first_position: int = 0) -> np.ndarray:
    """[p, d, d] float64 covariances -> [p, d, d] float64 L⁻ᵀ with cov = L Lᵀ. NumPy's batched
    Cholesky and matmuls release the GIL, so slices of positions run in parallel threads
    (SciPy's wrappers of LAPACK's potrf and trtri hold it)."""
    try:
        lower = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        bad = next((k for k, matrix in enumerate(cov) if not _positive_definite(matrix)), 0)
        raise np.linalg.LinAlgError(f"covariance at position {first_position + bad} is not positive definite") from None
    return np.swapaxes(_lower_inverse(lower), 1, 2)


def _positive_definite(matrix: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(matrix)
        return True
    except np.linalg.LinAlgError:
        return False


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverses of lower-triangular matrices [p, d, d] by 2×2 block recursion,
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]: batched matmuls do the work, with about
    the flops of LAPACK's triangular inverse; blocks of up to 24 go to np.linalg.inv."""
    d = lower.shape[-1]
    if d <= 24:
        return np.linalg.inv(lower)
    h = d // 2
    top, bottom = _lower_inverse(lower[:, :h, :h]), _lower_inverse(lower[:, h:, h:])
    inverse = np.zeros_like(lower)
    inverse[:, :h, :h], inverse[:, h:, h:] = top, bottom
    inverse[:, h:, :h] = -np.matmul(bottom, np.matmul(lower[:, h:, :h], top))
    return inverse


def covariance_from_whitening(whitening: np.ndarray) -> np.ndarray:
    """Recover the covariances: Σ⁻¹ = W Wᵀ, so Σ = (W Wᵀ)⁻¹ (float64; for tests and inspection)."""
    w = whitening.astype(np.float64)
    return np.linalg.inv(w @ np.swapaxes(w, 1, 2))


def _host_float32(array) -> np.ndarray:
    """A NumPy array or Paddle tensor as float32 NumPy; a CPU tensor without a copy where DLPack
    allows (the array keeps the tensor's memory alive)."""
    if isinstance(array, np.ndarray):
        return np.asarray(array, dtype=np.float32)
    if array.dtype != paddle.float32:
        array = array.astype("float32")
    if array.place.is_cpu_place():
        try:
            return np.from_dlpack(array)
        except (TypeError, RuntimeError, BufferError, AttributeError):
            pass
    return array.numpy()


def _tensor_float32(array) -> paddle.Tensor:
    """A NumPy array or Paddle tensor as a float32 tensor on the current device."""
    if isinstance(array, paddle.Tensor):
        return array if array.dtype == paddle.float32 else array.astype("float32")
    return paddle.to_tensor(np.asarray(array, dtype=np.float32))


def _as_numpy(array, dtype: str) -> np.ndarray:
    if isinstance(array, paddle.Tensor):
        array = array.numpy()
    return np.ascontiguousarray(array, dtype=dtype)


def _as_tensor(array, dtype: str) -> paddle.Tensor:
    if isinstance(array, paddle.Tensor):
        return array if array.dtype == getattr(paddle, dtype) else array.astype(dtype)
    return paddle.to_tensor(np.asarray(array, dtype=dtype))


_POOL = {}   # threads -> ThreadPoolExecutor, kept for the process (starting threads costs per call)
_BLAS = []   # one threadpoolctl controller: building one scans every loaded library


def run_over_chunks(work, chunks, threads: int) -> None:
    """``work(start, stop)`` for every chunk, on ``threads`` threads with BLAS at one thread each
    (NumPy and SciPy release the GIL in their BLAS/LAPACK calls and ufunc loops). With one
    thread, BLAS stays at one thread too: its own threads only slow these small products down."""
    if len(chunks) <= 1 and threads > 1:   # one piece of work: BLAS may spread it over its threads
        for start, stop in chunks:
            work(start, stop)
        return
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    with _BLAS[0].limit(limits=1, user_api="blas"):
        if threads <= 1:
            for start, stop in chunks:
                work(start, stop)
            return
        pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="padim"))
        for future in [pool.submit(work, start, stop) for start, stop in chunks]:
            future.result()


# --------------------------------------------------------------------------- scoring

def mahalanobis(embeddings: paddle.Tensor, mean: paddle.Tensor, whitening: paddle.Tensor) -> paddle.Tensor:
    """Embeddings [P, B, d], mean [P, d], whitening [P, d, d] -> distances [B, P] ‖(x - μ) W‖,
    one batched matmul over positions."""
    whitened = paddle.matmul(embeddings - mean.unsqueeze(1), whitening)     # [P, B, d]
    return paddle.sqrt((whitened * whitened).sum(axis=2)).transpose([1, 0])


def mahalanobis_on_host(embeddings, mean: np.ndarray, whitening: np.ndarray, threads: int | None = None,
                        step: int | None = None) -> np.ndarray:
    """``mahalanobis`` in NumPy on the host: embeddings [P, B, d] (or a list of such blocks,
    taken as one batch in their order), mean [P, d], whitening [P, d, d] float32 -> distances
    [B, P] float32. ``step`` positions at a time (default: slices of about 2 MB) spread over
    ``threads`` threads, every block scored while a slice's whitening is in cache. The
    calibration scores host arrays with the host's Gaussian this way: no copy of either goes to
    a device, and batched BLAS over small slices beats one large batched matmul."""
    blocks = [embeddings] if isinstance(embeddings, np.ndarray) else list(embeddings)
    positions, d = mean.shape
    offsets = np.cumsum([0] + [block.shape[1] for block in blocks])
    step = step or max(1, (1 << 19) // (int(offsets[-1]) * d))
    distances = np.empty((positions, int(offsets[-1])), dtype=np.float32)

    def work(start, stop):
        for block, first, last in zip(blocks, offsets[:-1], offsets[1:]):
            whitened = np.matmul(block[start:stop] - mean[start:stop, None, :], whitening[start:stop])
            distances[start:stop, first:last] = np.sqrt(np.einsum("pbd,pbd->pb", whitened, whitened))

    run_over_chunks(work, [(s, min(s + step, positions)) for s in range(0, positions, step)],
                    threads or available_cpus())
    return np.ascontiguousarray(distances.T)


# --------------------------------------------------------------------------- anomaly map

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


def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """[size, size]: scipy.ndimage.gaussian_filter1d's blur of a column (weights exp(-x²/2σ²)
    over |x| <= int(truncate·σ + 0.5), normalised; mode 'reflect': d c b a | a b c d | d c b a)."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / float(sigma) ** 2 * offsets.astype(np.float64) ** 2)
    weights /= weights.sum()
    source = (np.arange(size)[:, None] + offsets) % (2 * size)
    source = np.where(source >= size, 2 * size - 1 - source, source)
    matrix = np.zeros((size, size), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(size), len(offsets)), source.ravel()), np.tile(weights, size))
    return matrix


def smoothing_matrix(source: int, target: int, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """[target, source]: bilinear upsampling then scipy's Gaussian blur (reflect, truncate 4).

    Both steps are linear along each axis, so their product applied on both sides equals
    ``gaussian_filter(interpolate(D), sigma)``; blurring the identity gives the blur matrix.
    """
    upsample = bilinear_matrix(source, target)
    if sigma <= 0:
        return upsample
    return blur_matrix(target, sigma) @ upsample


class AnomalyMap(nn.Layer):
    """Distances [B, P] on the feature grid (h, w) -> anomaly maps [B, H, W] in the same units:
    bilinear upsampling (align_corners=False) then a Gaussian blur of ``sigma`` pixels (scipy's
    reflect mode), as one fixed matrix per axis, ``rows [H, h] @ D @ cols_t [w, W]``: no
    interpolate op in the graph."""

    def __init__(self, feature_grid: tuple[int, int], image_size: tuple[int, int], sigma: float = DEFAULT_SIGMA):
        super().__init__()
        self.feature_grid = tuple(int(v) for v in feature_grid)
        rows = smoothing_matrix(self.feature_grid[0], int(image_size[0]), sigma)
        cols = smoothing_matrix(self.feature_grid[1], int(image_size[1]), sigma)
        self.register_buffer("rows", paddle.to_tensor(rows.astype(np.float32)))
        self.register_buffer("cols_t", paddle.to_tensor(np.ascontiguousarray(cols.T, dtype=np.float32)))

    def forward(self, distances: paddle.Tensor) -> paddle.Tensor:
        grid = distances.reshape([-1, self.feature_grid[0], self.feature_grid[1]])
        return paddle.matmul(paddle.matmul(self.rows, grid), self.cols_t)


# --------------------------------------------------------------------------- model

class PaDiM(nn.Layer):
    """Images [B, 3, H, W] -> (anomaly map [B, H, W] in Mahalanobis units, image score [B]).

    ``idx`` [d] are the embedding's channels, in the order of the columns of ``mean`` [P, d]
    and of the rows of ``whitening`` [P, d, d]; the arrays are used as given, never modified.
    """

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
        self.register_buffer("mean", self._device_tensor(mean))
        self.register_buffer("whitening", self._device_tensor(whitening))
        self.anomaly_map = AnomalyMap(self.feature_grid, self.image_size, sigma)
        self.eval()

    def _device_tensor(self, array: np.ndarray) -> paddle.Tensor:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if paddle.get_device() != "cpu":
            return paddle.to_tensor(array)
        self._host_arrays.append(array)  # the zero-copy tensor borrows this memory: keep it alive
        return paddle.Tensor(array, paddle.CPUPlace(), False, True)

    def embed(self, images: paddle.Tensor) -> paddle.Tensor:
        """Images [B, 3, H, W] -> embeddings [P, B, d]."""
        return self.embedding(self.backbone(images))

    def distances(self, embeddings: paddle.Tensor) -> paddle.Tensor:
        """Embeddings [P, B, d] -> Mahalanobis distances [B, P]."""
        return mahalanobis(embeddings, self.mean, self.whitening)

    def forward(self, images: paddle.Tensor):
        anomaly_map = self.anomaly_map(self.distances(self.embed(images)))
        return anomaly_map, anomaly_map.max(axis=[1, 2])
