"""The model file as an untrusted input: its metadata against ModelMeta's schema, its arrays'
declared sizes before any is read, non-finite values, and metadata updates that must name the
model on disk. Files are tiny and hand-made (written here without the project's checks)."""
import json
import logging
import sys
import tracemalloc
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from models.calibration import Calibration
from models.model_file import (FORMAT, FORMAT_VERSION, KNOWN_BACKBONES, ModelFileError, ModelMeta, all_finite,
                               display_range, load_model, read_meta, save_model, update_meta)

CALIBRATION = Calibration(image_threshold=3.0, pixel_threshold=2.5, false_alarm_rate=0.1, pixel_false_alarm_rate=0.001,
                          n_calibration=10, guaranteed_rate=1 / 11, source="calibrated by hand")


def small_meta(**changes) -> ModelMeta:
    values = dict(category="tiny", backbone="mobilenet_v2", weights_source="random",
                  stage_names=["features.3", "features.6", "features.13"], channels=[24, 32, 96], d=5, seed=7,
                  eps=0.01, sigma=4.0, resize=20, crop_size=[16, 14], feature_grid=[4, 4],
                  normalisation={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, n_train=10,
                  train_statistics={"n_images": 10, "pixel_median": 1.0, "pixel_p99": 2.0, "pixel_max": 3.0,
                                    "image_score_mean": 2.5, "image_score_max": 3.0},
                  calibration=CALIBRATION)
    values.update(changes)
    return ModelMeta(**values)


def small_arrays(seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"idx": np.array([3, 40, 7, 100, 151]), "mean": rng.normal(size=(16, 5)).astype(np.float32),
              "whitening": rng.normal(size=(16, 5, 5)).astype(np.float32)}
    return arrays, {"features.0.0.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32)}


def record_of(meta: ModelMeta) -> dict:
    return dict(meta.to_dict(), format=FORMAT, format_version=FORMAT_VERSION)


def write_raw(path, record, arrays, backbone_state, compress=False):
    """A model file written as np.savez would, with none of save_model's checks."""
    payload = {"__meta__": np.frombuffer(json.dumps(record).encode(), dtype=np.uint8), **arrays,
               **{"backbone/" + key: value for key, value in backbone_state.items()}}
    with open(path, "wb") as stream:
        (np.savez_compressed if compress else np.savez)(stream, **payload)
    return path


@pytest.fixture
def good_file(tmp_path):
    arrays, backbone = small_arrays()
    return save_model(tmp_path / "best.pdparams", small_meta(), arrays, backbone), arrays, backbone


def assert_one_line_error(call, *fragments):
    with pytest.raises(ModelFileError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_round_trip_keeps_metadata_and_arrays(good_file):
    path, arrays, backbone = good_file
    loaded = load_model(path)
    assert loaded.meta == read_meta(path)
    assert loaded.meta.to_dict() == small_meta(model_id=loaded.meta.model_id, created=loaded.meta.created).to_dict()
    assert loaded.meta.total_channels == 152 and len(loaded.meta.model_id) == 32
    for key in arrays:
        np.testing.assert_array_equal(loaded.arrays[key], arrays[key])
    np.testing.assert_array_equal(loaded.backbone_state["features.0.0.weight"], backbone["features.0.0.weight"])
    assert small_meta().model_id != small_meta().model_id           # drawn anew by every fit


def test_exact_resize_without_crop_round_trips(tmp_path):
    arrays, backbone = small_arrays()
    path = save_model(tmp_path / "m.pdparams", small_meta(resize=[16, 14], crop_size=None), arrays, backbone)
    meta = read_meta(path)
    assert (meta.resize, meta.crop_size, meta.image_size) == ([16, 14], None, [16, 14])
    assert json.loads(json.dumps(meta.to_dict()))["crop_size"] is None


def damaged(record, change):
    record = json.loads(json.dumps(record))
    change(record)
    return record


DAMAGED_METADATA = {
    "missing key": (lambda r: r.pop("d"), "lacks d"),
    "list instead of a mapping": (lambda r: r.update(train_statistics=[1.0, 2.0]),
                                  "train_statistics must be a mapping"),
    "unknown backbone": (lambda r: r.update(backbone="resnet1000"), "unknown backbone 'resnet1000'"),
    "non-numeric threshold": (lambda r: r["calibration"].update(image_threshold="high"),
                              "calibration: image_threshold must be a finite number"),
    "NaN threshold": (lambda r: r["calibration"].update(pixel_threshold=float("nan")),
                      "pixel_threshold must be a finite"),
    "F1-max verdicts without F1-max thresholds": (lambda r: r["calibration"].update(verdicts="f1_max"),
                                                  "need the F1-max thresholds"),
    "no calibration": (lambda r: r.pop("calibration"), "lacks calibration"),
    "thresholds of format 2": (lambda r: r.update(thresholds={"image_threshold": 1.0, "pixel_threshold": 1.0,
                                                              "source": "x"}), "unknown key(s) thresholds"),
    "crop does not fit the grid": (lambda r: r.update(feature_grid=[4, 5]), "does not fit the input size [16, 14]"),
    "no crop with a shorter-side resize": (lambda r: r.update(crop_size=None), "needs resize [H, W]"),
    "crop larger than the exact resize": (lambda r: r.update(resize=[15, 40]), "larger than resize"),
    "resize of three sides": (lambda r: r.update(resize=[15, 40, 2]), "resize must be a list of 2"),
    "d above the channel count": (lambda r: r.update(d=200), "d must be in 1..152"),
    "channels disagree with their sum": (lambda r: r.update(total_channels=150), "total_channels"),
    "NaN eps": (lambda r: r.update(eps=float("nan")), "eps must be finite"),
    "zero sigma": (lambda r: r.update(sigma=0), "sigma must be > 0"),
    "negative size": (lambda r: r.update(resize=-3), "resize"),
    "boolean as a count": (lambda r: r.update(n_train=True), "n_train must be an integer"),
    "string statistic": (lambda r: r["train_statistics"].update(pixel_max="3"), "train_statistics.pixel_max"),
    "unknown key": (lambda r: r.update(colour="red"), "unknown key(s) colour"),
    "no model id": (lambda r: r.pop("model_id"), "lacks model_id"),
}


@pytest.mark.parametrize("case", list(DAMAGED_METADATA))
def test_damaged_metadata_is_one_line(tmp_path, case):
    change, fragment = DAMAGED_METADATA[case]
    arrays, backbone = small_arrays()
    path = write_raw(tmp_path / "m.pdparams", damaged(record_of(small_meta()), change), arrays, backbone)
    assert_one_line_error(lambda: read_meta(path), "damaged metadata", fragment)
    assert_one_line_error(lambda: load_model(path), fragment)


def test_metadata_that_is_not_a_mapping_or_from_another_version(tmp_path):
    arrays, backbone = small_arrays()
    path = write_raw(tmp_path / "list.pdparams", [record_of(small_meta())], arrays, backbone)
    assert_one_line_error(lambda: read_meta(path), "not a PaDiM-Paddle model file")
    old = write_raw(tmp_path / "old.pdparams", dict(record_of(small_meta()), format_version=2), arrays, backbone)
    assert_one_line_error(lambda: read_meta(old), "format version 2", "refit")


def test_predict_reports_damaged_metadata_in_one_line(tmp_path, monkeypatch, capsys):
    import predict
    from utils.cli import run_cli
    arrays, backbone = small_arrays()
    path = write_raw(tmp_path / "m.pdparams", damaged(record_of(small_meta()), lambda r: r.update(backbone=[1])),
                     arrays, backbone)
    monkeypatch.setattr(sys, "argv", ["predict.py", "--model_path", str(path), "--picture_path", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        run_cli(predict.main)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone must be a non-empty string" in err[0], err


def test_array_shapes_are_checked_against_the_metadata_before_reading(tmp_path):
    meta = small_meta()
    arrays, backbone = small_arrays()
    arrays["whitening"] = np.zeros((4096, 5, 5), np.float32)
    path = write_raw(tmp_path / "m.pdparams", record_of(meta), arrays, backbone)
    assert_one_line_error(lambda: load_model(path), "whitening has shape (4096, 5, 5), expected (16, 5, 5)")
    arrays, backbone = small_arrays()
    arrays["idx"] = arrays["idx"].astype(np.float32)
    path = write_raw(tmp_path / "f.pdparams", record_of(meta), arrays, backbone)
    assert_one_line_error(lambda: load_model(path), "idx has dtype float32")


def test_a_member_smaller_than_its_header_declares_is_refused(tmp_path):
    arrays, backbone = small_arrays()
    path = write_raw(tmp_path / "m.pdparams", record_of(small_meta()), arrays, backbone)
    with zipfile.ZipFile(path, "a") as archive:
        with archive.open("backbone/huge.npy", "w") as stream:
            np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (1 << 20, 1 << 10)})
            stream.write(bytes(64))
    assert_one_line_error(lambda: read_meta(path), "backbone/huge declares shape (1048576, 1024)")


def test_zip_bomb_is_refused_without_reading_it(tmp_path):
    """A compressed whitening of 256 MiB of zeros (a 1 MB file), consistent with its metadata:
    refused from the zip directory, with no allocation near its declared size."""
    meta = small_meta(d=100, crop_size=[328, 328], feature_grid=[82, 82])
    path = tmp_path / "bomb.pdparams"
    shape = (82 * 82, 100, 100)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("__meta__.npy", _npy_bytes(np.frombuffer(json.dumps(record_of(meta)).encode(), np.uint8)))
        archive.writestr("idx.npy", _npy_bytes(np.arange(100)))
        archive.writestr("mean.npy", _npy_bytes(np.zeros((shape[0], 100), np.float32)))
        with archive.open("whitening.npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
            chunk = bytes(16 << 20)
            for _ in range(shape[0] * 100 * 100 * 4 // len(chunk)):
                stream.write(chunk)
    assert path.stat().st_size < 4 << 20
    tracemalloc.start()
    try:
        assert_one_line_error(lambda: load_model(path), "member '__meta__.npy' is compressed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_members_may_not_declare_more_bytes_than_the_file_holds(tmp_path):
    """A stored member whose zip directory entry claims 3 GiB in a file of a few kB."""
    arrays, backbone = small_arrays()
    path = write_raw(tmp_path / "m.pdparams", record_of(small_meta()), arrays, backbone)
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"whitening.npy") - 46            # the central directory's record of the member
    assert data[entry:entry + 4] == b"PK\x01\x02"
    data[entry + 20:entry + 28] = (3 << 30).to_bytes(4, "little") * 2      # compressed and plain sizes
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("whitening.npy").file_size == 3 << 30
    assert_one_line_error(lambda: read_meta(path), "its members declare", f"the file has {len(data)}")


def _npy_bytes(array) -> bytes:
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("where", ["mean", "whitening", "backbone"])
def test_non_finite_values_are_refused_at_load_and_save(tmp_path, where):
    arrays, backbone = small_arrays()
    if where == "backbone":
        backbone["features.0.0.weight"][1, 2, 0, 1] = np.nan
    else:
        arrays[where].reshape(-1)[-1] = np.inf if where == "whitening" else np.nan
    path = write_raw(tmp_path / "m.pdparams", record_of(small_meta()), arrays, backbone)
    read_meta(path)                                   # the metadata alone is fine
    fragment = "features.0.0.weight" if where == "backbone" else where
    assert_one_line_error(lambda: load_model(path), fragment, "NaN or infinite")
    assert_one_line_error(lambda: save_model(tmp_path / "s.pdparams", small_meta(), arrays, backbone), fragment)
    assert not (tmp_path / "s.pdparams").exists()


def test_finite_check_runs_slice_by_slice(monkeypatch):
    import models.model_file as model_file
    monkeypatch.setattr(model_file, "FINITE_CHECK_ELEMENTS", 7)
    values = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for position in (0, 6, 7, 59):
        broken = values.copy()
        broken.reshape(-1)[position] = np.nan
        assert not all_finite(broken) and not all_finite(np.asfortranarray(broken))
    assert all_finite(values) and all_finite(np.arange(5))


def test_update_meta_writes_only_into_the_model_it_describes(good_file):
    path, arrays, backbone = good_file
    evaluated = read_meta(path)
    evaluated.calibration = replace(CALIBRATION, verdicts="f1_max", f1_image_threshold=4.0, f1_pixel_threshold=3.5)
    update_meta(path, evaluated)
    loaded = load_model(path)
    assert loaded.meta.calibration == evaluated.calibration and loaded.meta.model_id == evaluated.model_id
    np.testing.assert_array_equal(loaded.arrays["whitening"], arrays["whitening"])

    new_arrays, new_backbone = small_arrays(seed=1)       # train.py saves a new model meanwhile
    save_model(path, small_meta(), new_arrays, new_backbone)
    evaluated.calibration = replace(CALIBRATION, f1_image_threshold=9.0, f1_pixel_threshold=9.0)
    assert_one_line_error(lambda: update_meta(path, evaluated), "holds another model")
    after = load_model(path)
    assert after.meta.calibration == CALIBRATION
    np.testing.assert_array_equal(after.arrays["whitening"], new_arrays["whitening"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]          # no temp file left


def test_decision_thresholds_and_colour_scale():
    meta = small_meta()
    assert meta.decision_thresholds() == {"image_threshold": 3.0, "pixel_threshold": 2.5,
                                          "source": "calibrated by hand"}
    assert meta.display_range() == (1.0, 4.0)                          # median 1, pixel threshold 2.5 mid-scale
    # val.py's F1-max pair, when the verdicts use it: the pixel threshold capped at the image threshold
    meta.calibration = replace(CALIBRATION, verdicts="f1_max", f1_image_threshold=2.0, f1_pixel_threshold=2.5)
    assert meta.decision_thresholds()["image_threshold"] == 2.0
    assert meta.display_range() == (1.0, 3.0)
    assert meta.display_range(pixel_threshold=1.5) == (1.0, 2.0)
    assert display_range(2.0, 1.0) == pytest.approx((2.0, 1.0 + 1e-6))   # a threshold below the median


def test_schema_knows_the_backbones_and_their_grid():
    from models.backbones import BACKBONES, build_backbone
    from models.model_file import feature_grid_for
    from models.pipeline import feature_grid_of
    assert KNOWN_BACKBONES == BACKBONES
    for name in ("resnet18", "mobilenet_v2"):
        backbone = build_backbone(name, "random")
        for size in ((63, 65), (64, 30), (9, 1)):
            assert list(feature_grid_of(backbone, size)) == feature_grid_for(size), (name, size)


def test_evaluation_writes_nothing_when_the_model_was_replaced_meanwhile(trained, demo_root, tmp_path, monkeypatch):
    """val.py while train.py saves to the same path: the new model keeps its metadata and no
    result file of the old evaluation is written beside it."""
    import shutil

    import models.evaluate as evaluate
    logger = logging.getLogger("padim")
    model_path = tmp_path / "demo" / "best.pdparams"
    model_path.parent.mkdir()
    shutil.copy(trained[0] / "demo" / "best.pdparams", model_path)
    fitted = load_model(model_path)
    with pytest.raises(ModelFileError, match="replaced by another run"):
        evaluate.evaluate_category(model_path, demo_root, "demo", tmp_path, model_id="another fit", logger=logger)
    real_score = evaluate.score_dataset

    def score_while_train_saves(*args, **kwargs):
        scored = real_score(*args, **kwargs)
        fitted.meta.model_id = "the new fit"
        fitted.meta.calibration = replace(fitted.meta.calibration, f1_image_threshold=None, f1_pixel_threshold=None)
        save_model(model_path, fitted.meta, fitted.arrays, fitted.backbone_state)
        return scored

    monkeypatch.setattr(evaluate, "score_dataset", score_while_train_saves)
    with pytest.raises(ModelFileError, match="holds another model"):
        evaluate.evaluate_category(model_path, demo_root, "demo", tmp_path, save_picture=False, logger=logger)
    after = read_meta(model_path)
    assert after.model_id == "the new fit" and after.calibration.f1_image_threshold is None
    assert [p.name for p in model_path.parent.iterdir()] == ["best.pdparams"]
