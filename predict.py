"""Predict one image or every image in a folder with a fitted PaDiM model.

Logs each image's score (Mahalanobis units), its verdict against the model's image threshold (or
--threshold) and the size of its region, writes predictions.csv (one row per input image:
path,image_score,threshold,verdict,region_pixels,picture,error) and saves the 4-panel picture of
each image, named after its path below the folder given. The thresholds are the ones the model
file's verdicts use: calibrated at fit time for a target false-alarm rate, or val.py's F1-max
ones (val.py --verdicts f1_max). Every anomalous verdict shows its region. An image that cannot
be read gets an error row and a warning, the others are scored, and the run exits with code 2 at
the end. The colour scale comes from statistics stored in the model file, so pictures of
different images are comparable and a normal image stays blue.
"""
from __future__ import annotations

from pathlib import Path

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import (add_backbone_args, add_device_arg, add_verdict_args, backbone_name, category_arg, new_parser,
                       positive_int, run_cli)


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("--picture_path", default=None,
                        help="an image file or a folder (searched recursively, sorted). Default: the demo "
                             "category's test folder")
    parser.add_argument("--save_path", default="./output",
                        help="pictures go to <save_path>/<category>/predict/; a .png/.jpg path with a single "
                             "image is used as the picture's file name")
    parser.add_argument("--model_path", default=None,
                        help="model file; default <save_path>/<category>/best.pdparams")
    parser.add_argument("--category", type=category_arg, default=None,
                        help="category, used for the default model path and output folder; default 'demo'")
    add_backbone_args(parser, pretrained=False)
    parser.add_argument("--seed", type=int, default=None,
                        help="accepted for compatibility: the channel indices come from the model file")
    add_verdict_args(parser, "the pair the model file's verdicts use (calibrated at fit time, or F1-max after "
                             "val.py --verdicts f1_max)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass")
    parser.add_argument("--num_workers", type=positive_int, default=2, help="decoding threads")
    add_device_arg(parser, "on the CPU, when there is more than one batch of images: trace the model into a Paddle "
                           "Inference graph with oneDNN (a one-off cost), then faster than eager Paddle with the same "
                           "numbers to float32 rounding; False: always eager Paddle")
    return parser


def main():
    args = build_parser().parse_args()
    from datasets.mvtec import ImageList, iterate_batches
    from models.backbones import set_num_threads
    from models.model_file import load_model
    from models.pipeline import build_model, model_scorer, use_device
    from utils.logger import get_logger
    from utils.predictions import PredictionRun, verdict_thresholds

    set_num_threads()
    logger = get_logger()
    if args.picture_path is None:
        from datasets.demo import DEMO_CATEGORY, demo_data_root
        args.picture_path = Path(demo_data_root()) / DEMO_CATEGORY / "test"
    category = args.category or "demo"
    model_path = Path(args.model_path) if args.model_path else Path(args.save_path) / category / "best.pdparams"
    model_file = load_model(model_path, backbone_name(args))
    meta = model_file.meta
    if args.category is None and args.model_path:
        category = meta.category
    if args.seed is not None and args.seed != meta.seed:
        logger.info(f"note: --seed {args.seed} ignored; the channel indices come from {model_path}")
    images = ImageList(args.picture_path, meta.resize, meta.crop_size, with_display=args.save_picture)
    use_device(args.device)
    model = build_model(model_file)
    image_threshold, pixel_threshold, source = verdict_thresholds(meta.decision_thresholds(), args.threshold,
                                                                  args.pixel_threshold)
    logger.info(f"model {model_path} ({meta.backbone}, {meta.category}); image threshold {image_threshold:.4f}, "
                f"pixel threshold {pixel_threshold:.4f} from {source}")
    scorer = model_scorer(model, args.static_graph and len(images) > args.batch_size)
    with PredictionRun(images, args.save_path, category, "predict", image_threshold, pixel_threshold,
                       meta.display_range(pixel_threshold), "Predict", logger, args.save_picture) as run:
        for batch in iterate_batches(images, args.batch_size, args.num_workers, skip_errors=True):
            maps, scores = scorer(batch.images) if batch.samples else (None, None)
            run.add(batch, maps, scores)
        run.finish()


if __name__ == "__main__":
    run_cli(main)
