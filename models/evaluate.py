"""Evaluate a fitted model on a category's test split: what val.py and train.py --val run."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from datasets.mvtec import MVTecDataset
from models.calibration import VERDICT_SOURCES, verdict_metrics
from models.deploy import finite_results, non_finite_error
from models.model_file import ModelFileError, load_model, update_meta
from models import distributed
from models.pipeline import ScoredSet, build_model, dataset_shard, score_dataset
from utils.evaluation import compute_metrics, roc_curves, write_metrics, write_scores_csv
from utils.logger import get_logger
from utils.numbers import available_cpus
from utils.files import OutputError
from utils.pictures import PictureError, PictureWriter


def evaluate_category(model_path, data_root, category, save_path, batch_size=32, num_workers=2,
                      save_picture=True, expected_backbone=None, seed=None, logger: logging.Logger | None = None,
                      static_graph=True, model_id: str | None = None, verdicts: str = "calibrated",
                      ranks: distributed.Context | None = None) -> dict | None:
    """Score the test split, report the original's lines plus PRO and the verdicts at the
    calibrated threshold (false alarms on good images, defects found), store the F1-max
    thresholds in the model file's calibration record with ``verdicts`` (which pair predict and
    infer use: calibrated or f1_max), only if the file still holds the model evaluated; then
    write scores.csv, metrics.json and, with ``save_picture``, the figures into
    ``<save_path>/<category>/``. ``model_id`` (train.py's own fit): the file must still hold
    that model.

    The figures are drawn by worker processes (utils.pictures.PictureWriter), started here so
    that their start-up overlaps the scoring, from the crops the scoring kept; the ROC plot is
    drawn in this process meanwhile.

    Under paddle.distributed.launch (``ranks`` None: read from the launcher's environment;
    ``distributed.SINGLE``: this process evaluates the whole category alone) each rank scores its
    shard of the test split, rank 0 computes the metrics from all images and writes the results
    (as one process would) and returns the metrics, and each rank draws its own images' figures;
    the other ranks return None."""
    if verdicts not in VERDICT_SOURCES:
        raise ValueError(f"verdicts must be one of {', '.join(VERDICT_SOURCES)}, got {verdicts!r}")
    ranks = distributed.context() if ranks is None else ranks
    out_dir = Path(save_path) / category
    logger = logger or get_logger(out_dir / "val.log" if ranks.rank == 0 else None)
    model_file = load_model(model_path, expected_backbone)
    meta = model_file.meta
    if model_id is not None and meta.model_id != model_id:
        raise ModelFileError(f"{model_path} was replaced by another run's model (fitted {meta.created}) before it "
                             f"could be evaluated: not evaluated")
    if seed is not None and seed != meta.seed:
        logger.info(f"note: --seed {seed} ignored; the channel indices in {model_path} were drawn with seed {meta.seed}")
    dataset = MVTecDataset(data_root, category, "test", meta.resize, meta.crop_size)
    # Started once the inputs are checked, so that their start-up overlaps the scoring. One
    # worker per CPU this process may use (available_cpus shares a machine's CPUs among its
    # ranks): by the time figures are drawn, the scoring is over.
    with (PictureWriter(workers=available_cpus()) if save_picture else contextlib.nullcontext()) as pictures:
        return _score_and_report(model_file, dataset, model_path, data_root, category, out_dir, batch_size,
                                 num_workers, pictures, logger, static_graph, verdicts, ranks)


def _score_and_report(model_file, dataset: MVTecDataset, model_path, data_root, category, out_dir: Path,
                      batch_size, num_workers, pictures: PictureWriter | None, logger, static_graph, verdicts,
                      ranks) -> dict | None:
    meta = model_file.meta
    print(f"Testing model for {category}")
    logger.info("Starting eval model...")
    model = build_model(model_file)
    scored, indices = score_test_split(model, dataset, ranks, batch_size, num_workers, static_graph,
                                       keep_images=pictures is not None)
    everything = gathered_on_rank0(scored, dataset, ranks)
    metrics = distributed.finalize_on_rank0(
        lambda: write_results(everything, meta, model_path, data_root, category, out_dir, logger, verdicts),
        "writing the results", ranks=ranks)
    if pictures is not None:
        # the figures share rank 0's pixel threshold and colour scale
        shown = np.array([metrics["pixel_threshold"], *meta.display_range()]) if ranks.rank == 0 else None
        if ranks.is_distributed:
            shown = distributed.broadcast_from_rank0(shown)
        with distributed.step("drawing the figures", ranks=ranks) as peers:
            submit_figures(pictures, out_dir, category, scored, indices, *shown)
            if ranks.rank == 0:
                from utils.visualize import plot_roc
                plot_roc(out_dir / "roc_curve.png",
                         roc_curves(everything.maps, everything.scores, everything.masks, everything.labels, metrics),
                         f"{category} ({meta.backbone})")
            peers.check()
            try:
                pictures.close(progress=f"| figures | {category} |")
            except PictureError as exc:   # a full disk, a folder made read-only: one line, exit code 2
                raise OutputError(f"{exc}; the metrics and scores in {out_dir} were written") from None
        if ranks.rank == 0:
            logger.info(f"Saved {len(dataset)} figures and roc_curve.png in {out_dir}")
    return metrics


def write_results(scored: ScoredSet, meta, model_path, data_root, category, out_dir: Path,
                  logger: logging.Logger, verdicts: str = "calibrated") -> dict:
    """Metrics of the whole test split, logged; the F1-max thresholds stored in the model file's
    calibration record with ``verdicts`` (``meta`` updated), scores.csv and metrics.json written.
    Returns the metrics."""
    metrics = compute_metrics(scored.maps, scored.scores, scored.masks, scored.labels)
    metrics.update(category=category, backbone=meta.backbone, model_path=str(model_path),
                   data_path=str(Path(data_root) / category), weights_source=meta.weights_source)
    logger.info(f"Class:{category}:\tImage AUC: {metrics['image_auroc']:.3f}")
    logger.info(f"Class:{category}:\tPixel AUC: {metrics['pixel_auroc']:.3f}")
    logger.info(f"Class:{category}:\tPRO AUC (FPR<=0.3): {metrics['pro_auc']:.3f}")
    logger.info(f"Class:{category}:\timage threshold {metrics['image_threshold']:.4f} (F1 {metrics['image_f1']:.3f}), "
                f"pixel threshold {metrics['pixel_threshold']:.4f} (F1 {metrics['pixel_f1']:.3f})")
    calibration = meta.calibration
    metrics["calibrated"] = dict(verdict_metrics(scored.scores, scored.labels, calibration.image_threshold),
                                 target_false_alarm_rate=calibration.false_alarm_rate,
                                 guaranteed_false_alarm_rate=calibration.guaranteed_rate,
                                 n_calibration=calibration.n_calibration, source=calibration.source)
    metrics["f1_max"] = verdict_metrics(scored.scores, scored.labels, metrics["image_threshold"])
    for name, counts in (("calibrated", metrics["calibrated"]), ("F1-max", metrics["f1_max"])):
        logger.info(f"Class:{category}:\t{name} image threshold {counts['threshold']:.4f}: false alarms "
                    f"{counts['false_alarms']}/{counts['normal_images']} good images, defects found "
                    f"{counts['defects_found']}/{counts['defective_images']}")
    meta.calibration = replace(calibration, verdicts=verdicts, f1_image_threshold=metrics["image_threshold"],
                               f1_pixel_threshold=metrics["pixel_threshold"])
    metrics["verdicts"] = verdicts
    logger.info(f"Verdicts use the {'calibrated' if verdicts == 'calibrated' else 'F1-max'} thresholds "
                f"(--verdicts {verdicts})")
    # First: when the file now holds another model, nothing of this evaluation is written.
    update_meta(model_path, meta)
    write_scores_csv(out_dir / "scores.csv", scored.samples, scored.scores)
    write_metrics(out_dir / "metrics.json", metrics)
    logger.info(f"Thresholds stored in {model_path}; results in {out_dir}")
    return metrics


def submit_figures(pictures: PictureWriter, out_dir: Path, category: str, scored: ScoredSet, indices,
                   pixel_threshold: float, vmin: float, vmax: float) -> None:
    """Queue the figure ``<category>_<i>.png`` of each scored image (``scored.images``, the crops
    kept by the scoring), ``i`` its index in the test split (``indices``)."""
    pictures.max_pending = max(pictures.max_pending, len(scored.samples))   # every figure queued at once
    for position, (i, sample) in enumerate(zip(indices, scored.samples)):
        title = f"{sample.defect_type}/{Path(sample.path).name}  score {scored.scores[position]:.2f}"
        pictures.submit(out_dir / f"{category}_{i}.png", scored.images[position], scored.maps[position],
                        pixel_threshold, vmin, vmax, ground_truth=scored.masks[position], title=title)


# ---- data parallelism

def score_test_split(model, dataset: MVTecDataset, ranks: distributed.Context, batch_size: int, num_workers: int,
                     static_graph: bool, keep_images: bool = False) -> tuple[ScoredSet, list[int]]:
    """(this rank's scored images, their indices in the test split): its shard when ``ranks`` is
    distributed (``dataset_shard``), else all; ``keep_images`` as score_dataset. Every rank waits
    for the others at the end (a step), and stops early when one fails."""
    shard, indices = dataset_shard(dataset, ranks, "test images")
    with distributed.step("scoring", ranks=ranks) as peers:
        scored = score_dataset(model, shard, batch_size, num_workers, static_graph=static_graph,
                               keep_images=keep_images, check=peers.check)
        finite = finite_results(scored.maps, scored.scores)
        if not finite.all():
            raise non_finite_error(int((~finite).sum()), len(finite))
    return scored, indices


def gathered_on_rank0(scored: ScoredSet, dataset: MVTecDataset, ranks: distributed.Context) -> ScoredSet | None:
    """Every rank's scored images, in the test split's order, on rank 0 (None on the others):
    ``scored`` itself when not distributed. Call it on every rank right after ``score_test_split``."""
    if not ranks.is_distributed:
        return scored
    arrays = distributed.gather_to_rank0({"maps": scored.maps, "scores": scored.scores, "masks": scored.masks,
                                          "labels": scored.labels}, len(dataset))
    if arrays is None:
        return None
    return ScoredSet(arrays["maps"], arrays["scores"], arrays["masks"], arrays["labels"], list(dataset.samples))
