"""Export a fitted PaDiM model file to one static graph for Paddle Inference (and optionally ONNX).

The graph takes a float32 batch [N,3,H,W], preprocessed as in training, and returns the anomaly
map [N,H,W] in Mahalanobis units and the image scores [N]; the backbone, channel indices, Gaussian
and smoothing are all inside it. Writes <save_dir>/model.json + model.pdiparams (Paddle 3's PIR
format), model.meta.json (preprocessing, thresholds, colour scale, names: all infer.py needs) and,
with --onnx=True, model.onnx.
"""
from __future__ import annotations

import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import add_backbone_args, new_parser, backbone_name, run_cli, size_arg, str2bool

DEFAULT_MODEL_PATH = "./output/demo/best.pdparams"


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("--model_path", default=DEFAULT_MODEL_PATH,
                        help="model file written by train.py; its verdict thresholds (calibrated, or F1-max after "
                             "val.py --verdicts f1_max) and image geometry are exported with it")
    parser.add_argument("--save_dir", default="./output",
                        help="output folder, created if missing; the files are written to a temp folder "
                             "inside it and moved into place when complete")
    parser.add_argument("--img_size", type=size_arg, default=None,
                        help="input size, N or HxW; must equal the model file's input size (the Gaussian is per "
                             "position). Default: the model's")
    add_backbone_args(parser, pretrained=False)
    parser.add_argument("--onnx", type=str2bool, default=False,
                        help="also write model.onnx with paddle2onnx (for infer.py --backend onnxruntime)")
    parser.add_argument("--opset_version", type=int, default=13,
                        help="lowest ONNX opset for --onnx (paddle2onnx raises it when an op needs more)")
    parser.add_argument("--verify", type=str2bool, default=True,
                        help="before moving the files into place, run them on a probe batch under Paddle "
                             "Inference (oneDNN) and onnxruntime and require the dynamic model's maps "
                             "within 1e-3 relative")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from models.backbones import set_num_threads
    from models.export import ExportCheckError
    from models.pipeline import export_model_file
    from utils.logger import get_logger

    set_num_threads()
    logger = get_logger()
    try:
        result = export_model_file(args.model_path, args.save_dir, img_size=args.img_size,
                                   backbone=backbone_name(args), onnx=args.onnx, opset=args.opset_version,
                                   verify=args.verify, logger=logger)
    except ExportCheckError as exc:   # the export failed its own check: one line, exit code 1
        raise SystemExit(f"error: {exc}") from None
    for backend, numbers in result.parity.items():
        logger.info(f"check {backend}: max relative difference to the dynamic model: map "
                    f"{numbers['map_max_relative_difference']:.2e}, score {numbers['score_max_relative_difference']:.2e}")
    thresholds = result.meta["thresholds"]
    logger.info(f"wrote {', '.join(p.name for p in result.files)}; image threshold "
                f"{thresholds['image_threshold']:.4f} from {thresholds['source']}")
    print(f"Model is saved in {args.save_dir}.")


if __name__ == "__main__":
    run_cli(main)
