"""export_model.py + infer.py: the static graph (Paddle Inference, oneDNN on/off) and its ONNX
reproduce the dynamic model; batch size does not matter; the CLIs print, draw and fail as specified.

One demo model is fitted (train.py, with val for calibrated thresholds) and exported (with ONNX
when paddle2onnx and onnxruntime are importable) per module.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-3
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("paddle2onnx", "onnxruntime"))
LINE = re.compile(r"Infer : (?P<path>\S+)  score (?P<score>[-\d.]+)  threshold (?P<threshold>[-\d.]+)  -> "
                  r"(?P<verdict>normal|anomalous)")
REPORT_LINE = re.compile(r"^\[\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\] root INFO: ")


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def run_in_process(main, argv):
    """A script's main() under run_cli, in this process (fast error cases): the exit code."""
    from utils.cli import run_cli
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: main(argv))
    return exited.value.code


@pytest.fixture(scope="module")
def model_path(trained):
    return trained[0] / "demo" / "best.pdparams"


@pytest.fixture(scope="module")
def exported(model_path, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("deploy_export") / "not" / "yet"     # created by the script
    result = run("export_model.py", "--model_path", model_path, "--save_dir", save_dir, "--onnx", HAS_ONNX)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Model is saved in {save_dir}." in result.stdout
    return save_dir


@pytest.fixture(scope="module")
def test_images(demo_root):
    from datasets.mvtec import ImageList
    return ImageList(demo_root / "demo" / "test", 256, 224)


@pytest.fixture(scope="module")
def reference(model_path, test_images):
    """The dynamic model's maps and scores for every demo test image (batch 8)."""
    import paddle

    from models.model_file import load_model
    from models.pipeline import build_model
    model = build_model(load_model(model_path))
    batch = np.stack([test_images.load(i)[0] for i in range(len(test_images))])
    maps, scores = [], []
    with paddle.no_grad():
        for start in range(0, len(batch), 8):
            anomaly_map, score = model(paddle.to_tensor(batch[start:start + 8]))
            maps.append(anomaly_map.numpy())
            scores.append(score.numpy())
    return batch, np.concatenate(maps), np.concatenate(scores)


@pytest.fixture(scope="module")
def five_images(test_images, tmp_path_factory):
    """5 test images (2 normal, 3 defective) in a folder: more than a batch of 2."""
    folder = tmp_path_factory.mktemp("five")
    picked = [0, 1, 10, 15, 25]
    for index in picked:
        source = Path(test_images.samples[index].path)
        shutil.copy(source, folder / f"{source.parent.name}_{source.name}")
    return folder, picked


def run_predictions(runtime, batch, batch_size):
    maps, scores = [], []
    for start in range(0, len(batch), batch_size):
        anomaly_map, score = runtime(batch[start:start + batch_size])
        maps.append(anomaly_map)
        scores.append(score)
    return np.concatenate(maps), np.concatenate(scores)


def assert_same_verdicts(scores, expected_scores, threshold):
    """Identical verdicts, except where the dynamic score ties the threshold: val.py's F1-max
    threshold is one of the test scores, and float rounding alone can flip that image."""
    ties = np.abs(expected_scores - threshold) <= 1e-5 * abs(threshold)
    assert ((scores > threshold) == (expected_scores > threshold))[~ties].all()
    assert ties.sum() <= 1


def test_export_writes_graph_and_complete_metadata(exported, model_path):
    from models.model_file import read_meta
    from models.pipeline import display_range, thresholds_of
    names = sorted(p.name for p in exported.iterdir())
    expected = ["model.json", "model.meta.json", "model.pdiparams"] + (["model.onnx"] if HAS_ONNX else [])
    assert names == sorted(expected)            # no temp folder, no .pdmodel, no pickled distribution
    meta = json.loads((exported / "model.meta.json").read_text())
    model_meta = read_meta(model_path)
    assert meta["category"] == "demo" and meta["backbone"] == "mobilenet_v2"
    assert meta["resize"] == 256 and meta["crop_size"] == [224, 224]
    assert meta["normalisation"] == model_meta["normalisation"]
    stored = thresholds_of(model_meta)
    assert meta["thresholds"]["image_threshold"] == pytest.approx(stored["image_threshold"])
    assert meta["thresholds"]["pixel_threshold"] == pytest.approx(stored["pixel_threshold"])
    assert meta["thresholds"]["source"].startswith("F1-max")
    assert (meta["display"]["vmin"], meta["display"]["vmax"]) == pytest.approx(display_range(model_meta))
    assert meta["inputs"] == [{"name": "image", "shape": [-1, 3, 224, 224], "dtype": "float32"}]
    assert [o["meaning"] for o in meta["outputs"]] == ["anomaly_map", "image_score"]
    assert meta["files"]["params"]["bytes"] == (exported / "model.pdiparams").stat().st_size
    assert meta["export_check"]["paddle_inference_onednn"]["map_max_relative_difference"] < RTOL
    assert meta["version"] and meta["exported"]


@pytest.mark.parametrize("mkldnn", [False, True], ids=["plain", "onednn"])
def test_paddle_inference_matches_dynamic_model(exported, reference, mkldnn):
    from models.export import InferenceSettings, load_metadata, open_deployed
    batch, expected_maps, expected_scores = reference
    deployed = open_deployed(exported / "model.json", settings=InferenceSettings(enable_mkldnn=mkldnn))
    assert deployed.runtime.conf_info()["enable_mkldnn"] is mkldnn
    maps, scores = run_predictions(deployed.runtime, batch, 8)
    assert maps.shape == expected_maps.shape and scores.shape == expected_scores.shape
    np.testing.assert_allclose(maps, expected_maps, rtol=RTOL)
    np.testing.assert_allclose(scores, expected_scores, rtol=RTOL)
    assert_same_verdicts(scores, expected_scores, load_metadata(exported / "model.json")["thresholds"]["image_threshold"])


def test_any_batch_size_gives_the_same_answer(exported, reference):
    from models.export import InferenceSettings, PaddleInferenceModel, load_metadata
    batch, expected_maps, expected_scores = reference
    runtime = PaddleInferenceModel(exported / "model.json", settings=InferenceSettings(enable_mkldnn=True),
                                   meta=load_metadata(exported / "model.json"))
    five = batch[:5]
    maps_1, scores_1 = run_predictions(runtime, five, 1)
    maps_2, scores_2 = run_predictions(runtime, five, 2)        # batches of 2, 2, 1
    np.testing.assert_allclose(scores_2, scores_1, rtol=1e-5)
    np.testing.assert_allclose(maps_2, maps_1, rtol=1e-5)
    np.testing.assert_allclose(scores_2, expected_scores[:5], rtol=RTOL)


def test_onnxruntime_matches_dynamic_model(exported, reference):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("paddle2onnx")
    from models.export import open_deployed
    batch, expected_maps, expected_scores = reference
    deployed = open_deployed(exported / "model.onnx")
    assert deployed.runtime.backend == "onnxruntime"
    maps, scores = run_predictions(deployed.runtime, batch, 7)
    np.testing.assert_allclose(maps, expected_maps, rtol=RTOL)
    np.testing.assert_allclose(scores, expected_scores, rtol=RTOL)
    assert_same_verdicts(scores, expected_scores, deployed.meta["thresholds"]["image_threshold"])


def check_printed_scores(stdout, folder, picked, test_images, reference):
    _, _, expected_scores = reference
    printed = {Path(m["path"]).name: (float(m["score"]), m["verdict"]) for m in LINE.finditer(stdout)}
    assert sorted(printed) == sorted(p.name for p in folder.iterdir())
    threshold = float(LINE.search(stdout)["threshold"])
    for index in picked:
        source = Path(test_images.samples[index].path)
        score, verdict = printed[f"{source.parent.name}_{source.name}"]
        expected = float(expected_scores[index])
        assert score == pytest.approx(expected, rel=RTOL, abs=1e-4)
        if abs(expected - threshold) > 1e-3 * threshold:       # see assert_same_verdicts
            assert verdict == ("anomalous" if expected > threshold else "normal")
    return printed


def test_infer_cli_folder_gpu_fallback_benchmark_and_pictures(exported, five_images, test_images, reference,
                                                              tmp_path):
    folder, picked = five_images
    result = run("infer.py", "--model_file", exported / "model.json", "-i", folder, "-b", 2,
                 "--enable_mkldnn", "True", "--enable_benchmark", "True", "--save_path", tmp_path,
                 "--seed", 7)    # --use_gpu defaults to True, as in the original
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "--use_gpu=True but this Paddle build has no CUDA: running on CPU" in out
    assert "note: --seed is accepted for compatibility and ignored" in out
    check_printed_scores(out, folder, picked, test_images, reference)
    pictures = sorted(p.name for p in (tmp_path / "demo" / "infer").glob("*.png"))
    assert pictures == sorted(p.name for p in folder.iterdir())
    report = [line for line in out.splitlines() if REPORT_LINE.match(line)]
    text = "\n".join(report)
    for label in ("Env info", "Paddle info", "Conf info", "Model info", "Data info", "Perf info",
                  " enable_mkldnn: True", " batch_size: 2", " data_num: 3", " model_name: PaDiM",
                  " total time spent(s): ", "gpu_rss(MB): None, gpu_util: None%"):
        assert label in text, label
    perf = re.search(r"preprocess_time\(ms\): ([\d.]+), inference_time\(ms\): ([\d.]+), "
                     r"postprocess_time\(ms\): ([\d.]+)", text)
    assert perf and float(perf.group(2)) > 0
    assert float(re.search(r"cpu_rss\(MB\): ([\d.]+)", text).group(1)) > 50


def test_infer_cli_onnxruntime_backend(exported, five_images, test_images, reference, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("paddle2onnx")
    folder, picked = five_images
    result = run("infer.py", "--model_file", exported / "model.json", "--backend", "onnxruntime", "-i", folder,
                 "-b", 3, "--use_gpu", "False", "--save_picture", "False", "--save_path", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stdout
    check_printed_scores(result.stdout, folder, picked, test_images, reference)
    assert not (tmp_path / "demo").exists()


def test_infer_bad_inputs_exit_2(exported, five_images, tmp_path, capsys):
    import infer
    folder, _ = five_images
    graph = exported / "model.json"
    cases = []
    cases.append((["--model_file", tmp_path / "missing" / "model.json", "-i", folder], "inference model not found"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.json", "model.pdiparams"):
        os.symlink(exported / name, bare / name)
    cases.append((["--model_file", bare / "model.json", "-i", folder], "metadata file not found"))
    cases.append((["--model_file", graph, "-i", tmp_path / "nothing_here"], "picture not found"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000.png").write_bytes(b"not a png at all")
    cases.append((["--model_file", graph, "-i", broken, "--use_gpu", "False"], "cannot read image"))
    for argv, message in cases:
        assert run_in_process(infer.main, [str(a) for a in argv] + ["--save_path", str(tmp_path)]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_export_rejects_img_size_mismatch_and_missing_model(model_path, tmp_path, capsys):
    result = run("export_model.py", "--model_path", model_path, "--img_size", 256, "--save_dir", tmp_path / "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--img_size 256x256 does not match the model's crop size 224x224" in lines[0]
    assert not (tmp_path / "x").exists()
    import export_model
    assert run_in_process(export_model.main, ["--model_path", str(tmp_path / "none.pdparams"),
                                              "--save_dir", str(tmp_path / "y")]) == 2
    assert "model file not found" in capsys.readouterr().err
