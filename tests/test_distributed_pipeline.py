"""train.py and val.py under Paddle's launcher, 2 processes on the CPU (gloo), against the same
scripts in one process (the session's ``trained`` run on the demo, same flags).

The launches start together when the module's first test asks for them (each costs seconds of
start-up, mostly waiting); each test waits for its own.
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_distributed import LAUNCH_TIMEOUT_S, error_lines, start_launch
from tools.compare_distributed import score_rows
from utils.numbers import max_difference_of_largest

# The sums are float64 (models/padim.py's GaussianFit), so how the images are split over ranks
# or batches moves the model arrays by float32 rounding only. A wrong combination of the ranks'
# sums (a missing recentring, a rank counted twice, a shard left out) moves them by far more.
MODEL_TOLERANCE = 1e-6


class Run:
    def __init__(self, name: str, root: Path, script_and_args: list):
        self.out, self.log_dir = root / name, root / f"{name}_log"
        self.out.mkdir(exist_ok=True)
        self.process = start_launch([*script_and_args, "--save_path", self.out], self.log_dir)

    def wait(self) -> int:
        return self.process.wait(timeout=LAUNCH_TIMEOUT_S)

    def worker_log(self, rank: int) -> str:
        return (self.log_dir / f"workerlog.{rank}").read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def corrupt_copy(demo_root: Path, target: Path) -> Path:
    """The demo with its second training image cut short (rank 1's first image of 2): its header
    reads, its pixels do not, so it fails mid-fit."""
    shutil.copytree(demo_root / "demo", target / "demo")
    broken = sorted((target / "demo" / "train" / "good").iterdir())[1]
    data = broken.read_bytes()
    broken.write_bytes(data[:len(data) // 3])
    return broken


@pytest.fixture(scope="module")
def runs(demo_root, trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("launched")
    # val.py on a copy of the one-process model: the same model, so exactly the same results
    (root / "val" / "demo").mkdir(parents=True)
    shutil.copy(trained[0] / "demo" / "best.pdparams", root / "val" / "demo" / "best.pdparams")
    common = ["--backbone", "mobilenet_v2", "--save_picture", "False"]   # the flags of the `trained` fixture
    two = root / "two_categories"
    two.mkdir()
    for name in ("alpha", "beta"):
        (two / name).symlink_to(demo_root / "demo", target_is_directory=True)
    broken = corrupt_copy(demo_root, root / "broken_data")
    started = {
        "fit": Run("fit", root, ["train.py", "--data_path", demo_root, "--category", "demo", *common]),
        "all": Run("all", root, ["train.py", "--data_path", two, "--category", "all", *common]),
        "broken": Run("broken", root, ["train.py", "--data_path", root / "broken_data", "--category", "demo", *common]),
        "val": Run("val", root, ["val.py", "--data_path", demo_root, "--category", "demo", "--save_picture", "True"]),
    }
    started["broken"].image = broken
    yield started
    for run in started.values():
        run.kill()


def test_two_processes_fit_the_model_of_one(runs, trained):
    from models.model_file import load_model
    run = runs["fit"]
    assert run.wait() == 0, run.worker_log(0)[-3000:]
    assert "rank 1 of 2: 30 training images" in run.worker_log(1)
    assert "rank 1 of 2: 15 test images" in run.worker_log(1)
    single, double = trained[0] / "demo", run.out / "demo"
    one, two = load_model(single / "best.pdparams"), load_model(double / "best.pdparams")
    assert two.meta.n_train == one.meta.n_train == 60
    assert np.array_equal(two.arrays["idx"], one.arrays["idx"])
    for key in ("mean", "whitening"):
        assert max_difference_of_largest(two.arrays[key], one.arrays[key]) < MODEL_TOLERANCE, key
    for key, value in one.meta.train_statistics.items():
        assert two.meta.train_statistics[key] == pytest.approx(value, rel=1e-5), key
    # the metrics, the scores and the thresholds stored in the model, from all 30 test images
    expected, got = (json.loads((folder / "metrics.json").read_text()) for folder in (single, double))
    for key in ("image_auroc", "pixel_auroc", "pro_auc"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    for key in ("image_threshold", "pixel_threshold"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        assert getattr(two.meta.calibration, "f1_" + key) == got[key]
    # the calibrated thresholds: the same leave-one-out scores, from the summed model
    for key in ("image_threshold", "pixel_threshold"):
        assert getattr(two.meta.calibration, key) == pytest.approx(getattr(one.meta.calibration, key), rel=1e-5), key
    assert (got["n_test"], got["n_anomalous"]) == (expected["n_test"], expected["n_anomalous"])
    expected_rows, rows = score_rows(single), score_rows(double)
    assert [row[:2] for row in rows] == [row[:2] for row in expected_rows]   # same images, same order
    np.testing.assert_allclose([float(row[2]) for row in rows], [float(row[2]) for row in expected_rows], rtol=1e-5)
    assert sorted(path.name for path in double.iterdir()) == \
        [".padim.lock", "best.pdparams", "metrics.json", "scores.csv", "train.log"]


def test_two_processes_evaluate_a_model_as_one_does(runs, trained):
    run = runs["val"]
    assert run.wait() == 0, run.worker_log(0)[-3000:]
    from models.model_file import load_model
    single, double = trained[0] / "demo", run.out / "demo"
    expected, got = (json.loads((folder / "metrics.json").read_text()) for folder in (single, double))
    assert {k: v for k, v in got.items() if k != "model_path"} == {k: v for k, v in expected.items() if k != "model_path"}
    assert [row[1:] for row in score_rows(double)] == [row[1:] for row in score_rows(single)]
    stored = load_model(double / "best.pdparams").meta.calibration
    assert (stored.f1_image_threshold, stored.f1_pixel_threshold) == (expected["image_threshold"],
                                                                      expected["pixel_threshold"])
    # every figure once, each rank drawing its own half
    assert sorted(path.name for path in double.glob("demo_*.png")) == sorted(f"demo_{i}.png" for i in range(30))
    assert (double / "roc_curve.png").is_file()
    assert "15/15" in run.worker_log(1).split("| figures | demo |")[-1]


def test_category_all_gives_each_rank_whole_categories(runs, trained):
    run = runs["all"]
    assert run.wait() == 0, run.worker_log(0)[-3000:]
    first, second = run.worker_log(0), run.worker_log(1)
    assert "Training model for alpha" in first and "Training model for beta" not in first
    assert "Training model for beta" in second and "Training model for alpha" not in second
    expected = json.loads((trained[0] / "demo" / "metrics.json").read_text())
    with open(run.out / "summary.csv", newline="") as stream:
        table = {row["category"]: row for row in csv.DictReader(stream)}
    assert sorted(table) == ["alpha", "beta", "mean"]
    for category in ("alpha", "beta"):   # each one fitted and evaluated by one process, as `trained`
        got = json.loads((run.out / category / "metrics.json").read_text())
        for key in ("image_auroc", "pixel_auroc", "pro_auc", "image_threshold", "pixel_threshold"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (category, key)
        assert float(table[category]["pixel_auroc"]) == pytest.approx(expected["pixel_auroc"], abs=1e-4)


def test_a_bad_image_in_one_shard_stops_both_and_writes_no_model(runs):
    run = runs["broken"]
    assert run.wait() != 0
    own = error_lines(run.worker_log(1))
    assert len(own) == 1 and own[0].startswith(f"error: cannot read image {run.image}"), own
    cause = own[0].removeprefix("error: ")
    assert error_lines(run.worker_log(0)) == [f"error: rank 0 of 2: stopping, rank 1 failed during training shard: "
                                              f"{cause}"]
    assert "Traceback" not in run.worker_log(0) + run.worker_log(1)
    # no model, no temp file: only the folder's lock and the log of the attempt
    assert sorted(path.name for path in (run.out / "demo").iterdir()) == [".padim.lock", "train.log"]
