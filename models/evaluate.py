"""Evaluate a fitted model on a category's test split: what val.py and train.py --val run."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from datasets.mvtec import MVTecDataset
from models.deploy import finite_results, non_finite_error
from models.model_file import ModelFileError, load_model, update_meta
from models.pipeline import build_model, score_dataset
from utils.evaluation import compute_metrics, roc_curves, write_metrics, write_scores_csv
from utils.logger import get_logger
from utils.numbers import available_cpus
from utils.pictures import PictureWriter


def evaluate_category(model_path, data_root, category, save_path, batch_size=32, num_workers=2,
                      save_picture=True, expected_backbone=None, seed=None, logger: logging.Logger | None = None,
                      static_graph=True, model_id: str | None = None) -> dict:
    """Score the test split, report the original's lines plus PRO, store the F1-max thresholds
    in the model file (only if it still holds the model evaluated), then write scores.csv,
    metrics.json and, with ``save_picture``, the figures into ``<save_path>/<category>/``.
    ``model_id`` (train.py's own fit): the file must still hold that model.

    The figures are drawn by worker processes (utils.pictures.PictureWriter), started here so
    that their start-up overlaps the scoring, from the crops the scoring kept; the ROC plot is
    drawn in this process meanwhile."""
    # One worker per CPU: by the time figures are drawn, this process only writes files and the ROC plot.
    with (PictureWriter(workers=available_cpus()) if save_picture else contextlib.nullcontext()) as pictures:
        return _evaluate(model_path, data_root, category, save_path, batch_size, num_workers, pictures,
                         expected_backbone, seed, logger, static_graph, model_id)


def _evaluate(model_path, data_root, category, save_path, batch_size, num_workers, pictures: PictureWriter | None,
              expected_backbone, seed, logger, static_graph, model_id) -> dict:
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
    scored = score_dataset(model, dataset, batch_size, num_workers, static_graph=static_graph,
                           keep_images=pictures is not None)
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
    meta.thresholds = {
        "image_threshold": metrics["image_threshold"],
        "pixel_threshold": metrics["pixel_threshold"],
        "source": f"F1-max on the test split of {Path(data_root) / category} ({metrics['n_test']} images), "
                  f"val.py {time.strftime('%Y-%m-%d %H:%M:%S')}",
    }
    # First: when the file now holds another model, nothing of this evaluation is written.
    update_meta(model_path, meta)
    write_scores_csv(out_dir / "scores.csv", scored.samples, scored.scores)
    write_metrics(out_dir / "metrics.json", metrics)
    logger.info(f"Thresholds stored in {model_path}; results in {out_dir}")
    if pictures is not None:
        from utils.visualize import plot_roc

        vmin, vmax = meta.display_range()
        pictures.max_pending = max(pictures.max_pending, len(scored.samples))   # every figure queued at once
        for i, sample in enumerate(scored.samples):
            title = f"{sample.defect_type}/{Path(sample.path).name}  score {scored.scores[i]:.2f}"
            pictures.submit(out_dir / f"{category}_{i}.png", scored.images[i], scored.maps[i],
                            metrics["pixel_threshold"], vmin, vmax, ground_truth=scored.masks[i], title=title)
        plot_roc(out_dir / "roc_curve.png", roc_curves(scored.maps, scored.scores, scored.masks, scored.labels, metrics),
                 f"{category} ({meta.backbone})")
        pictures.close()
        logger.info(f"Saved {len(scored.samples)} figures and roc_curve.png in {out_dir}")
    return metrics
