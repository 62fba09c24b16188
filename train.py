"""Fit PaDiM for one MVTec category (or all) from its normal training images.

Writes <save_path>/<category>/best.pdparams (self-contained model file, with verdict thresholds
calibrated on the training images for --false_alarm_rate) and train.log, then with --val=True
evaluates exactly as val.py does.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from models.calibration import DEFAULT_FALSE_ALARM_RATE
from utils.cli import (STATIC_GRAPH_HELP, UsageError, add_backbone_args, add_data_args, add_device_arg,
                       add_geometry_args, add_verdicts_arg, backbone_name, categories_to_run, new_parser,
                       non_negative_int, positive_int, rate_arg, resolve_data, run_cli, str2bool, weights_choice)


def build_parser():
    parser = new_parser(__doc__)
    add_data_args(parser)
    parser.add_argument("--save_path", default="./output",
                        help="output root: the model goes to <save_path>/<category>/best.pdparams")
    add_backbone_args(parser, pretrained=True)
    parser.add_argument("--d_reduced", type=positive_int, default=None,
                        help="number of randomly selected channels d; default 100 (550 for resnet50 "
                             "and wide_resnet50_2), as in the paper")
    add_geometry_args(parser)
    parser.add_argument("--false_alarm_rate", type=rate_arg, default=DEFAULT_FALSE_ALARM_RATE,
                        help="target share of normal images called anomalous: the image threshold is the "
                             "conformal quantile of the training images' leave-one-out scores (each scored by the "
                             "model of the others). N training images can guarantee no less than 1/(N+1); below "
                             "that the largest score is used, and the log says so")
    parser.add_argument("--save_picture", type=str2bool, default=True,
                        help="with --val: save the figure of every test image and roc_curve.png")
    parser.add_argument("--val", type=str2bool, default=True,
                        help="evaluate on the test split right after fitting (as val.py)")
    add_verdicts_arg(parser)
    parser.add_argument("--print_freq", type=non_negative_int, default=2,
                        help="log a line every N batches (0: never)")
    parser.add_argument("--seed", type=int, default=7,
                        help="seeds Python's random (draws the channel indices) and Paddle")
    add_device_arg(parser, STATIC_GRAPH_HELP)
    return parser


def main():
    args = build_parser().parse_args()
    from models import distributed
    ctx = distributed.init()
    from models.backbones import set_num_threads
    from models.pipeline import use_device

    if args.verdicts == "f1_max" and not args.val:
        raise UsageError("--verdicts f1_max needs --val=True: the F1-max thresholds come from the test split")
    set_num_threads()
    root, _ = resolve_data(args)
    use_device(args.device)
    name, weights = backbone_name(args), weights_choice(args)
    categories = categories_to_run(root, args.category)
    if ctx.is_distributed and len(categories) > 1:
        # under the launcher each rank takes whole categories
        results = distributed.round_robin(
            categories, lambda category: train_category(args, root, category, name, weights, distributed.SINGLE),
            "fitting whole categories")
    else:
        results = {category: train_category(args, root, category, name, weights, ctx) for category in categories}
    if args.val and len(categories) > 1 and ctx.rank == 0:
        from utils.evaluation import markdown_table, summary_rows, write_summary
        rows = summary_rows(results)
        write_summary(args.save_path, rows)
        print(markdown_table(rows))


def train_category(args, root, category, name, weights, ranks) -> dict | None:
    """Fit, write and (--val) evaluate one category. Under the launcher (``ranks`` distributed)
    every rank takes its shard of the images and rank 0 alone holds the folder and writes;
    returns the metrics on rank 0 (None without --val, and on the other ranks)."""
    from datasets.mvtec import MVTecDataset
    from models import distributed
    from models.pipeline import fit_padim
    from utils.files import exclusive_folder
    from utils.logger import close_file_handlers, get_logger

    out_dir = Path(args.save_path) / category
    train_set = MVTecDataset(root, category, "train", args.resize, args.crop_size)
    if args.val:
        MVTecDataset(root, category, "test", args.resize, args.crop_size)  # fail before fitting
    # one writer per model folder, from the fit to the last result file
    with distributed.held_on_rank0(lambda: exclusive_folder(out_dir), "locking the output folder", ranks):
        logger = get_logger(out_dir / "train.log" if ranks.rank == 0 else None)
        print(f"Training model for {category}")
        logger.info(f"backbone {name}, weights {weights}, {len(train_set)} training images under {root / category}")
        model_file, report = fit_padim(train_set, name, weights, args.d_reduced, args.seed,
                                       batch_size=args.batch_size, num_workers=args.num_workers,
                                       print_freq=args.print_freq, static_graph=args.static_graph,
                                       false_alarm_rate=args.false_alarm_rate, ranks=ranks)
        logger.info(f"Train ends, total {report.seconds:.2f}s (features {report.extraction_seconds:.2f}s, "
                    f"Gaussian {report.gaussian_seconds:.2f}s, {report.n_images} images)")
        model_path = out_dir / "best.pdparams"
        model_id = distributed.finalize_on_rank0(partial(write_model, model_file, report, model_path, category, logger),
                                                 "writing the model", ranks=ranks)
        del model_file
        metrics = None
        if args.val:
            from models.evaluate import evaluate_category
            metrics = evaluate_category(model_path, root, category, args.save_path, args.batch_size,
                                        args.num_workers, args.save_picture, logger=logger,
                                        static_graph=args.static_graph, model_id=model_id, verdicts=args.verdicts,
                                        ranks=ranks)
        close_file_handlers()
    return metrics


def write_model(model_file, report, model_path: Path, category: str, logger) -> str:
    """Log the calibration, remove the previous model's results, write the model file
    atomically; returns its id."""
    from models.model_file import save_model
    from models.pipeline import calibration_note
    from utils.files import remove_previous_results

    calibration = model_file.meta.calibration
    logger.info(f"Calibration {report.calibration_seconds:.2f}s (within the total): image threshold "
                f"{calibration.image_threshold:.4f}, pixel threshold {calibration.pixel_threshold:.4f}, "
                f"{calibration.source}")
    note = calibration_note(calibration)
    if note:
        logger.info(note)
    logger.info("Saving model...")
    removed = remove_previous_results(model_path.parent, category)
    if removed:
        logger.info(f"Removed {len(removed)} result files of the previous model from {model_path.parent}")
    save_model(model_path, model_file.meta, model_file.arrays, model_file.backbone_state)
    logger.info(f"Save model in {model_path}")
    return model_file.meta.model_id


if __name__ == "__main__":
    # glibc's defaults: with large freed buffers kept (utils/memory.py, as val.py and the deploy
    # scripts do) Paddle Inference's allocations grew the heap over the fit's first batches, so
    # peak RSS followed the number of training images
    # (logs/benchmark_demo_resnet18_fit_malloc_kept.log)
    run_cli(main, keep_buffers=False)
