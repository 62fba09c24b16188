"""Predict one image or every image in a folder with a fitted PaDiM model.

Prints each image's score (Mahalanobis units) and its verdict against the stored image threshold
(or --threshold), and saves the 4-panel picture. The colour scale comes from statistics stored in
the model file, so pictures of different images are comparable and a normal image stays blue.
"""
from __future__ import annotations

from pathlib import Path

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import add_backbone_args, add_device_arg, add_verdict_args, backbone_name, category_arg, new_parser, positive_int, run_cli

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
    add_verdict_args(parser, "the one val.py stored in the model file (the training maximum if val.py never ran)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass")
    parser.add_argument("--num_workers", type=positive_int, default=2, help="decoding threads")
    add_device_arg(parser, "on the CPU, when there is more than one batch of images: trace the model into a Paddle "
                           "Inference graph with oneDNN (about half a second, once), then ~5x faster than eager "
                           "Paddle, same numbers to ~1e-5; False: always eager Paddle")
    return parser


def main():
    args = build_parser().parse_args()
    from datasets.mvtec import ImageList, iterate_batches, read_rgb
    from models.backbones import set_num_threads
    from models.deploy import finite_results, non_finite_error
    from models.model_file import load_model
    from models.pipeline import build_model, model_scorer, use_device
    from utils.logger import get_logger
    from utils.visualize import picture_file, report_prediction

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
    images = ImageList(args.picture_path, meta.resize, meta.crop_size)
    use_device(args.device)
    model = build_model(model_file)
    stored = meta.decision_thresholds()
    image_threshold = stored["image_threshold"] if args.threshold is None else args.threshold
    pixel_threshold = stored["pixel_threshold"] if args.pixel_threshold is None else args.pixel_threshold
    vmin, vmax = meta.display_range(pixel_threshold)
    source = "--threshold" if args.threshold is not None else stored["source"]
    logger.info(f"model {model_path} ({meta.backbone}, {meta.category}); image threshold "
                f"{image_threshold:.4f} from {source}")
    single = len(images) == 1
    anomalous = failed = 0
    scorer = model_scorer(model, args.static_graph and len(images) > args.batch_size)
    for batch in iterate_batches(images, args.batch_size, args.num_workers):
        maps, scores = scorer(batch.images)
        for sample, anomaly_map, score, finite in zip(batch.samples, maps, scores, finite_results(maps, scores)):
            if not finite:
                failed += 1
                logger.error(f"Predict : {sample.path}  error: NaN or infinite score or map ({score}): no verdict")
                continue
            picture = display_image = None
            if args.save_picture:
                picture = picture_file(args.save_path, category, sample.path, images.root, single, "predict")
                display_image = images.transform.to_display(read_rgb(sample.path))
            anomalous += report_prediction(logger, "Predict", sample.path, anomaly_map, score, image_threshold,
                                           pixel_threshold, (vmin, vmax), picture, display_image)
    logger.info(f"Predict done: {len(images)} image(s), {anomalous} anomalous"
                + (f", {failed} without a verdict" if failed else ""))
    if failed:
        raise non_finite_error(failed, len(images))


if __name__ == "__main__":
    run_cli(main)
