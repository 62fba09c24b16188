"""Evaluate a fitted PaDiM model on a category's test split.

Writes <save_path>/<category>/scores.csv and metrics.json, stores the F1-max thresholds in the
model file, and with --save_picture draws the 5-panel figure of every test image and the ROC curves.
"""
from __future__ import annotations

import time
from pathlib import Path

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import (STATIC_GRAPH_HELP, UsageError, add_backbone_args, add_data_args, add_device_arg, backbone_name,
                       categories_to_run, new_parser, resolve_data, run_cli, str2bool)


def build_parser():
    parser = new_parser(__doc__)
    add_data_args(parser)
    parser.add_argument("--save_path", default="./output",
                        help="output root: results go to <save_path>/<category>/")
    parser.add_argument("--model_path", default=None,
                        help="model file; default <save_path>/<category>/best.pdparams")
    add_backbone_args(parser, pretrained=False)
    parser.add_argument("--save_picture", type=str2bool, default=True,
                        help="save the 5-panel figure of every test image and roc_curve.png")
    parser.add_argument("--print_freq", type=int, default=2, help="accepted for compatibility; unused")
    parser.add_argument("--seed", type=int, default=None,
                        help="accepted for compatibility: the channel indices come from the model file")
    add_device_arg(parser, STATIC_GRAPH_HELP)
    return parser


def evaluate_category(model_path, data_root, category, save_path, batch_size=32, num_workers=2,
                      save_picture=True, expected_backbone=None, seed=None, logger=None, static_graph=True) -> dict:
    """Score the test split, report the original's lines plus PRO, write the result files."""
    import numpy as np

    from datasets.mvtec import MVTecDataset, read_rgb
    from models.model_file import load_model, update_meta
    from models.pipeline import build_model, display_range, score_dataset
    from utils.evaluation import compute_metrics, roc_curves, write_metrics, write_scores_csv
    from utils.logger import get_logger

    out_dir = Path(save_path) / category
    logger = logger or get_logger(out_dir / "val.log")
    model_file = load_model(model_path, expected_backbone)
    meta = model_file.meta
    if seed is not None and seed != meta["seed"]:
        logger.info(f"note: --seed {seed} ignored; the channel indices in {model_path} were drawn with seed {meta['seed']}")
    dataset = MVTecDataset(data_root, category, "test", meta["resize"], meta["crop_size"])
    print(f"Testing model for {category}")
    logger.info("Starting eval model...")
    model = build_model(model_file)
    scored = score_dataset(model, dataset, batch_size, num_workers, static_graph=static_graph)
    metrics = compute_metrics(scored.maps, scored.scores, scored.masks, scored.labels)
    metrics.update(category=category, backbone=meta["backbone"], model_path=str(model_path),
                   data_path=str(Path(data_root) / category), weights_source=meta["weights_source"])
    logger.info(f"Class:{category}:\tImage AUC: {metrics['image_auroc']:.3f}")
    logger.info(f"Class:{category}:\tPixel AUC: {metrics['pixel_auroc']:.3f}")
    logger.info(f"Class:{category}:\tPRO AUC (FPR<=0.3): {metrics['pro_auc']:.3f}")
    logger.info(f"Class:{category}:\timage threshold {metrics['image_threshold']:.4f} (F1 {metrics['image_f1']:.3f}), "
                f"pixel threshold {metrics['pixel_threshold']:.4f} (F1 {metrics['pixel_f1']:.3f})")
    write_scores_csv(out_dir / "scores.csv", scored.samples, scored.scores)
    write_metrics(out_dir / "metrics.json", metrics)
    meta["thresholds"] = {
        "image_threshold": metrics["image_threshold"],
        "pixel_threshold": metrics["pixel_threshold"],
        "source": f"F1-max on the test split of {Path(data_root) / category} ({metrics['n_test']} images), "
                  f"val.py {time.strftime('%Y-%m-%d %H:%M:%S')}",
    }
    update_meta(model_path, meta)
    logger.info(f"Thresholds stored in {model_path}; results in {out_dir}")
    if save_picture:
        from tqdm import tqdm

        from utils.visualize import plot_panels, plot_roc
        plot_roc(out_dir / "roc_curve.png", roc_curves(scored.maps, scored.scores, scored.masks, scored.labels, metrics),
                 f"{category} ({meta['backbone']})")
        vmin, vmax = display_range(meta)
        for i, sample in enumerate(tqdm(scored.samples, desc=f"| figures | {category} |")):
            image = dataset.transform.to_display(read_rgb(sample.path))
            title = f"{sample.defect_type}/{Path(sample.path).name}  score {scored.scores[i]:.2f}"
            plot_panels(out_dir / f"{category}_{i}.png", image, scored.maps[i], metrics["pixel_threshold"],
                        vmin, vmax, ground_truth=scored.masks[i].astype(np.float32), title=title)
        logger.info(f"Saved {len(scored.samples)} figures and roc_curve.png in {out_dir}")
    return metrics


def evaluate_all(args, logger_factory=None) -> dict:
    from models.pipeline import use_device
    from utils.evaluation import markdown_table, summary_rows, write_summary
    from utils.files import exclusive_folder
    from utils.logger import close_file_handlers

    root, _ = resolve_data(args)
    use_device(args.device)
    categories = categories_to_run(root, args.category)
    if args.model_path is not None and len(categories) > 1:
        raise UsageError("--model_path names one model; with --category all each category uses "
                         "<save_path>/<category>/best.pdparams")
    results = {}
    for category in categories:
        model_path = args.model_path or Path(args.save_path) / category / "best.pdparams"
        # One writer per folder: the results' and the model's (val.py stores thresholds in it).
        with exclusive_folder(Path(args.save_path) / category), exclusive_folder(Path(model_path).parent, create=False):
            results[category] = evaluate_category(model_path, root, category, args.save_path, args.batch_size,
                                                  args.num_workers, args.save_picture, backbone_name(args), args.seed,
                                                  static_graph=args.static_graph)
            close_file_handlers()
    if len(categories) > 1:
        rows = summary_rows(results)
        csv_path, md_path = write_summary(args.save_path, rows)
        print(markdown_table(rows))
        print(f"summary: {md_path} {csv_path}")
    return results


def main():
    args = build_parser().parse_args()
    from models.backbones import set_num_threads
    set_num_threads()
    evaluate_all(args)


if __name__ == "__main__":
    run_cli(main)
