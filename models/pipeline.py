"""Glue between data, backbone and the PaDiM maths: fit over a dataset, build the model from a
model file, score a dataset, export a model file."""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import paddle

from datasets.mvtec import IMAGENET_MEAN, IMAGENET_STD, DataError, MVTecDataset, iterate_batches
from models import distributed
from models.backbones import DEFAULT_D, build_backbone, get_backbone_state, set_backbone_state
from models.calibration import (DEFAULT_FALSE_ALARM_RATE, Calibration, calibrate, calibration_images, images_needed,
                                leave_one_out_distances)
from models.export import DEFAULT_OPSET, ExportResult, check_export_request, check_onnx_size, export_model
from models.model_file import ModelFile, ModelFileError, ModelMeta, load_model, read_meta
from models.padim import (DEFAULT_EPS, DEFAULT_SEED, DEFAULT_SIGMA, AnomalyMap, Embedding, GaussianFit, GaussianSums,
                          PaDiM, channel_indices, grouped_by_stage, mahalanobis_on_host)
from models.static import static_runner_or_none

LOGGER = logging.getLogger("padim")


def use_device(device: str = "auto") -> str:
    """Select 'gpu' when asked for (or 'auto') and Paddle has CUDA, else 'cpu'; returns the choice."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    has_cuda = paddle.device.is_compiled_with_cuda()
    if device == "gpu" and not has_cuda:
        LOGGER.warning("--device gpu requested but this Paddle build has no CUDA: running on CPU")
    chosen = "gpu" if device in ("auto", "gpu") and has_cuda else "cpu"
    paddle.set_device(chosen)
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    paddle.seed(seed)


def feature_grid_of(backbone, image_size) -> tuple[int, int]:
    with paddle.no_grad():
        first = backbone(paddle.zeros([1, 3, *image_size], dtype="float32"))[0]
    return int(first.shape[2]), int(first.shape[3])


@dataclass
class FitReport:
    n_images: int
    seconds: float
    extraction_seconds: float
    gaussian_seconds: float
    batches: int = 0
    calibration_seconds: float = 0.0


def calibrate_from_embeddings(blocks, mean: np.ndarray, whitening: np.ndarray, n_train: int, feature_grid,
                              image_size, sigma: float = DEFAULT_SIGMA,
                              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                              batch_size: int = 32) -> tuple[Calibration, dict]:
    """The verdict thresholds of a fitted model from ``blocks``, embeddings [P, b, d] of some of
    its ``n_train`` training images (KeptEmbeddings): their distances under the model
    (on the host), turned into those of the model fitted without each image
    (models.calibration.leave_one_out_distances), smoothed into anomaly maps [Bc, H, W] and
    calibrated for ``false_alarm_rate``. Returns the Calibration and the maps' score range (the
    model's ``train_statistics``: the colour scale's low end)."""
    distances = mahalanobis_on_host(blocks, mean, whitening)                            # [Bc, P]
    with paddle.no_grad():
        smooth = AnomalyMap(feature_grid, image_size, sigma)
        maps = np.concatenate([
            smooth(paddle.to_tensor(leave_one_out_distances(distances[start:start + batch_size], n_train)
                                    .astype(np.float32))).numpy()
            for start in range(0, len(distances), batch_size)])
    count = len(maps)
    source = (f"calibrated on {count} training image(s), each scored by the model of the other {n_train - 1} "
              f"(leave-one-out), for a false-alarm rate of {float(false_alarm_rate):g}")
    return calibrate(maps, false_alarm_rate, source), score_statistics(maps)


def score_statistics(maps: np.ndarray) -> dict:
    """Score range of anomaly maps [N, H, W] of normal images."""
    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    median, p99 = np.percentile(maps, [50, 99])
    return {
        "n_images": int(len(maps)),
        "pixel_median": float(median),
        "pixel_p99": float(p99),
        "pixel_max": float(maps.max()),
        "image_score_mean": float(image_scores.mean()),
        "image_score_max": float(image_scores.max()),
    }


def calibration_note(calibration: Calibration) -> str | None:
    """A log line when the calibration images are too few for the rate asked for, else None."""
    if calibration.guaranteed_rate <= calibration.false_alarm_rate:
        return None
    return (f"note: a false-alarm rate of {calibration.false_alarm_rate:g} needs at least "
            f"{images_needed(calibration.false_alarm_rate)} calibration images; with {calibration.n_calibration} "
            f"the image threshold is their largest score, which guarantees {calibration.guaranteed_rate:.4g} "
            f"(1/{calibration.n_calibration + 1})")


def fit_padim(dataset: MVTecDataset, backbone_name: str, weights: str = "imagenet", d: int | None = None,
              seed: int = DEFAULT_SEED, eps: float = DEFAULT_EPS, sigma: float = DEFAULT_SIGMA,
              batch_size: int = 32, num_workers: int = 2, print_freq: int = 2,
              progress: bool = True, static_graph: bool = True,
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
              ranks: distributed.Context | None = None) -> tuple[ModelFile | None, FitReport]:
    """Fit one category's Gaussians and calibrate the verdict thresholds for ``false_alarm_rate``
    (calibrate_from_embeddings); returns the model file contents (not yet written) and timings.
    ``static_graph``: on the CPU, extract the features through Paddle Inference (oneDNN).

    Under paddle.distributed.launch (``ranks`` None: read from the launcher's environment) each
    rank streams its ``dataset_shard`` and the sums meet (``sum_fit_over_ranks``): rank 0
    finalizes, calibrates and returns the model file, the others return (None, their own report).
    ``distributed.SINGLE``: this process fits the whole category alone."""
    from tqdm import tqdm

    ranks = distributed.context() if ranks is None else ranks
    seed_everything(seed)
    backbone = build_backbone(backbone_name, weights)
    total_channels = int(sum(backbone.channels))
    d = DEFAULT_D[backbone_name] if d is None else int(d)
    idx = grouped_by_stage(channel_indices(total_channels, d, seed))
    image_size = dataset.transform.image_size
    grid = feature_grid_of(backbone, image_size)
    embedding = Embedding(backbone.channels, idx)
    extract = embedding_extractor(backbone, embedding, image_size, static_graph)
    shard, indices = dataset_shard(dataset, ranks, "training images")
    gaussian = GaussianFit()
    kept = KeptEmbeddings(calibration_images(len(dataset), grid[0] * grid[1] * d * 4, false_alarm_rate),
                          grid[0] * grid[1], d)
    started = time.perf_counter()
    extraction = gaussian_time = 0.0
    batches = iterate_batches(shard, batch_size, num_workers)
    total = (len(shard) + batch_size - 1) // batch_size
    data_started = time.perf_counter()
    with distributed.step("training shard", ranks=ranks) as peers:
        for step, batch in enumerate(tqdm(batches, total=total, disable=not progress,
                                          desc=f"| feature extraction | train | {dataset.category} |")):
            peers.check()
            data_time = time.perf_counter() - data_started
            tick = time.perf_counter()
            embeddings = extract(batch.images)
            tock = time.perf_counter()
            gaussian.update(embeddings)
            kept.add(embeddings, indices[step * batch_size:step * batch_size + len(batch.samples)])
            done = time.perf_counter()
            extraction += tock - tick
            gaussian_time += done - tock
            if print_freq and step % print_freq == 0:
                LOGGER.info(f"Epoch 0[{step + 1}/{total}]: batch time:{done - tick:.4f}, data time:{data_time:.4f}")
            # our references dropped before the next forward pass (the fit and the calibration may
            # still hold the embeddings), so Paddle's allocator can reuse the rest
            del embeddings, batch
            data_started = time.perf_counter()
    if ranks.is_distributed:
        tick = time.perf_counter()
        sum_fit_over_ranks(gaussian)
        gaussian_time += time.perf_counter() - tick
        LOGGER.info(f"sums of {ranks.world_size} processes added in {time.perf_counter() - tick:.2f}s")
    kept_blocks = kept.gathered_on_rank0(ranks)
    del kept

    def finish() -> tuple[ModelFile, FitReport]:
        """Rank 0's part: the Gaussians, the calibration, the model file's contents."""
        nonlocal kept_blocks
        tick = time.perf_counter()
        mean, whitening = gaussian.finalize(eps)
        tock = time.perf_counter()
        calibration, statistics = calibrate_from_embeddings(kept_blocks, mean, whitening, gaussian.n_, grid,
                                                            image_size, sigma, false_alarm_rate)
        kept_blocks = None
        calibration_time = time.perf_counter() - tock
        meta = ModelMeta(
            category=dataset.category,
            backbone=backbone_name,
            weights_source=getattr(backbone, "weights_source", weights),
            stage_names=list(backbone.stage_names),
            channels=[int(c) for c in backbone.channels],
            d=d,
            seed=int(seed),
            eps=float(eps),
            sigma=float(sigma),
            **dataset.transform.geometry.to_meta(),
            feature_grid=[int(v) for v in grid],
            normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            n_train=int(gaussian.n_),
            train_statistics=statistics,
            calibration=calibration,
        )
        arrays = {"idx": idx, "mean": mean, "whitening": whitening}
        report = FitReport(gaussian.n_, time.perf_counter() - started, extraction,
                           gaussian_time + tock - tick, total, calibration_time)
        return ModelFile(None, meta, arrays, get_backbone_state(backbone)), report

    # inside a step: when rank 0 fails here, the others stop with its message
    finished = distributed.finalize_on_rank0(finish, "finalizing the fit", ranks=ranks)
    if finished is None:
        return None, FitReport(len(shard), time.perf_counter() - started, extraction, gaussian_time, total)
    return finished


# ---- data parallelism: the parts of a fit and an evaluation split over ranks

def dataset_shard(dataset: MVTecDataset, ranks: distributed.Context, what: str) -> tuple[MVTecDataset, list[int]]:
    """(this rank's images of ``dataset`` as a dataset of their own, their indices in
    ``dataset``): round robin over its sorted list (``distributed.shard``), after every rank
    checked that it lists the same images. Logs ``rank R of N: K <what>``. Not distributed:
    ``dataset`` itself."""
    if not ranks.is_distributed:
        return dataset, list(range(len(dataset)))
    if len(dataset) < ranks.world_size:
        raise DataError(f"{len(dataset)} {what} of {dataset.category} for {ranks.world_size} processes: every "
                        f"process needs at least one; start fewer processes")
    distributed.check_same_list([f"{s.defect_type}/{Path(s.path).name}" for s in dataset.samples],
                                f"{what} of {dataset.category}")
    indices = distributed.shard(range(len(dataset)), ranks.rank, ranks.world_size)
    shard = copy.copy(dataset)
    shard.samples = [dataset.samples[i] for i in indices]
    LOGGER.info(distributed.shard_line(len(indices), what))
    return shard, indices


def sum_fit_over_ranks(gaussian: GaussianFit) -> None:
    """Replace this rank's sums by those of every rank's images, on every rank: each rank's
    sums are re-expressed about the mean of all images (``distributed.pooled_shift``), so that
    they add, then summed in float64 (``distributed.all_reduce_sum``). Call it on every rank
    right after the step that streamed the shards."""
    state = gaussian.state()
    host = [array.numpy() if isinstance(array, paddle.Tensor) else array for array in (state.shift, state.sums)]
    gaussian.recentre(distributed.pooled_shift(state.n, *host))
    state = gaussian.state()
    distributed.all_reduce_sum(state.sums)
    distributed.all_reduce_sum(state.gram)
    gaussian.load_state(GaussianSums(distributed.sum_count(state.n), state.shift, state.sums, state.gram))


class KeptEmbeddings:
    """The embeddings of the training images that calibrate the model (``wanted``: their indices
    in the dataset's sorted list, from models.calibration.calibration_images), kept while the fit streams: ``blocks``, [P, b, d] float32 arrays in the order they
    came. Each rank of a data-parallel fit keeps those of its shard; ``gathered_on_rank0`` puts
    them together in the list's order, as one process would hold them."""

    def __init__(self, wanted: Sequence[int], positions: int, d: int):
        self.wanted = {int(i) for i in wanted}
        self.positions, self.d = int(positions), int(d)
        self.blocks: list[np.ndarray] = []
        self.indices: list[int] = []

    def add(self, embeddings, image_indices: Sequence[int]) -> None:
        """Keep the wanted images of a batch: ``embeddings`` [P, B, d] (NumPy or Paddle) of the
        dataset's images ``image_indices`` [B]."""
        rows = [row for row, index in enumerate(image_indices) if int(index) in self.wanted]
        if not rows:
            return
        if isinstance(embeddings, paddle.Tensor):
            block = paddle.index_select(embeddings, paddle.to_tensor(rows, dtype="int64"), axis=1).numpy()
        elif len(rows) == embeddings.shape[1]:
            block = embeddings   # the batch's own host array, kept without a copy
        else:
            block = np.asarray(embeddings)[:, rows]
        self.blocks.append(np.asarray(block, dtype=np.float32))
        self.indices.extend(int(image_indices[row]) for row in rows)

    def gathered_on_rank0(self, ranks: distributed.Context) -> list[np.ndarray] | None:
        """The blocks of all ranks, in the list's order, on rank 0 (one [P, K, d] array); None on
        the other ranks. Not distributed: ``blocks`` (streamed in the list's order). Under the
        launcher, call it on every rank right after the fit's step."""
        if not ranks.is_distributed:
            return self.blocks
        local = (np.concatenate(self.blocks, axis=1) if self.blocks
                 else np.empty((self.positions, 0, self.d), dtype=np.float32))
        self.blocks = []
        gathered = distributed.gather_indexed_to_rank0({"embeddings": local}, self.indices, axis=1)
        return None if gathered is None else [gathered[0]["embeddings"]]


def embedding_extractor(backbone, embedding: Embedding, image_size, static_graph: bool = True):
    """images [B, 3, H, W] -> embeddings [P, B, d]: a NumPy array from a Paddle Inference graph
    (CPU, ``static_graph``), else an eager Paddle tensor."""
    def embed(images):
        return embedding(backbone(images))

    runner = static_runner_or_none([backbone, embedding], embed, image_size, "backbone", static_graph)
    if runner is not None:
        return lambda images: runner(images)[0]

    @paddle.no_grad()
    def eager(images):
        embeddings = embed(paddle.to_tensor(images))
        if paddle.get_device() != "cpu":
            paddle.device.synchronize()  # the fit's timings are then honest (the CPU runs eagerly)
        return embeddings

    return eager


def build_model(model_file: ModelFile, release_arrays: bool = True) -> PaDiM:
    """The PaDiM layer of a loaded model file. With ``release_arrays`` the host copies of the
    Gaussian are dropped once they are on the device (WR50's whitening is 3.8 GB)."""
    meta = model_file.meta
    backbone = build_backbone(meta.backbone, None)
    set_backbone_state(backbone, model_file.backbone_state, source=str(model_file.path))
    if [int(c) for c in backbone.channels] != meta.channels:
        raise ModelFileError(f"{model_file.path}: {meta.backbone}'s stages have {backbone.channels} channels, the "
                             f"file says {meta.channels}")
    arrays = model_file.arrays
    model = PaDiM(backbone, arrays["idx"], arrays["mean"], arrays["whitening"], tuple(meta.image_size),
                  tuple(meta.feature_grid), meta.sigma)
    if release_arrays:
        arrays.pop("whitening")
        arrays.pop("mean")
    return model


def export_model_file(model_path, save_dir, img_size=None, backbone: str | None = None, onnx: bool = False,
                      opset: int = DEFAULT_OPSET, verify: bool = True, logger: logging.Logger | None = None) -> ExportResult:
    """export_model.py: check the request on the metadata alone, build the model on the CPU,
    export it to ``save_dir`` (models/export.py)."""
    model_path = Path(model_path)
    check_export_request(read_meta(model_path), img_size, onnx)
    paddle.set_device("cpu")
    model_file = load_model(model_path, backbone)
    if onnx:
        check_onnx_size(model_file)
    meta = model_file.meta
    model = build_model(model_file)
    del model_file
    return export_model(model, meta, model_path, save_dir, onnx, opset, verify, logger)


@dataclass
class ScoredSet:
    maps: np.ndarray        # [N,H,W] float32 anomaly maps, Mahalanobis units
    scores: np.ndarray      # [N] image scores
    masks: np.ndarray       # [N,H,W] bool ground truth
    labels: np.ndarray      # [N] 0/1
    samples: list
    images: np.ndarray | None = None    # [N,H,W,3] uint8 crops as shown in figures (keep_images)


# The Gaussian goes into the static graph's parameters, a second copy while the predictor loads;
# above this size (WR50-Rd550: 3.8 GB) scoring stays eager.
STATIC_SCORING_MAX_BYTES = 1 << 30


def model_scorer(model: PaDiM, static_graph: bool = True):
    """images [B, 3, H, W] -> (maps [B, H, W], scores [B]) as NumPy: the whole model through
    Paddle Inference on the CPU (``static_graph``, Gaussian up to 1 GiB), else eager."""
    runner = None
    if static_graph and model.whitening.size * 4 <= STATIC_SCORING_MAX_BYTES:
        runner = static_runner_or_none([model], model, model.image_size, "model", static_graph)
    if runner is not None:
        return runner

    @paddle.no_grad()
    def eager(images):
        anomaly_map, image_score = model(paddle.to_tensor(images))
        return anomaly_map.numpy(), image_score.numpy()

    return eager


def score_dataset(model: PaDiM, dataset: MVTecDataset, batch_size: int = 32, num_workers: int = 2,
                  progress: bool = True, static_graph: bool = True, keep_images: bool = False,
                  check: Callable[[], None] | None = None) -> ScoredSet:
    """Every image of ``dataset`` scored in batches. ``keep_images``: also the uint8 crops the
    batches were normalised from (for figures, without decoding the images again). ``check()``,
    if given, runs before each batch (``distributed.step``'s: stop when another rank failed)."""
    from tqdm import tqdm

    score = model_scorer(model, static_graph)
    maps, scores, masks, samples, images = [], [], [], [], []
    total = (len(dataset) + batch_size - 1) // batch_size
    for batch in tqdm(iterate_batches(dataset, batch_size, num_workers), total=total, disable=not progress,
                      desc=f"| feature extraction | {dataset.split} | {dataset.category} |"):
        if check is not None:
            check()
        anomaly_map, image_score = score(batch.images)
        maps.append(anomaly_map)
        scores.append(image_score)
        masks.append(batch.masks)
        samples.extend(batch.samples)
        if keep_images:
            from utils.pictures import display_crops

            images.append(display_crops(batch.images, dataset.transform.mean, dataset.transform.std))
    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    return ScoredSet(np.concatenate(maps), np.concatenate(scores), np.concatenate(masks), labels, samples,
                     np.concatenate(images) if keep_images else None)
