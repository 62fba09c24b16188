"""Evaluate a fitted model on a category's test split: what val.py and train.py --val run."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from datasets.mvtec import MVTecDataset, read_rgb
from models.calibration import VERDICT_SOURCES, verdict_metrics
from models.deploy import finite_results, non_finite_error
from models.model_file import ModelFileError, load_model, update_meta
from models.pipeline import build_model, score_dataset
from utils.evaluation import compute_metrics, roc_curves, write_metrics, write_scores_csv
from utils.logger import get_logger


def evaluate_category(model_path, data_root, category, save_path, batch_size=32, num_workers=2,
                      save_picture=True, expected_backbone=None, seed=None, logger: logging.Logger | None = None,
                      static_graph=True, model_id: str | None = None, verdicts: str = "calibrated") -> dict:
    """Score the test split, report the original's lines plus PRO and the verdicts at the
    calibrated threshold (false alarms on good images, defects found), store the F1-max
    thresholds in the model file's calibration record with ``verdicts`` (which pair predict and
    infer use: calibrated or f1_max), only if the file still holds the model evaluated; then
    write scores.csv, metrics.json and, with ``save_picture``, the figures into
    ``<save_path>/<category>/``. ``model_id`` (train.py's own fit): the file must still hold
    that model."""
    if verdicts not in VERDICT_SOURCES:
        raise ValueError(f"verdicts must be one of {', '.join(VERDICT_SOURCES)}, got {verdicts!r}")
    out_dir = Path(save_path) / category
    logger = logger or get_logger(out_dir / "val.log")
    model_file = load_model(model_path, expected_backbone)
    meta = model_file.meta
    if model_id is not None and meta.model_id != model_id:
        raise ModelFileError(f"{model_path} was replaced by another run's model (fitted {meta.created}) before it "
                             f"could be evaluated: not evaluated")
    if seed is not None and seed != meta.seed:
        logger.info(f"note: --seed {seed} ignored; the channel indices in {model_path} were drawn with seed {meta.seed}")
    dataset = MVTecDataset(data_root, category, "test", meta.resize, meta.crop_size)
    print(f"Testing model for {category}")
    logger.info("Starting eval model...")
    model = build_model(model_file)
    scored = score_dataset(model, dataset, batch_size, num_workers, static_graph=static_graph)
    finite = finite_results(scored.maps, scored.scores)
    if not finite.all():
        raise non_finite_error(int((~finite).sum()), len(finite))
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
    if save_picture:
        from tqdm import tqdm

        from utils.visualize import plot_panels, plot_roc
        plot_roc(out_dir / "roc_curve.png", roc_curves(scored.maps, scored.scores, scored.masks, scored.labels, metrics),
                 f"{category} ({meta.backbone})")
        vmin, vmax = meta.display_range()
        for i, sample in enumerate(tqdm(scored.samples, desc=f"| figures | {category} |")):
            image = dataset.transform.to_display(read_rgb(sample.path))
            title = f"{sample.defect_type}/{Path(sample.path).name}  score {scored.scores[i]:.2f}"
            plot_panels(out_dir / f"{category}_{i}.png", image, scored.maps[i], metrics["pixel_threshold"],
                        vmin, vmax, ground_truth=scored.masks[i].astype(np.float32), title=title)
        logger.info(f"Saved {len(scored.samples)} figures and roc_curve.png in {out_dir}")
    return metrics
