"""utils.predictions: unique picture names that mirror the input tree, and predictions.csv."""
from __future__ import annotations

import csv
import io
import os

import pytest

from datasets.mvtec import DataError
from utils.predictions import (COLUMNS, PREDICTIONS_FILE, failed, picture_paths, predictions_csv, scored, summary,
                               write_predictions)


def _touch(root, *relatives):
    paths = []
    for relative in relatives:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        paths.append(path)
    return paths


def test_same_named_files_in_different_folders_mirror_the_tree(tmp_path):
    root = tmp_path / "in"
    inputs = _touch(root, "test/broken_large/000.png", "test/good/000.png")
    out = tmp_path / "out"
    assert picture_paths(inputs, root, out) == [out / "test/broken_large/000.png", out / "test/good/000.png"]


def test_same_stem_with_other_suffixes_keeps_the_suffix(tmp_path):
    inputs = _touch(tmp_path / "in", "a.jpg", "a.png", "a.bmp")
    pictures = picture_paths(inputs, tmp_path / "in", tmp_path / "out")
    assert [p.name for p in pictures] == ["a.jpg.png", "a.png", "a.bmp.png"]


def test_names_that_still_meet_get_a_counter_in_input_order(tmp_path):
    # a.jpg -> a.jpg.png, the same as the file a.jpg.png; A.png and a.png are one file on some disks
    inputs = _touch(tmp_path / "in", "a.jpg", "a.jpg.png", "A.png", "a.png")
    pictures = picture_paths(inputs, tmp_path / "in", tmp_path / "out")
    assert [p.name for p in pictures] == ["a.jpg.png", "a.jpg~2.png", "A.png", "a~2.png"]
    assert len({p.name.casefold() for p in pictures}) == len(inputs)


def test_a_single_file_gives_its_own_name(tmp_path):
    (image,) = _touch(tmp_path, "deep/folder/x.jpeg")
    assert picture_paths([image], image, tmp_path / "out") == [tmp_path / "out" / "x.jpeg.png"]


def test_a_picture_never_replaces_an_input(tmp_path):
    inputs = _touch(tmp_path, "good/000.png")
    with pytest.raises(DataError, match="replace the input"):
        picture_paths(inputs, tmp_path, tmp_path)
    # a .jpg input beside its picture name is fine: the picture is x.jpg.png
    jpg = _touch(tmp_path / "j", "x.jpg")
    assert picture_paths(jpg, tmp_path / "j", tmp_path / "j") == [tmp_path / "j" / "x.jpg.png"]


def test_csv_has_one_row_per_input_with_error_rows(tmp_path):
    rows = [
        scored("in/test/good/000.png", 12.5, 14.0, 0, "out/test/good/000.png"),
        scored("in/test/crack/000.png", 20.25, 14.0, 321, "out/test/crack/000.png"),
        failed("in/test/crack/001.png", 14.0, "cannot read image in/test/crack/001.png:\n truncated"),
        scored("in/test/good/001.png", 14.0, 14.0, 0),      # equal to the threshold: normal
    ]
    written = write_predictions(tmp_path, rows)
    assert written == tmp_path / PREDICTIONS_FILE
    text = written.read_text(encoding="utf-8")
    assert text == predictions_csv(rows)
    assert text.splitlines() == [
        "path,image_score,threshold,verdict,region_pixels,picture,error",
        "in/test/good/000.png,12.500000,14.000000,normal,0,out/test/good/000.png,",
        "in/test/crack/000.png,20.250000,14.000000,anomalous,321,out/test/crack/000.png,",
        "in/test/crack/001.png,,14.000000,error,,,cannot read image in/test/crack/001.png: truncated",
        "in/test/good/001.png,14.000000,14.000000,normal,0,,",
    ]
    assert tuple(text.splitlines()[0].split(",")) == COLUMNS
    assert summary(rows) == "4 image(s), 1 anomalous, 1 failed"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]     # no temp file left


def test_hostile_file_names_stay_one_csv_field(tmp_path):
    name = 'in/we,ird "name"\nx.png'
    rows = list(csv.reader(io.StringIO(predictions_csv([scored(name, 1.0, 2.0, 0)]))))
    assert rows[1][0] == name and len(rows[1]) == len(COLUMNS)


def test_a_row_never_disagrees_with_its_region():
    with pytest.raises(ValueError, match="anomalous verdict with a region of 0"):
        scored("x.png", 15.0, 14.0, 0)
    with pytest.raises(ValueError, match="normal verdict with a region of 12"):
        scored("x.png", 13.0, 14.0, 12)
