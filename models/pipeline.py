"""Glue between data, backbone and the PaDiM maths: fit over a dataset, build the model from a
model file, score a dataset, export a model file."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
from tqdm import tqdm

from datasets.mvtec import IMAGENET_MEAN, IMAGENET_STD, MVTecDataset, iterate_batches
from models.backbones import DEFAULT_D, build_backbone, get_backbone_state, set_backbone_state
from models.calibration import (DEFAULT_FALSE_ALARM_RATE, Calibration, calibrate, calibration_images, images_needed,
                                leave_one_out_distances)
from models.export import DEFAULT_OPSET, ExportResult, check_export_request, check_onnx_size, export_model
from models.model_file import ModelFile, ModelFileError, ModelMeta, load_model, read_meta
from models.padim import (DEFAULT_EPS, DEFAULT_SEED, DEFAULT_SIGMA, AnomalyMap, Embedding, GaussianFit, PaDiM,
                          channel_indices, grouped_by_stage, mahalanobis_on_host)
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


class CalibrationSample:
    """The embeddings of the training images that calibrate the model (those of ``n_images``
    that models.calibration.calibration_images picks), kept as the fit's batches pass:
    ``blocks``, [P, b, d] float32 arrays, each a batch's own host array when all its images are
    kept (no copy), else a copy of the kept ones."""

    def __init__(self, n_images: int, positions: int, d: int, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE):
        self._chosen = np.zeros(int(n_images), dtype=bool)
        self._chosen[calibration_images(n_images, positions * d * 4, false_alarm_rate)] = True
        self.blocks: list[np.ndarray] = []

    def add(self, embeddings, image_indices) -> None:
        """Keep the chosen images of a batch: ``embeddings`` [P, B, d] (NumPy or Paddle) of the
        dataset's images ``image_indices`` [B]."""
        keep = np.flatnonzero(self._chosen[np.asarray(image_indices, dtype=np.int64)])
        if keep.size:
            host = embeddings if isinstance(embeddings, np.ndarray) else embeddings.numpy()
            self.blocks.append(host if keep.size == host.shape[1] else host[:, keep])


def calibrate_from_embeddings(blocks, mean: np.ndarray, whitening: np.ndarray, n_train: int, feature_grid,
                              image_size, sigma: float = DEFAULT_SIGMA,
                              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                              batch_size: int = 32) -> tuple[Calibration, dict]:
    """The verdict thresholds of a fitted model from ``blocks``, embeddings [P, b, d] of some of
    its ``n_train`` training images (CalibrationSample.blocks): their distances under the model
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
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> tuple[ModelFile, FitReport]:
    """Fit one category's Gaussians and calibrate the verdict thresholds for ``false_alarm_rate``
    (calibrate_from_embeddings); returns the model file contents (not yet written) and timings.
    ``static_graph``: on the CPU, extract the features through Paddle Inference (oneDNN)."""
    seed_everything(seed)
    backbone = build_backbone(backbone_name, weights)
    total_channels = int(sum(backbone.channels))
    d = DEFAULT_D[backbone_name] if d is None else int(d)
    idx = grouped_by_stage(channel_indices(total_channels, d, seed))
    image_size = dataset.transform.image_size
    grid = feature_grid_of(backbone, image_size)
    embedding = Embedding(backbone.channels, idx)
    extract = embedding_extractor(backbone, embedding, image_size, static_graph)
    gaussian = GaussianFit()
    kept = CalibrationSample(len(dataset), grid[0] * grid[1], d, false_alarm_rate)
    started = time.perf_counter()
    extraction = gaussian_time = 0.0
    batches = iterate_batches(dataset, batch_size, num_workers)
    total = (len(dataset) + batch_size - 1) // batch_size
    data_started = time.perf_counter()
    for step, batch in enumerate(tqdm(batches, total=total, disable=not progress,
                                      desc=f"| feature extraction | train | {dataset.category} |")):
        data_time = time.perf_counter() - data_started
        tick = time.perf_counter()
        embeddings = extract(batch.images)
        tock = time.perf_counter()
        gaussian.update(embeddings)
        kept.add(embeddings, np.arange(step * batch_size, step * batch_size + len(batch.samples)))
        done = time.perf_counter()
        extraction += tock - tick
        gaussian_time += done - tock
        if print_freq and step % print_freq == 0:
            LOGGER.info(f"Epoch 0[{step + 1}/{total}]: batch time:{done - tick:.4f}, data time:{data_time:.4f}")
        # freed before the next forward pass, so Paddle's allocator can reuse the memory
        del embeddings, batch
        data_started = time.perf_counter()
    tick = time.perf_counter()
    mean, whitening = gaussian.finalize(eps)
    tock = time.perf_counter()
    gaussian_time += tock - tick
    calibration, statistics = calibrate_from_embeddings(kept.blocks, mean, whitening, gaussian.n_, grid,
                                                        image_size, sigma, false_alarm_rate)
    del kept
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
    report = FitReport(gaussian.n_, time.perf_counter() - started, extraction, gaussian_time, total, calibration_time)
    return ModelFile(None, meta, arrays, get_backbone_state(backbone)), report


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
    backbone = build_backbone(meta.backbone, "random")
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
                  progress: bool = True, static_graph: bool = True) -> ScoredSet:
    score = model_scorer(model, static_graph)
    maps, scores, masks, samples = [], [], [], []
    total = (len(dataset) + batch_size - 1) // batch_size
    for batch in tqdm(iterate_batches(dataset, batch_size, num_workers), total=total, disable=not progress,
                      desc=f"| feature extraction | {dataset.split} | {dataset.category} |"):
        anomaly_map, image_score = score(batch.images)
        maps.append(anomaly_map)
        scores.append(image_score)
        masks.append(batch.masks)
        samples.extend(batch.samples)
    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    return ScoredSet(np.concatenate(maps), np.concatenate(scores), np.concatenate(masks), labels, samples)
