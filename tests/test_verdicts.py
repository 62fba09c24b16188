"""Verdicts through the command lines: a model straight from train.py --val=False, predictions.csv
and the pictures beside it, a folder with a corrupt image, the rule that every anomalous verdict
shows where, val.py's choice of thresholds, and a non-square geometry without a crop from the
fit to infer.py."""
import csv
import json
import shutil

import numpy as np
import pytest
from conftest import run_script as run

from models.calibration import DEFAULT_FALSE_ALARM_RATE


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def fresh_model(demo_root, tmp_path_factory):
    """train.py --val=False on the demo category, every other flag at its default."""
    out = tmp_path_factory.mktemp("fresh")
    result = run("train.py", "--data_path", demo_root, "--category", "demo", "--backbone", "mobilenet_v2",
                 "--val", "False", "--save_path", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "demo" / "best.pdparams", result


def test_a_model_straight_from_train_flags_no_good_image_and_shows_every_region(fresh_model, demo_root, tmp_path):
    model, fit = fresh_model
    assert "needs at least 99 calibration images; with 60" in fit.stdout    # 1% is out of reach: said once
    test = demo_root / "demo" / "test"
    result = run("predict.py", "--model_path", model, "--picture_path", test, "--save_path", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo" / "predict"
    rows = read_rows(out / "predictions.csv")
    inputs = sorted(p for p in test.rglob("*.png"))
    assert [row["path"] for row in rows] == [str(p) for p in inputs]           # one row per input, in order
    good = [row for row in rows if "/good/" in row["path"]]
    defective = [row for row in rows if "/good/" not in row["path"]]
    assert len(good) == 10 and len(defective) == 20
    assert all(row["verdict"] == "normal" for row in good), [r["image_score"] for r in good]
    assert all(row["verdict"] == "anomalous" for row in defective)             # the demo's defects are plain
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(float(rows[0]["threshold"]))
        assert (float(row["image_score"]) > float(row["threshold"])) == (row["verdict"] == "anomalous")
        assert (int(row["region_pixels"]) > 0) == (row["verdict"] == "anomalous")
        assert row["error"] == ""
    # pictures mirror the tree: good/000.png and hole/000.png do not collide
    pictures = [row["picture"] for row in rows]
    assert pictures == [str(out / p.relative_to(test)) for p in inputs]
    assert all((out / name).is_file() for name in ("good/000.png", "hole/000.png"))
    assert sorted(str(p) for p in out.rglob("*.png")) == sorted(pictures)


def test_a_corrupt_image_gets_an_error_row_and_the_others_are_scored(fresh_model, demo_root, tmp_path):
    model, _ = fresh_model
    folder = tmp_path / "in"
    for kind in ("good", "hole"):
        (folder / kind).mkdir(parents=True)
        shutil.copy(demo_root / "demo" / "test" / kind / "000.png", folder / kind / "000.png")
    broken = folder / "good" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = run("predict.py", "--model_path", model, "--picture_path", folder, "--save_path", tmp_path / "out",
                 "--batch_size", "3")
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 of 3 image(s) could not be read") \
        and f"cannot read image {broken}" in err[0], err
    assert "Traceback" not in result.stderr
    assert f"Predict : {broken}  error: cannot read image" in result.stdout     # the warning, when it happens
    out = tmp_path / "out" / "demo" / "predict"
    rows = {row["path"]: row for row in read_rows(out / "predictions.csv")}
    assert list(rows) == [str(folder / "good" / "000.png"), str(broken), str(folder / "hole" / "000.png")]
    assert rows[str(broken)]["verdict"] == "error" and rows[str(broken)]["image_score"] == ""
    assert "cannot read image" in rows[str(broken)]["error"] and rows[str(broken)]["picture"] == ""
    assert [rows[str(folder / k / "000.png")]["verdict"] for k in ("good", "hole")] == ["normal", "anomalous"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["good/000.png", "hole/000.png"]


def test_an_anomalous_verdict_shows_a_region_even_with_thresholds_given_by_hand(fresh_model, demo_root, tmp_path):
    """A pixel threshold above every score: the region is the map's peak, never empty."""
    model, _ = fresh_model
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(demo_root / "demo" / "test" / "good" / "000.png", folder / "a.png")
    shutil.copy(demo_root / "demo" / "test" / "good" / "001.png", folder / "b.png")
    result = run("predict.py", "--model_path", model, "--picture_path", folder, "--save_path", tmp_path / "out",
                 "--threshold", "0", "--pixel_threshold", "1e9", "--save_picture", "False")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "demo" / "predict" / "predictions.csv")
    assert [row["verdict"] for row in rows] == ["anomalous", "anomalous"]
    assert all(0 < int(row["region_pixels"]) < 100 for row in rows)        # the peak, not the whole image


def test_the_picture_shows_the_region_it_is_given():
    """The mask panel is the region of the verdict (predictions.csv counts it), not the map
    thresholded again: a map wholly below the pixel threshold still shows its region."""
    from utils.pictures import panel_arrays
    anomaly_map = np.zeros((40, 48), np.float32)
    region = np.zeros((40, 48), bool)
    region[10:20, 5:30] = True
    panels = dict(panel_arrays(np.zeros((40, 48, 3), np.uint8), anomaly_map, 5.0, 0.0, 10.0, region=region))
    np.testing.assert_array_equal(panels["Predicted mask"] > 127, region)
    assert not dict(panel_arrays(np.zeros((40, 48, 3), np.uint8), anomaly_map, 5.0, 0.0, 10.0))["Predicted mask"].any()


def test_val_keeps_the_calibrated_verdicts_unless_told(fresh_model, demo_root, tmp_path):
    from models.model_file import read_meta
    model = tmp_path / "demo" / "best.pdparams"
    model.parent.mkdir()
    shutil.copy(fresh_model[0], model)
    fitted = read_meta(model).calibration
    assert fitted.verdicts == "calibrated" and fitted.f1_image_threshold is None
    assert fitted.false_alarm_rate == DEFAULT_FALSE_ALARM_RATE
    result = run("val.py", "--data_path", demo_root, "--category", "demo", "--save_path", tmp_path,
                 "--save_picture", "False", "--verdicts", "f1_max")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    evaluated = read_meta(model)
    assert evaluated.calibration.verdicts == "f1_max" and metrics["verdicts"] == "f1_max"
    assert evaluated.calibration.image_threshold == fitted.image_threshold          # the calibrated pair is kept
    assert evaluated.decision_thresholds()["image_threshold"] == pytest.approx(metrics["image_threshold"])
    assert "F1-max" in evaluated.decision_thresholds()["source"]
    assert metrics["calibrated"]["threshold"] == pytest.approx(fitted.image_threshold)
    assert metrics["calibrated"]["false_alarms"] == 0 and metrics["calibrated"]["defects_found"] == 20


def test_non_square_images_without_a_crop_from_the_fit_to_infer(demo_root, tmp_path):
    """--resize HxW --crop_size none: the model sees whole images of 96x160 (H x W); predict.py,
    export_model.py and infer.py all take that geometry from the model and agree."""
    from models.model_file import read_meta
    out = tmp_path / "out"
    fit = run("train.py", "--data_path", demo_root, "--category", "demo", "--backbone", "mobilenet_v2",
              "--val", "False", "--save_path", out, "--resize", "96x160", "--crop_size", "none")
    assert fit.returncode == 0, fit.stderr[-3000:]
    model = out / "demo" / "best.pdparams"
    meta = read_meta(model)
    assert (meta.resize, meta.crop_size, meta.image_size, meta.feature_grid) == ([96, 160], None, [96, 160], [24, 40])
    folder = tmp_path / "in"
    folder.mkdir()
    for kind in ("good", "stain"):
        shutil.copy(demo_root / "demo" / "test" / kind / "002.png", folder / f"{kind}.png")
    predicted = run("predict.py", "--model_path", model, "--picture_path", folder, "--save_path", tmp_path / "p")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    export = tmp_path / "export"
    exported = run("export_model.py", "--model_path", model, "--save_dir", export)
    assert exported.returncode == 0, exported.stderr[-3000:]
    exported_meta = json.loads((export / "model.meta.json").read_text())
    assert (exported_meta["resize"], exported_meta["crop_size"]) == ([96, 160], None)
    assert exported_meta["inputs"][0]["shape"] == [-1, 3, 96, 160]
    inferred = run("infer.py", "--model_file", export / "model.json", "-i", folder, "--use_gpu", "False",
                   "--save_path", tmp_path / "i")
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    by_predict = read_rows(tmp_path / "p" / "demo" / "predict" / "predictions.csv")
    by_infer = read_rows(tmp_path / "i" / "demo" / "infer" / "predictions.csv")
    assert [row["verdict"] for row in by_predict] == [row["verdict"] for row in by_infer] == ["normal", "anomalous"]
    for a, b in zip(by_predict, by_infer):
        assert float(a["image_score"]) == pytest.approx(float(b["image_score"]), rel=1e-3)
        assert float(a["threshold"]) == float(b["threshold"])
    from PIL import Image
    with Image.open(tmp_path / "i" / "demo" / "infer" / "stain.png") as picture:     # panels 160 wide, 96 high
        assert picture.width > 4 * 160 and picture.height < 2 * 160
