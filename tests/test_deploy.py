"""export_model.py + infer.py: the static graph (Paddle Inference, oneDNN on/off) and its ONNX
reproduce the dynamic model; batch size does not matter; the CLIs print, draw and fail as specified.

One demo model is fitted (train.py, its verdicts calibrated by the fit) and exported (with ONNX
when paddle2onnx and onnxruntime are importable) per module.
"""
import hashlib
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
    names = sorted(p.name for p in exported.iterdir())
    expected = ["model.json", "model.meta.json", "model.pdiparams"] + (["model.onnx"] if HAS_ONNX else [])
    assert names == sorted(expected)            # no temp folder, no .pdmodel, no pickled distribution
    meta = json.loads((exported / "model.meta.json").read_text())
    model_meta = read_meta(model_path)
    assert meta["category"] == "demo" and meta["backbone"] == "mobilenet_v2"
    assert meta["resize"] == 256 and meta["crop_size"] == [224, 224]
    assert meta["normalisation"] == model_meta.normalisation
    assert meta["model_id"] == model_meta.model_id
    stored = model_meta.decision_thresholds()
    calibration = model_meta.calibration
    assert (stored["image_threshold"], stored["pixel_threshold"]) == (calibration.image_threshold,
                                                                      calibration.pixel_threshold)
    assert meta["thresholds"]["image_threshold"] == pytest.approx(stored["image_threshold"])
    assert meta["thresholds"]["pixel_threshold"] == pytest.approx(stored["pixel_threshold"])
    assert meta["thresholds"]["source"].startswith("calibrated on 60 training image(s)")
    assert meta["calibration"] == calibration.to_dict()
    # the colour scale's rule, from the stored numbers: vmin = median training pixel score, the
    # pixel threshold mid-scale
    vmin = model_meta.train_statistics["pixel_median"]
    vmax = 2 * stored["pixel_threshold"] - vmin
    assert (meta["display"]["vmin"], meta["display"]["vmax"]) == pytest.approx((vmin, vmax))
    assert meta["inputs"] == [{"name": "image", "shape": [-1, 3, 224, 224], "dtype": "float32"}]
    assert [o["meaning"] for o in meta["outputs"]] == ["anomaly_map", "image_score"]
    for key, name in (("model", "model.json"), ("params", "model.pdiparams")) + ((("onnx", "model.onnx"),) if HAS_ONNX else ()):
        data = (exported / name).read_bytes()
        assert meta["files"][key] == {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["export_check"]["paddle_inference_onednn"]["map_max_relative_difference"] < RTOL
    assert meta["version"] and meta["exported"]


@pytest.mark.parametrize("mkldnn", [False, True], ids=["plain", "onednn"])
def test_paddle_inference_matches_dynamic_model(exported, reference, mkldnn):
    from models.deploy import InferenceSettings, load_metadata, open_deployed
    batch, expected_maps, expected_scores = reference
    deployed = open_deployed(exported / "model.json", settings=InferenceSettings(enable_mkldnn=mkldnn))
    assert deployed.runtime.conf_info()["enable_mkldnn"] is mkldnn
    maps, scores = run_predictions(deployed.runtime, batch, 8)
    assert maps.shape == expected_maps.shape and scores.shape == expected_scores.shape
    np.testing.assert_allclose(maps, expected_maps, rtol=RTOL)
    np.testing.assert_allclose(scores, expected_scores, rtol=RTOL)
    assert_same_verdicts(scores, expected_scores, load_metadata(exported / "model.json")["thresholds"]["image_threshold"])


def test_any_batch_size_gives_the_same_answer(exported, reference):
    from models.deploy import InferenceSettings, PaddleInferenceModel, load_metadata
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
    from models.deploy import open_deployed
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
    assert [p.name for p in (tmp_path / "demo" / "infer").iterdir()] == ["predictions.csv"]     # no picture


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
    assert len(lines) == 1 and "--img_size 256x256 does not match the model's input size 224x224" in lines[0]
    assert not (tmp_path / "x").exists()
    import export_model
    assert run_in_process(export_model.main, ["--model_path", str(tmp_path / "none.pdparams"),
                                              "--save_dir", str(tmp_path / "y")]) == 2
    assert "model file not found" in capsys.readouterr().err


@pytest.fixture
def logged(monkeypatch):
    """The lines the project's logger writes, in place of its stdout handler (which may hold the
    stream of an earlier test's capture)."""
    import logging
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    handler._padim_stdout = True
    monkeypatch.setattr(logging.getLogger("padim"), "handlers", [handler])
    return lines


def test_finite_results_flags_each_broken_image():
    from models.deploy import finite_results
    maps = np.ones((4, 3, 5), np.float32)
    scores = np.ones(4, np.float32)
    maps[1, 2, 4] = np.nan
    scores[2] = np.inf
    maps[3, 0, 0] = -np.inf
    assert finite_results(maps, scores).tolist() == [True, False, False, False]


def copy_export(exported, folder):
    shutil.copytree(exported, folder)
    return folder


def test_parameters_from_another_export_are_refused(exported, five_images, tmp_path, capsys):
    """Same size, other content (another export, or random bytes): refused before any image is scored."""
    import infer
    from models.deploy import DeployError, open_deployed
    copy = copy_export(exported, tmp_path / "copy")
    params = copy / "model.pdiparams"
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0xFF
    params.write_bytes(bytes(data))
    with pytest.raises(DeployError, match="SHA-256 differs"):
        open_deployed(copy / "model.json")
    argv = ["--model_file", str(copy / "model.json"), "-i", str(five_images[0]), "--use_gpu", "False",
            "--save_path", str(tmp_path)]
    assert run_in_process(infer.main, argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "SHA-256 differs" in err and "score" not in out
    other = tmp_path / "other.pdiparams"
    other.write_bytes(bytes(data))
    assert run_in_process(infer.main, argv + ["--params_file", str(other)]) == 2
    assert "SHA-256 differs" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda m: m["thresholds"].update(image_threshold="high"), "thresholds.image_threshold must be a number"),
    (lambda m: m.pop("files"), "lacks files"),
    (lambda m: m["files"]["params"].pop("sha256"), "files.params lacks sha256"),
    (lambda m: m.update(crop_size=[224]), "crop_size must be a list of 2 entries"),
    (lambda m: m.update(outputs={"name": "x"}), "outputs must be a list"),
], ids=["threshold", "files", "checksum", "crop", "outputs"])
def test_damaged_exported_metadata_is_one_line(exported, tmp_path, change, message):
    from models.deploy import DeployError, load_metadata
    copy = copy_export(exported, tmp_path / "copy")
    meta = json.loads((copy / "model.meta.json").read_text())
    change(meta)
    (copy / "model.meta.json").write_text(json.dumps(meta))
    with pytest.raises(DeployError) as caught:
        load_metadata(copy / "model.json")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_infer_non_finite_output_is_an_error_not_a_verdict(exported, five_images, tmp_path, capsys, monkeypatch,
                                                          logged):
    import infer
    from models.deploy import PaddleInferenceModel
    real_run = PaddleInferenceModel.run

    def first_map_poisoned(self, images):
        maps, scores = real_run(self, images)
        maps[0, 5, 5] = np.nan          # the score stays finite: the map alone must be caught
        return maps, scores

    monkeypatch.setattr(PaddleInferenceModel, "run", first_map_poisoned)
    folder, _ = five_images
    argv = ["--model_file", str(exported / "model.json"), "-i", str(folder), "-b", "2", "--use_gpu", "False",
            "--save_picture", "False", "--save_path", str(tmp_path)]
    assert run_in_process(infer.main, argv) == 2
    err = capsys.readouterr().err
    out = "\n".join(logged)
    errors = [line for line in logged if "error: NaN or infinite" in line]
    assert len(errors) == 3 and len(LINE.findall(out)) == 2         # batches of 2, 2, 1: three first images
    assert err.strip().splitlines() == ["error: 3 of 5 image(s) got a NaN or infinite anomaly map or score and no "
                                        "verdict: the model or its parameters are damaged (refit or re-export it)"]


def test_predict_non_finite_score_is_an_error_not_a_verdict(model_path, demo_root, tmp_path, capsys, monkeypatch,
                                                            logged):
    import models.pipeline as pipeline
    import predict
    from utils.cli import run_cli
    real_scorer = pipeline.model_scorer

    def nan_scorer(*args, **kwargs):
        score = real_scorer(*args, **kwargs)

        def poisoned(images):
            maps, scores = score(images)
            return maps, np.full_like(scores, np.nan)
        return poisoned

    monkeypatch.setattr(pipeline, "model_scorer", nan_scorer)
    hole = demo_root / "demo" / "test" / "hole" / "000.png"
    monkeypatch.setattr(sys, "argv", ["predict.py", "--model_path", str(model_path), "--picture_path", str(hole),
                                      "--save_path", str(tmp_path / "p.png")])
    with pytest.raises(SystemExit) as exited:
        run_cli(predict.main)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    out = "\n".join(logged)
    assert "-> normal" not in out and "-> anomalous" not in out and "error: NaN or infinite" in out
    assert len(err.strip().splitlines()) == 1 and "1 of 1 image(s)" in err
    assert not (tmp_path / "p.png").exists()


def test_export_refuses_a_model_with_non_finite_values(model_path, tmp_path, capsys):
    import export_model
    from models.model_file import load_model
    from test_model_file import record_of, write_raw
    model = load_model(model_path)
    model.arrays["mean"][3, 1] = np.nan
    broken = write_raw(tmp_path / "nan.pdparams", record_of(model.meta), model.arrays, model.backbone_state)
    assert run_in_process(export_model.main, ["--model_path", str(broken), "--save_dir", str(tmp_path / "out"),
                                              "--verify", "True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mean holds NaN or infinite values" in err[0], err
    assert not (tmp_path / "out").exists()


LEAN_RUN = """
import json, sys
import numpy as np
from models.deploy import InferenceSettings, open_deployed
deployed = open_deployed(sys.argv[1], settings=InferenceSettings(enable_mkldnn=True))
maps, scores = deployed.runtime(np.load(sys.argv[2]))
loaded = sorted({name.split(".")[0] + "." + name.split(".")[1] if "." in name else name
                 for name in sys.modules if name.split(".")[0] == "paddle"})
import paddle                                   # the whole framework still imports afterwards
eager = float(paddle.to_tensor(np.ones(3, np.float32)).sum())
np.savez(sys.argv[3], maps=maps, scores=scores)
print(json.dumps({"loaded": loaded, "eager": eager}))
"""


def test_runtime_runs_without_importing_paddle(exported, reference, tmp_path):
    """infer.py's runtime loads Paddle's compiled module alone: no paddle package code runs, the
    answers are the dynamic model's, and `import paddle` works after it in the same process."""
    batch, expected_maps, expected_scores = reference
    np.save(tmp_path / "batch.npy", batch[:3])
    result = subprocess.run([sys.executable, "-c", LEAN_RUN, str(exported / "model.json"), str(tmp_path / "batch.npy"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == ["paddle.base"] and report["eager"] == 3.0   # only paddle.base.libpaddle*
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["maps"], expected_maps[:3], rtol=RTOL)
    np.testing.assert_allclose(out["scores"], expected_scores[:3], rtol=RTOL)


def test_bfloat16_on_a_cpu_that_has_it_else_fp32_with_a_warning(exported, reference, monkeypatch, logged, caplog):
    """bf16 (where the CPU has it) says that its scores move from fp32's, and they move by a few
    percent, not more; without bf16 the same request runs fp32 with a warning and no such note."""
    import logging

    import models.deploy as deploy
    batch, _, expected_scores = reference
    settings = deploy.InferenceSettings(enable_mkldnn=True, precision="fp16")
    caplog.set_level(logging.INFO, logger="padim")
    if deploy.cpu_supports_bfloat16():
        runtime = deploy.open_deployed(exported / "model.json", settings=settings).runtime
        assert runtime.precision == "bf16" and deploy.BFLOAT16_NOTE in logged
        _, scores = run_predictions(runtime, batch[:8], 8)
        np.testing.assert_allclose(scores, expected_scores[:8], rtol=0.1)     # bf16: a few percent
        logged.clear()
    monkeypatch.setattr(deploy, "cpu_supports_bfloat16", lambda: False)
    runtime = deploy.open_deployed(exported / "model.json", settings=settings).runtime
    assert runtime.precision == "fp32" and any("running fp32" in line for line in logged)
    assert deploy.BFLOAT16_NOTE not in logged
    _, scores = run_predictions(runtime, batch[:4], 4)
    np.testing.assert_allclose(scores, expected_scores[:4], rtol=RTOL)


def test_bfloat16_engine_failure_falls_back_to_fp32(exported, reference, monkeypatch, logged):
    """Where Paddle Inference cannot build the bf16 engine, one warning and the fp32 engine."""
    import models.deploy as deploy
    batch, _, expected_scores = reference
    library = deploy.inference_library()
    real_create = library.create_predictor

    bfloat16_asked = False
    real_config = deploy.PaddleInferenceModel._config

    def config_spy(self, lib, bfloat16):
        nonlocal bfloat16_asked
        bfloat16_asked = bfloat16
        return real_config(self, lib, bfloat16)

    def refuse_bfloat16(config):
        if bfloat16_asked:
            raise RuntimeError("(InvalidArgument) In operator matmul, the [1] dimension of Input(X) must be equal")
        return real_create(config)

    monkeypatch.setattr(deploy, "cpu_supports_bfloat16", lambda: True)
    monkeypatch.setattr(deploy.PaddleInferenceModel, "_config", config_spy)
    monkeypatch.setattr(library, "create_predictor", refuse_bfloat16)
    runtime = deploy.open_deployed(exported / "model.json",
                                   settings=deploy.InferenceSettings(enable_mkldnn=True, precision="fp16")).runtime
    assert runtime.precision == "fp32"
    assert any("cannot run this graph in oneDNN bfloat16" in line and "running fp32" in line for line in logged)
    _, scores = run_predictions(runtime, batch[:4], 4)
    np.testing.assert_allclose(scores, expected_scores[:4], rtol=RTOL)
