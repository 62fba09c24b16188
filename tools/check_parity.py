"""Compare the exported graph with the dynamic model on a whole test split:
`python -m tools.check_parity --model_path M --export_dir D [--data_path R --category C]`.

Prints, for Paddle Inference with oneDNN off and on and for onnxruntime (when D has model.onnx),
the maximum relative difference of the anomaly maps and image scores, and how many verdicts differ.
"""
import argparse
import os

import utils  # noqa: E402,F401  (filters paddle's ccache warning)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="model file (best.pdparams)")
    parser.add_argument("--export_dir", required=True, help="folder written by export_model.py")
    parser.add_argument("--data_path", default=None, help="MVTec root; default: the demo category")
    parser.add_argument("--category", default=None, help="category under --data_path")
    parser.add_argument("--batch_size", type=int, default=8, help="images per run")
    args = parser.parse_args()

    import numpy as np
    import paddle

    from datasets.mvtec import MVTecDataset, iterate_batches
    from models.backbones import set_num_threads
    from models.deploy import InferenceSettings, OnnxModel, PaddleInferenceModel, load_metadata
    from utils.numbers import max_relative_difference
    from models.model_file import load_model
    from models.pipeline import build_model
    from utils.cli import resolve_data

    set_num_threads()
    root, _ = resolve_data(args)
    model_file = load_model(args.model_path)
    threshold = model_file.meta.decision_thresholds()["image_threshold"]
    dataset = MVTecDataset(root, args.category, "test", model_file.meta.resize, model_file.meta.crop_size)
    dynamic = build_model(model_file)
    graph = os.path.join(args.export_dir, "model.json")
    meta = load_metadata(graph)
    runtimes = {"paddle inference, oneDNN off": PaddleInferenceModel(graph, settings=InferenceSettings(), meta=meta),
                "paddle inference, oneDNN on": PaddleInferenceModel(
                    graph, settings=InferenceSettings(enable_mkldnn=True), meta=meta)}
    onnx_file = os.path.join(args.export_dir, "model.onnx")
    if os.path.exists(onnx_file):
        runtimes["onnxruntime"] = OnnxModel(onnx_file, meta=meta)
    maps = {name: [] for name in ["dynamic", *runtimes]}
    scores = {name: [] for name in maps}
    for batch in iterate_batches(dataset, args.batch_size):
        with paddle.no_grad():
            anomaly_map, score = dynamic(paddle.to_tensor(batch.images))
        maps["dynamic"].append(anomaly_map.numpy())
        scores["dynamic"].append(score.numpy())
        for name, runtime in runtimes.items():
            anomaly_map, score = runtime(batch.images)
            maps[name].append(np.asarray(anomaly_map))
            scores[name].append(np.asarray(score))
    reference_map, reference_score = np.concatenate(maps["dynamic"]), np.concatenate(scores["dynamic"])
    print(f"{args.category}: {len(dataset)} test images, image threshold {threshold:.4f}, batch {args.batch_size}")
    print("| runtime | max rel. diff. of maps | max rel. diff. of scores | verdicts that differ |")
    print("|---|---|---|---|")
    for name in runtimes:
        got_map, got_score = np.concatenate(maps[name]), np.concatenate(scores[name])
        flips = int(np.sum((got_score > threshold) != (reference_score > threshold)))
        print(f"| {name} | {max_relative_difference(got_map, reference_map):.1e} | "
              f"{max_relative_difference(got_score, reference_score):.1e} | {flips} |")


if __name__ == "__main__":
    main()
