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

from datasets.mvtec import IMAGENET_MEAN, IMAGENET_STD, MVTecDataset, iterate_batches
from models.backbones import DEFAULT_D, build_backbone, get_backbone_state, set_backbone_state
from models.export import DEFAULT_OPSET, ExportResult, check_export_request, check_onnx_size, export_model
from models.model_file import ModelFile, ModelFileError, ModelMeta, load_model, read_meta
from models.padim import (DEFAULT_EPS, DEFAULT_SEED, DEFAULT_SIGMA, AnomalyMap, Embedding, GaussianFit, PaDiM,
                          channel_indices, grouped_by_stage, mahalanobis_in_chunks)
from models.static import static_runner_or_none

LOGGER = logging.getLogger("padim")
# Training images whose embeddings are kept to measure the score range of normal images.
STATISTICS_IMAGES = 16


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


def fit_padim(dataset: MVTecDataset, backbone_name: str, weights: str = "imagenet", d: int | None = None,
              seed: int = DEFAULT_SEED, eps: float = DEFAULT_EPS, sigma: float = DEFAULT_SIGMA,
              batch_size: int = 32, num_workers: int = 2, print_freq: int = 2,
              progress: bool = True, static_graph: bool = True) -> tuple[ModelFile, FitReport]:
    """Fit one category's Gaussians; returns the model file contents (not yet written) and timings.
    ``static_graph``: on the CPU, extract the features through Paddle Inference (oneDNN)."""
    from tqdm import tqdm

    seed_everything(seed)
    backbone = build_backbone(backbone_name, weights)
    total_channels = int(sum(backbone.channels))
    d = DEFAULT_D[backbone_name] if d is None else int(d)
    idx = grouped_by_stage(channel_indices(total_channels, d, seed))
    image_size = dataset.transform.crop_size
    grid = feature_grid_of(backbone, image_size)
    embedding = Embedding(backbone.channels, idx)
    extract = embedding_extractor(backbone, embedding, image_size, static_graph)
    gaussian = GaussianFit()
    kept = []
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
        if sum(k.shape[1] for k in kept) < STATISTICS_IMAGES:
            kept.append(np.array(embeddings[:, :STATISTICS_IMAGES - sum(k.shape[1] for k in kept)]))
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
    gaussian_time += time.perf_counter() - tick
    statistics = training_statistics(np.concatenate(kept, axis=1), mean, whitening, grid,
                                     image_size, sigma)
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
        resize=int(dataset.transform.resize),
        crop_size=[int(v) for v in image_size],
        feature_grid=[int(v) for v in grid],
        normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        n_train=int(gaussian.n_),
        train_statistics=statistics,
    )
    arrays = {"idx": idx, "mean": mean, "whitening": whitening}
    report = FitReport(gaussian.n_, time.perf_counter() - started, extraction, gaussian_time, total)
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


def training_statistics(embeddings: np.ndarray, mean: np.ndarray, whitening: np.ndarray, grid, image_size,
                        sigma: float) -> dict:
    """Score range of (some) training images, embeddings [P, B, d]: the fallback threshold and the colour scale."""
    with paddle.no_grad():
        distances = mahalanobis_in_chunks(paddle.to_tensor(embeddings), mean, whitening)
        maps = AnomalyMap(grid, image_size, sigma)(distances).numpy()
    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    return {
        "n_images": int(len(maps)),
        "pixel_median": float(np.median(maps)),
        "pixel_p99": float(np.percentile(maps, 99)),
        "pixel_max": float(maps.max()),
        "image_score_mean": float(image_scores.mean()),
        "image_score_max": float(image_scores.max()),
    }


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
    model = PaDiM(backbone, arrays["idx"], arrays["mean"], arrays["whitening"], tuple(meta.crop_size),
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
                  progress: bool = True, static_graph: bool = True, keep_images: bool = False) -> ScoredSet:
    """Every image of ``dataset`` scored in batches. ``keep_images``: also the uint8 crops the
    batches were normalised from (for figures, without decoding the images again)."""
    from tqdm import tqdm

    score = model_scorer(model, static_graph)
    maps, scores, masks, samples, images = [], [], [], [], []
    total = (len(dataset) + batch_size - 1) // batch_size
    for batch in tqdm(iterate_batches(dataset, batch_size, num_workers), total=total, disable=not progress,
                      desc=f"| feature extraction | {dataset.split} | {dataset.category} |"):
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
