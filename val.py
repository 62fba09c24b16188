"""Evaluate a fitted PaDiM model on a category's test split.

Writes <save_path>/<category>/scores.csv and metrics.json (the original's ROC-AUCs and F1-max
thresholds, PRO, and the false alarms and defects found at the calibrated threshold), stores the
F1-max thresholds in the model file beside the calibrated ones (--verdicts says which pair the
verdicts use), and with --save_picture draws the 5-panel figure of every test image and the ROC
curves.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import (STATIC_GRAPH_HELP, UsageError, add_backbone_args, add_data_args, add_device_arg,
                       add_verdicts_arg, backbone_name, categories_to_run, new_parser, resolve_data, run_cli, str2bool)


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
    add_verdicts_arg(parser)
    parser.add_argument("--print_freq", type=int, default=2, help="accepted for compatibility; unused")
    parser.add_argument("--seed", type=int, default=None,
                        help="accepted for compatibility: the channel indices come from the model file")
    add_device_arg(parser, STATIC_GRAPH_HELP)
    return parser


def evaluate_all(args) -> dict | None:
    """Every category's metrics (on rank 0 under the launcher; None on the other ranks)."""
    from models import distributed
    from models.pipeline import use_device
    from utils.evaluation import markdown_table, summary_rows, write_summary

    ctx = distributed.context()
    root, _ = resolve_data(args)
    use_device(args.device)
    categories = categories_to_run(root, args.category)
    if args.model_path is not None and len(categories) > 1:
        raise UsageError("--model_path names one model; with --category all each category uses "
                         "<save_path>/<category>/best.pdparams")
    if ctx.is_distributed and len(categories) > 1:
        # under the launcher each rank takes whole categories
        results = distributed.round_robin(
            categories, lambda category: evaluate_one(args, root, category, distributed.SINGLE),
            "evaluating whole categories")
    else:
        results = {category: evaluate_one(args, root, category, ctx) for category in categories}
    if len(categories) > 1 and ctx.rank == 0:
        rows = summary_rows(results)
        csv_path, md_path = write_summary(args.save_path, rows)
        print(markdown_table(rows))
        print(f"summary: {md_path} {csv_path}")
    return results


def evaluate_one(args, root, category, ranks) -> dict | None:
    from models import distributed
    from models.evaluate import evaluate_category
    from utils.logger import close_file_handlers

    model_path = args.model_path or Path(args.save_path) / category / "best.pdparams"
    # One writer per folder, the results' and the model's (val.py stores thresholds in it): rank 0
    # under the launcher.
    with distributed.held_on_rank0(lambda: results_and_model_folders(Path(args.save_path) / category, model_path),
                                   "locking the output folders", ranks):
        metrics = evaluate_category(model_path, root, category, args.save_path, args.batch_size,
                                    args.num_workers, args.save_picture, backbone_name(args), args.seed,
                                    static_graph=args.static_graph, verdicts=args.verdicts, ranks=ranks)
        close_file_handlers()
    return metrics


@contextmanager
def results_and_model_folders(results_dir: Path, model_path):
    from utils.files import exclusive_folder
    with exclusive_folder(results_dir), exclusive_folder(Path(model_path).parent, create=False):
        yield


def main():
    args = build_parser().parse_args()
    from models import distributed
    distributed.init()
    from models.backbones import set_num_threads
    set_num_threads()
    evaluate_all(args)


if __name__ == "__main__":
    run_cli(main)
