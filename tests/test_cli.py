"""End to end through the command lines on the demo category, and every bad input -> exit 2."""
import json
import random

import pytest
from conftest import run_script as run
from conftest import run_scripts
from PIL import Image



def test_train_writes_model_log_and_validates(trained):
    out, result = trained
    folder = out / "demo"
    assert (folder / "best.pdparams").is_file()
    assert "Save model in" in (folder / "train.log").read_text()
    assert "Training model for demo" in result.stdout
    assert "Class:demo:\tImage AUC:" in result.stdout and "Class:demo:\tPixel AUC:" in result.stdout
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro_auc", "image_threshold", "pixel_threshold", "n_test"):
        assert key in metrics
    assert metrics["n_test"] == 30
    # The demo's defects are plain to an ImageNet backbone: anything less means a broken pipeline.
    assert metrics["image_auroc"] > 0.95 and metrics["pixel_auroc"] > 0.9 and metrics["pro_auc"] > 0.8
    rows = (folder / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,label,image_score" and len(rows) == 31
    # besides the original's F1-max numbers, the verdicts at the calibrated threshold, counted by hand here
    scores = [(label, float(score)) for _, label, score in (line.split(",") for line in rows[1:])]
    calibrated = metrics["calibrated"]
    threshold = calibrated["threshold"]
    assert calibrated["false_alarms"] == sum(label == "0" and s > threshold for label, s in scores)
    assert calibrated["defects_found"] == sum(label == "1" and s > threshold for label, s in scores)
    assert (calibrated["normal_images"], calibrated["defective_images"]) == (10, 20)
    assert metrics["f1_max"]["threshold"] == metrics["image_threshold"] and metrics["verdicts"] == "calibrated"
    assert "calibrated image threshold" in result.stdout and "F1-max image threshold" in result.stdout
    assert not list(folder.glob(".*tmp"))


def test_model_file_keeps_idx_and_thresholds(trained):
    from models.model_file import load_model
    out, _ = trained
    model = load_model(out / "demo" / "best.pdparams")
    random.seed(7)
    assert model.arrays["idx"].tolist() == sorted(random.sample(range(24 + 32 + 96), 100))   # grouped by stage
    metrics = json.loads((out / "demo" / "metrics.json").read_text())
    calibration = model.meta.calibration
    # val stored its F1-max pair beside the calibrated one, and the verdicts still use the calibrated one
    assert calibration.f1_image_threshold == pytest.approx(metrics["image_threshold"])
    assert calibration.f1_pixel_threshold == pytest.approx(metrics["pixel_threshold"])
    assert calibration.verdicts == "calibrated"
    assert model.meta.decision_thresholds()["image_threshold"] == calibration.image_threshold
    assert metrics["calibrated"]["threshold"] == pytest.approx(calibration.image_threshold)
    # 60 training images: every one calibrates, and 1% is out of reach (1/61 at best)
    assert calibration.n_calibration == 60 and calibration.guaranteed_rate == pytest.approx(1 / 61)
    assert calibration.pixel_threshold <= calibration.image_threshold
    assert model.meta.backbone == "mobilenet_v2" and model.meta.n_train == 60


def test_val_saves_every_figure_and_roc(trained, demo_root, tmp_path):
    out, _ = trained
    result = run("val.py", "--data_path", demo_root, "--category", "demo", "--save_path", tmp_path,
                 "--model_path", out / "demo" / "best.pdparams", "--save_picture", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = list((tmp_path / "demo").glob("demo_*.png"))
    assert len(figures) == 30
    assert (tmp_path / "demo" / "roc_curve.png").is_file()
    first = json.loads((out / "demo" / "metrics.json").read_text())
    second = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert second["image_auroc"] == pytest.approx(first["image_auroc"])
    assert second["pixel_auroc"] == pytest.approx(first["pixel_auroc"], rel=1e-6)


def test_predict_gives_verdicts_against_the_stored_threshold(trained, demo_root, tmp_path):
    out, _ = trained
    model = out / "demo" / "best.pdparams"
    good = demo_root / "demo" / "test" / "good" / "000.png"
    hole = demo_root / "demo" / "test" / "hole" / "000.png"
    grey = tmp_path / "grey.png"
    Image.open(good).convert("L").save(grey)
    for image, verdict in ((good, "normal"), (hole, "anomalous"), (grey, None)):
        target = tmp_path / f"{image.stem}_{verdict}.png"
        result = run("predict.py", "--model_path", model, "--picture_path", image, "--save_path", target)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "score" in result.stdout and target.is_file()
        assert (tmp_path / "predictions.csv").read_text().count("\n") == 2       # header + this image
        if verdict:
            assert f"-> {verdict}" in result.stdout
    folder = run("predict.py", "--model_path", model, "--picture_path", demo_root / "demo" / "test" / "stain",
                 "--save_path", tmp_path / "batch", "--batch_size", "2")
    assert folder.returncode == 0, folder.stderr[-3000:]
    assert folder.stdout.count("-> anomalous") == 5
    assert len(list((tmp_path / "batch" / "demo" / "predict").glob("*.png"))) == 5


def make_category(root, n_train, corrupt=False):
    from datasets.demo import render_sample
    good = root / "tiny" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(n_train):
        image, _ = render_sample(0, "train", i, image_size=64)
        Image.fromarray(image).save(good / f"{i:03d}.png")
    if corrupt:
        (good / "999.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_bad_inputs_exit_2_with_one_line(trained, tmp_path):
    out, _ = trained
    model = out / "demo" / "best.pdparams"
    damaged = tmp_path / "damaged.pdparams"
    damaged.write_bytes(model.read_bytes()[: 5000])
    empty = tmp_path / "empty"
    (empty / "tiny" / "train" / "good").mkdir(parents=True)
    corrupt = make_category(tmp_path / "corrupt", 3, corrupt=True)
    cases = [
        (("train.py", "--data_path", tmp_path / "missing"), "data folder not found"),
        (("train.py", "--data_path", corrupt, "--category", "bottle", "--backbone", "mobilenet_v2"),
         "unknown category"),
        (("train.py", "--data_path", empty, "--category", "tiny", "--backbone", "mobilenet_v2", "--val", "False"),
         "is empty"),
        (("train.py", "--data_path", corrupt, "--category", "tiny", "--backbone", "mobilenet_v2", "--val", "False",
          "--save_path", tmp_path / "corrupt_out", "--resize", "64", "--crop_size", "64"), "cannot read image"),
        (("train.py", "--val", "maybe"), "expected a boolean"),
        (("train.py", "--crop_size", "0"), "--crop_size must lie between 1 and 16384"),
        (("train.py", "--resize", "256", "--crop_size", "none", "--data_path", corrupt, "--category", "tiny"),
         "--crop_size none needs an exact --resize HxW"),
        (("train.py", "--false_alarm_rate", "1"), "expected a rate strictly between 0 and 1"),
        # each its own --save_path: run at once, they would otherwise wait for each other's folder lock
        (("val.py", "--model_path", model, "--backbone", "resnet18", "--save_path", tmp_path / "val1"),
         "was fitted with backbone mobilenet_v2"),
        (("val.py", "--model_path", damaged, "--save_path", tmp_path / "val2"), "not a PaDiM-Paddle model file"),
        (("predict.py", "--model_path", tmp_path / "nothing.pdparams"), "model file not found"),
        (("predict.py", "--model_path", model, "--picture_path", tmp_path / "nope.png"), "picture not found"),
    ]
    for (args, message), result in zip(cases, run_scripts([args for args, _ in cases])):
        assert result.returncode == 2, (args, result.stdout[-2000:], result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
    assert not (tmp_path / "corrupt_out" / "tiny" / "best.pdparams").exists()
    assert not [p for p in (tmp_path / "corrupt_out").rglob("*") if p.name.endswith(".tmp")]


def test_missing_imagenet_weights_is_an_error_not_random(tmp_path):
    corrupt = make_category(tmp_path / "data", 3)
    home = tmp_path / "home"
    home.mkdir()
    result = run("train.py", "--data_path", corrupt, "--category", "tiny", "--backbone", "resnet18", "--val", "False",
                 "--save_path", tmp_path / "o", env={"HOME": str(home)})
    assert result.returncode == 2
    assert "--pretrained_backbone" in result.stderr
    result = run("train.py", "--data_path", corrupt, "--category", "tiny", "--backbone", "resnet18", "--val", "False",
                 "--save_path", tmp_path / "o", "--pretrained_backbone", "random", "--resize", "64",
                 "--crop_size", "64", env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "o" / "tiny" / "best.pdparams").is_file()


@pytest.mark.parametrize("script", ["train", "val", "predict"])
def test_help_explains_every_flag(script):
    import importlib
    parser = importlib.import_module(script).build_parser()
    undocumented = [a.option_strings for a in parser._actions if not a.help]
    assert not undocumented
    assert run(f"{script}.py", "--help").returncode == 0


def test_category_all_fits_and_evaluates_every_category(tmp_path):
    from datasets.demo import generate_demo_category
    data = tmp_path / "data"
    for name, seed in (("alpha", 1), ("beta", 2)):
        generate_demo_category(data, category=name, seed=seed, n_train=8, n_test_good=2, n_per_defect=1,
                               image_size=128)
    out = tmp_path / "out"
    result = run("train.py", "--data_path", data, "--category", "all", "--backbone", "mobilenet_v2",
                 "--save_path", out, "--save_picture", "False", "--resize", "128", "--crop_size", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("alpha", "beta"):
        assert json.loads((out / name / "metrics.json").read_text())["n_test"] == 6
    table = (out / "summary.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["alpha", "beta", "mean"]
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == "category,image_auroc,pixel_auroc,pro_auc" and len(rows) == 4
    result = run("val.py", "--data_path", data, "--category", "all", "--save_path", out, "--save_picture", "False")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| mean |" in result.stdout
