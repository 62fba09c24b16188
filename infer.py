"""Predict with the exported static graph under Paddle Inference (or its ONNX under onnxruntime).

The graph holds the whole pipeline, so every batch size gives the same answer. For each image it
logs the score (Mahalanobis units), the verdict against the exported image threshold (or
--threshold) and the size of its region, writes predictions.csv and saves predict.py's 4-panel
picture with the exported colour scale, as predict.py does (an unreadable image: an error row, a
warning, the others scored, exit code 2 at the end). Everything besides the graph, the image
geometry included, comes from <model>.meta.json beside the model file.
"""
from __future__ import annotations

import os
from pathlib import Path


import utils  # noqa: F401  (filters paddle's ccache warning before paddle is imported)
from utils.cli import add_verdict_args, category_arg, new_parser, positive_int, run_cli, str2bool


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("-c", "--config", default=None,
                        help="accepted for compatibility (the original's unused PaddleVideo config); ignored")
    parser.add_argument("-i", "--input_file", default=None,
                        help="an image file or a folder (searched recursively, sorted). Default: the demo "
                             "category's test folder")
    parser.add_argument("--model_file", default="./output/model.json",
                        help="the exported graph (model.json; a model.pdmodel path falls back to the .json "
                             "beside it), its folder, or model.onnx for --backend onnxruntime")
    parser.add_argument("--params_file", default=None,
                        help="parameters of the graph; default: <model>.pdiparams beside --model_file")
    parser.add_argument("-b", "--batch_size", type=positive_int, default=1, help="images per run of the predictor")
    parser.add_argument("--num_workers", type=positive_int, default=2,
                        help="decoding threads that prepare the next batches while the predictor runs")
    parser.add_argument("--use_gpu", type=str2bool, default=True,
                        help="run on GPU 0; on a Paddle build without CUDA: one warning, then the CPU")
    parser.add_argument("--use_tensorrt", type=str2bool, default=False, help="TensorRT subgraphs (GPU only)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                        help="fp16/int8 with TensorRT on GPU; fp16 on CPU runs oneDNN bfloat16 (needs "
                             "--enable_mkldnn=True and a CPU with bf16; otherwise fp32 with a warning): faster, "
                             "but scores move by up to a few percent from fp32's and the low parts of maps "
                             "more, so verdicts close to the threshold may differ (docs/performance.md has the "
                             "measured differences)")
    parser.add_argument("--enable_mkldnn", type=str2bool, default=False,
                        help="oneDNN kernels on CPU (several times faster on x86)")
    parser.add_argument("--cpu_threads", type=positive_int, default=None,
                        help="CPU math threads; default: every CPU this process may use")
    parser.add_argument("--ir_optim", type=str2bool, default=True, help="Paddle Inference graph optimisation passes")
    parser.add_argument("--gpu_mem", type=positive_int, default=8000, help="initial GPU memory pool (MB)")
    parser.add_argument("--gpu_id", type=int, default=0, help="GPU device id")
    parser.add_argument("--enable_benchmark", type=str2bool, default=False,
                        help="print the AutoLog report (preprocess/inference/postprocess ms per batch after "
                             "one warm-up batch, memory, total time)")
    parser.add_argument("--save_path", default="./test_tipc/output/",
                        help="pictures go to <save_path>/<category>/infer/; a .png/.jpg path with a single "
                             "image is used as the picture's file name")
    parser.add_argument("--category", type=category_arg, default=None,
                        help="name of the pictures' folder; default: the model's category")
    parser.add_argument("--distribution", default=None,
                        help="accepted for compatibility; ignored (the Gaussian is inside the parameters file)")
    parser.add_argument("--seed", type=int, default=None,
                        help="accepted for compatibility; ignored (the channel indices are inside the graph)")
    parser.add_argument("--backend", choices=("paddle", "onnxruntime"), default=None,
                        help="paddle: Paddle Inference on the .json graph; onnxruntime: model.onnx beside it "
                             "(or --model_file). Default: onnxruntime for an .onnx --model_file, else paddle")
    add_verdict_args(parser, "the exported one (model.meta.json)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from datasets.mvtec import ImageList, iterate_batches
    from models.deploy import (InferenceSettings, build_runtime, exported_display_range, load_metadata,
                               resolve_model_file)
    from utils.logger import get_logger
    from utils.predictions import SINGLE_PICTURE_SUFFIXES, PredictionRun, verdict_thresholds
    from utils.prefetch import Prefetched

    logger = get_logger()
    for flag, value, why in (("-c/--config", args.config, "there is no config file"),
                             ("--distribution", args.distribution, "the Gaussian is inside the parameters file"),
                             ("--seed", args.seed, "the channel indices are inside the graph")):
        if value is not None:
            logger.info(f"note: {flag} is accepted for compatibility and ignored: {why}")
    settings = InferenceSettings(use_gpu=args.use_gpu, gpu_mem=args.gpu_mem, gpu_id=args.gpu_id,
                                 use_tensorrt=args.use_tensorrt, precision=args.precision,
                                 enable_mkldnn=args.enable_mkldnn, cpu_threads=args.cpu_threads,
                                 ir_optim=args.ir_optim, batch_size=args.batch_size)
    if args.input_file is None:
        from datasets.demo import DEMO_CATEGORY, demo_data_root
        args.input_file = Path(demo_data_root()) / DEMO_CATEGORY / "test"
    model_file, backend = resolve_model_file(args.model_file, args.backend, logger)
    meta = load_metadata(model_file)
    # bad input fails fast, before the runtime loads
    images = ImageList(args.input_file, meta["resize"], meta["crop_size"], with_display=args.save_picture)
    # Decoding starts now, in threads, while the runtime loads (that leaves a core free).
    batches = Prefetched(iterate_batches(images, args.batch_size, args.num_workers, skip_errors=True))
    with batches:   # its thread stops however the rest ends
        runtime = build_runtime(model_file, backend, meta, args.params_file, settings, logger)
        category = args.category or meta["category"]
        image_threshold, pixel_threshold, source = verdict_thresholds(meta["thresholds"], args.threshold,
                                                                      args.pixel_threshold)
        print("Inference model(PaDiM)...")
        logger.info(f"model {model_file} ({runtime.backend}, {meta['backbone']}, {meta['category']}); "
                    f"image threshold {image_threshold:.4f}, pixel threshold {pixel_threshold:.4f} from {source}")
        chunks = [list(range(start, min(start + args.batch_size, len(images))))
                  for start in range(0, len(images), args.batch_size)]
        autolog = None
        if args.enable_benchmark:
            from utils.autolog import auto_log_available, create_autolog
            use_auto_log = runtime.backend == "paddle" and auto_log_available()
            log_dir = Path(args.save_path)
            if log_dir.suffix.lower() in SINGLE_PICTURE_SUFFIXES:
                log_dir = log_dir.parent
            # auto_log reads the Paddle Config itself; ours is given what was really configured.
            autolog = create_autolog(
                model_name="PaDiM", model_precision=runtime.precision, batch_size=args.batch_size,
                data_shape="dynamic", save_path=str(log_dir / "auto_log.log") if use_auto_log else None,
                inference_config=runtime.config if use_auto_log else runtime.conf_info(), pids=os.getpid(),
                process_name=None, gpu_ids=args.gpu_id if runtime.use_gpu else None,
                time_keys=["preprocess_time", "inference_time", "postprocess_time"],
                warmup=1 if len(chunks) > 1 else 0)
        display = exported_display_range(meta, args.pixel_threshold)
        # Decoding runs in threads ahead of the predictor (iterate_batches), so "preprocess_time" is
        # the time spent waiting for the next batch, not the decode itself.
        with PredictionRun(images, args.save_path, category, "infer", image_threshold, pixel_threshold, display,
                           "Infer", logger, args.save_picture) as run:
            for _ in chunks:
                if autolog:
                    autolog.times.start()
                batch = next(batches)
                if autolog:
                    autolog.times.stamp()
                maps, scores = runtime(batch.images) if batch.samples else (None, None)
                if autolog:
                    autolog.times.stamp()
                run.add(batch, maps, scores)
                if autolog:
                    autolog.times.end(stamp=True)
            if autolog:
                from utils.autolog import report
                report(autolog)
            run.finish()


if __name__ == "__main__":
    run_cli(main)
