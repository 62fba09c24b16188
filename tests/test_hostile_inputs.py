"""Hostile inputs: crafted weights files, high-bit-depth and oversized images, masks that do not
fit, flags that escape their folders, datasets that cannot give a model or a ROC curve.

Each bad input must give one 'error: ' line on stderr and exit code 2, run nothing from the file,
and leave nothing behind (no model file appears, an existing one is unchanged).
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from datasets.mvtec import (DataError, ImageList, ImageTransform, MVTecDataset, check_category_name, mask_fits,
                            read_rgb, to_8bit)
from models.paddle_weights import load_paddle_weights
from models.torch_weights import WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_category(root: Path, name: str = "tiny", n_train: int = 3, n_good_test: int = 1, n_defective: int = 1,
                  size: int = 64, mask_size: tuple[int, int] | None = None) -> Path:
    """<root>/<name> in MVTec layout with random RGB images and one square defect per mask."""
    rng = np.random.default_rng(0)
    for i in range(n_train):
        _png(root / name / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    for i in range(n_good_test):
        _png(root / name / "test" / "good" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask_w, mask_h = mask_size or (size, size)
    for i in range(n_defective):
        _png(root / name / "test" / "hole" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        mask = np.zeros((mask_h, mask_w), np.uint8)
        mask[mask_h // 4: mask_h // 2, mask_w // 4: mask_w // 2] = 255
        _png(root / name / "ground_truth" / "hole" / f"{i:03d}_mask.png", mask)
    return root


def _png_file(header: bytes, pixels: bytes) -> bytes:
    """PNG bytes from an IHDR payload and the filtered, uncompressed pixel rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels))
            + chunk(b"IEND", b""))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height 8-bit RGB pixels (and holds none of them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_file(struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0), b""))
    return path


def png_rgb16(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(_png_file(struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0), rows))
    return path


def assert_user_error(result, message: str) -> None:
    """Exit code 2 and exactly one line on stderr, an 'error: ' line holding `message`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert message in lines[0], lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


class RunsShellCommand:
    """Pickles as os.system(command): what a malicious weights file holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ---------------------------------------------------------------- weights: no pickle runs

def test_pdparams_reader_matches_paddle_load(tmp_path):
    """paddle.save of a real network's state dict (protocol 4, the default, and 2) and of a
    converted backbone file: the restricted reader gives paddle.load's arrays exactly."""
    import paddle

    from models.backbones import FeatureExtractor, get_backbone_state
    from models.convert import save_state_atomically

    paddle.seed(3)
    network = paddle.vision.models.mobilenet_v2()
    files = {}
    for protocol in (4, 2):
        files[f"full-p{protocol}"] = tmp_path / f"full-p{protocol}.pdparams"
        paddle.save(network.state_dict(), str(files[f"full-p{protocol}"]), protocol=protocol)
    files["converted"] = tmp_path / "converted.pdparams"
    save_state_atomically(get_backbone_state(FeatureExtractor("resnet18")), str(files["converted"]))
    for label, path in files.items():
        expected = paddle.load(str(path), return_numpy=True)
        expected.pop("StructuredToParameterName@@", None)
        loaded = load_paddle_weights(path)
        assert list(loaded) == list(expected), label
        for key, array in expected.items():
            assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape, (label, key)
            np.testing.assert_array_equal(loaded[key], array, err_msg=f"{label} {key}")
    assert len(load_paddle_weights(files["full-p4"])) == len(network.state_dict())


def test_plain_pickles_of_arrays_are_read(tmp_path):
    """Any pickle protocol, Fortran order, big-endian, 0-d and empty arrays, an OrderedDict, and
    paddle.save's (name, array) tuples."""
    import collections

    arrays = {"fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "big": np.arange(5, dtype=">i4"),
              "scalar": np.full((), 3, np.float16), "empty": np.zeros((0, 3), bool)}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pdparams"
        path.write_bytes(pickle.dumps(collections.OrderedDict(arrays), protocol=protocol))
        loaded = load_paddle_weights(path)
        for key, array in arrays.items():
            assert loaded[key].shape == array.shape and loaded[key].dtype == array.dtype.newbyteorder("=")
            np.testing.assert_array_equal(loaded[key], array)
    path = tmp_path / "tuple.pdparams"
    path.write_bytes(pickle.dumps({"w": ("linear_0.w_0", np.eye(2, dtype=np.float32))}))
    np.testing.assert_array_equal(load_paddle_weights(path)["w"], np.eye(2))


def _payloads(marker: Path) -> dict[str, bytes]:
    """Ways a .pdparams can try to run `touch marker`, none of which may work."""
    command = f"touch {marker}"
    text = command.encode()
    source = f"__import__('os').system('{command}')".encode()
    return {
        "reduce-in-dict": pickle.dumps({"conv1.weight": RunsShellCommand(command)}),
        "reduce-protocol-0": pickle.dumps({"conv1.weight": RunsShellCommand(command)}, protocol=0),
        "top-level": pickle.dumps(RunsShellCommand(command), protocol=2),
        "builtins-eval": b"\x80\x02c__builtin__\neval\nX" + struct.pack("<I", len(source)) + source + b"\x85R.",
        "inst-opcode": b"(S'" + text + b"'\nios\nsystem\n.",
        "codecs-encode-other": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
        "bytes-allocation": b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.",
    }


@pytest.mark.parametrize("label", ["reduce-in-dict", "reduce-protocol-0", "top-level", "builtins-eval",
                                   "inst-opcode", "codecs-encode-other", "bytes-allocation"])
def test_malicious_pdparams_is_refused_without_running(tmp_path, label):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pdparams"
    path.write_bytes(_payloads(marker)[label])
    with pytest.raises(WeightsError, match="evil.pdparams") as info:
        load_paddle_weights(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_malicious_pdparams_through_the_command_lines(tmp_path):
    """train.py --pretrained_backbone and python -m models.convert --input: one line, exit 2, no
    marker, no model, no converted file."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(_payloads(marker)["reduce-in-dict"])
    data = make_category(tmp_path / "data")
    out = tmp_path / "out"
    result = run_script("train.py", "--data_path", data, "--category", "tiny", "--backbone", "resnet18",
                        "--pretrained_backbone", evil, "--save_path", out, "--val", "False",
                        "--resize", "64", "--crop_size", "64")
    assert_user_error(result, "refusing to load posix.system")
    assert not marker.exists()
    assert not (out / "tiny" / "best.pdparams").exists()

    output = tmp_path / "converted.pdparams"
    result = subprocess.run([sys.executable, "-m", "models.convert", "--backbone", "resnet18", "--input", str(evil),
                             "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert_user_error(result, "refusing to load posix.system")
    assert not marker.exists() and not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("converted")]  # no temp file either


class _DeclaredArray:
    """Pickles as numpy's array reconstruction with the given shape and (too little) data."""

    def __init__(self, shape, raw: bytes):
        self.shape, self.raw = shape, raw

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, self.shape, np.dtype("<f4"), False, self.raw)


def test_pdparams_sizes_are_checked_before_arrays_are_built(tmp_path):
    import tracemalloc

    # 4 GB declared, 16 bytes present.
    path = tmp_path / "declared.pdparams"
    path.write_bytes(pickle.dumps({"conv1.weight": _DeclaredArray((1 << 30,), b"\0" * 16)}))
    with pytest.raises(WeightsError, match="declared.pdparams: unsupported object .*16 bytes of data"):
        load_paddle_weights(path)

    # One 1 MB array referenced 2000 times (pickle's memo): 2 GB if each entry were built.
    shared = np.zeros(1 << 18, np.float32)
    path = tmp_path / "memo.pdparams"
    path.write_bytes(pickle.dumps({f"w{i}": shared for i in range(2000)}))
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match="memo.pdparams: truncated or crafted: declares 2097152000 bytes"):
            load_paddle_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_backbone_checks_declared_shapes_before_reading(tmp_path):
    """A .pdparams whose conv1.weight declares another shape is refused by the backbone's fit
    check, naming the key, and its arrays are never built."""
    from models.backbones import build_backbone

    import models.paddle_weights as paddle_weights

    path = tmp_path / "wrong.pdparams"
    path.write_bytes(pickle.dumps({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32)}))
    built = []
    original = paddle_weights._ArraySpec.build
    paddle_weights._ArraySpec.build = lambda self: built.append(self) or original(self)
    try:
        with pytest.raises(WeightsError, match=r"wrong.pdparams does not fit resnet18: .*missing keys.*"
                                               r"shape mismatches \(conv1.weight \(8, 3, 7, 7\) vs \(64, 3, 7, 7\)"):
            build_backbone("resnet18", weights=path)
    finally:
        paddle_weights._ArraySpec.build = original
    assert built == []


# ---------------------------------------------------------------- images

def test_high_bit_depth_images_give_the_8bit_pixels(tmp_path):
    """A 16-bit grey image holding v*257 reads exactly as the 8-bit image holding v; the same
    for big-endian 16-bit TIFF, 32-bit integer TIFF, float TIFF (v/255) and 16-bit RGB PNG."""
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    reference = read_rgb(_png(tmp_path / "grey8.png", values.astype(np.uint8)))
    assert np.asarray(reference)[..., 0].tolist() == values.tolist()
    files = {
        "I;16 png": _png(tmp_path / "grey16.png", values * 257),
        "I;16 tiff": _png(tmp_path / "grey16.tif", values * 257),
        "I;16B tiff": _png(tmp_path / "grey16b.tif", (values * 257).astype(">u2")),
        "I tiff": _png(tmp_path / "grey32.tif", (values.astype(np.int32) * 257)),
        "F tiff": _png(tmp_path / "float.tif", (values / 255.0).astype(np.float32)),
    }
    modes = {label: Image.open(path).mode for label, path in files.items()}
    assert modes == {"I;16 png": "I;16", "I;16 tiff": "I;16", "I;16B tiff": "I;16B", "I tiff": "I", "F tiff": "F"}
    for label, path in files.items():
        np.testing.assert_array_equal(np.asarray(read_rgb(path)), np.asarray(reference), err_msg=label)

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint16)
    np.testing.assert_array_equal(np.asarray(read_rgb(png_rgb16(tmp_path / "rgb16.png", rgb * 257))), rgb)

    # 16-bit masks as well: 65535 is defect, 0 is not.
    mask = np.zeros((64, 64), np.uint16)
    mask[8:24, 8:40] = 65535
    transform = ImageTransform(64, 64)
    np.testing.assert_array_equal(transform.mask(_png(tmp_path / "mask16.png", mask)), mask > 0)


def test_to_8bit_refuses_values_outside_the_range():
    assert to_8bit(Image.new("L", (2, 2))).mode == "L"
    with pytest.raises(DataError, match="mode F values outside 0..1"):
        to_8bit(Image.fromarray(np.full((2, 2), 2.0, np.float32)), "bright.tif")
    with pytest.raises(DataError, match="mode I values outside 0..65535"):
        to_8bit(Image.fromarray(np.full((2, 2), -1, np.int32)), "negative.tif")
    with pytest.raises(DataError, match="values outside"):
        to_8bit(Image.fromarray(np.full((2, 2), np.nan, np.float32)), "nan.tif")


@pytest.mark.parametrize("warning_filter", ["error", "ignore"])
def test_decompression_bombs_and_broken_images_are_data_errors(tmp_path, warning_filter):
    """Above PIL's pixel limit PIL only warns (above twice the limit it raises): both are errors,
    whether or not the warning filter datasets.mvtec installs is in force."""
    import warnings

    over_twice = png_header_only(tmp_path / "huge.png", 20000, 20000)
    over_once = png_header_only(tmp_path / "large.png", 10000, 9000)
    with warnings.catch_warnings():
        warnings.simplefilter(warning_filter, Image.DecompressionBombWarning)
        for path in (over_twice, over_once):
            with pytest.raises(DataError, match=f"image {path} is too large to decode safely"):
                read_rgb(path)
            with pytest.raises(DataError, match=f"mask {path} is too large"):
                ImageTransform(64, 64).mask(path)
            with pytest.raises(DataError, match="too large"):
                ImageList(path).load(0)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(tmp_path / "whole.png", np.zeros((64, 64, 3), np.uint8)).read_bytes()[:60])
    with pytest.raises(DataError, match=f"cannot read image {truncated}"):
        read_rgb(truncated)
    with pytest.raises(DataError, match=f"cannot read image {tmp_path / 'whole.png'}"):
        (tmp_path / "whole.png").write_bytes(b"GIF89a not really")
        read_rgb(tmp_path / "whole.png")


@pytest.mark.parametrize("where", ["train", "test", "mask"])
def test_decompression_bomb_through_train_py(tmp_path, where):
    data = make_category(tmp_path / "data")
    target = {"train": data / "tiny" / "train" / "good" / "001.png",
              "test": data / "tiny" / "test" / "good" / "000.png",
              "mask": data / "tiny" / "ground_truth" / "hole" / "000_mask.png"}[where]
    png_header_only(target, 20000, 20000)
    out = tmp_path / "out"
    result = run_script("train.py", "--data_path", data, "--category", "tiny", "--backbone", "mobilenet_v2",
                        "--save_path", out, "--resize", "64", "--crop_size", "64")
    assert_user_error(result, f"{target} is too large to decode safely")
    assert files_under(out) == []


# ---------------------------------------------------------------- masks

def test_mask_size_rule():
    assert mask_fits((900, 900), (900, 900))
    assert mask_fits((450, 450), (900, 900)) and mask_fits((1800, 1800), (900, 900))
    assert mask_fits((334, 250), (1001, 751))           # 1001x751 / 3, each side rounded
    assert mask_fits((333, 250), (1000, 750))
    assert not mask_fits((900, 600), (900, 900))
    assert not mask_fits((1000, 740), (1000, 750))
    assert not mask_fits((0, 10), (10, 10))


def test_mask_of_the_same_aspect_ratio_is_resized_with_nearest(tmp_path):
    """A half-size mask gives the full-size mask's pixels when its defect lies on the 2-pixel grid."""
    full = np.zeros((96, 128), np.uint8)
    full[10:40, 30:90] = 255
    transform = ImageTransform(64, (64, 80))
    from_full = transform.mask(_png(tmp_path / "full.png", full), (128, 96))
    from_half = transform.mask(_png(tmp_path / "half.png", full[::2, ::2]), (128, 96))
    np.testing.assert_array_equal(from_half, from_full)
    assert from_full.sum() > 0
    with pytest.raises(DataError, match="is 128x48 but its image is 128x96"):
        transform.mask(_png(tmp_path / "squashed.png", full[::2]), (128, 96))


def test_every_mask_is_checked_when_the_test_set_is_built(tmp_path):
    data = make_category(tmp_path / "ok", n_defective=3, mask_size=(32, 32))
    dataset = MVTecDataset(data, "tiny", "test", 64, 64)
    assert [s.label for s in dataset.samples] == [0, 1, 1, 1]
    assert dataset.load(1)[1].sum() == 16 * 16   # the 8x8 defect of the 32x32 mask, doubled

    data = make_category(tmp_path / "stretched", n_defective=3)
    _png(data / "tiny" / "ground_truth" / "hole" / "002_mask.png", np.zeros((64, 40), np.uint8))
    with pytest.raises(DataError, match="002_mask.png is 40x64 but its image .*002.png is 64x64"):
        MVTecDataset(data, "tiny", "test", 64, 64)

    data = make_category(tmp_path / "missing", n_defective=3)
    (data / "tiny" / "ground_truth" / "hole" / "001_mask.png").unlink()
    (data / "tiny" / "ground_truth" / "hole" / "002_mask.png").unlink()
    with pytest.raises(DataError, match="mask not found: .*001_mask.png and 1 more"):
        MVTecDataset(data, "tiny", "test", 64, 64)


def test_missing_mask_stops_val_py_before_the_model_changes(trained, tmp_path):
    """val.py on a model with calibrated thresholds: a missing mask stops it before scoring,
    the model file stays byte for byte, and no results are written."""
    from datasets.demo import generate_demo_category

    out, _ = trained
    model = out / "demo" / "best.pdparams"
    before = model.read_bytes()
    data = tmp_path / "data"
    generate_demo_category(data, n_train=2, n_test_good=1, n_per_defect=1, image_size=64)
    next((data / "demo" / "ground_truth").rglob("*_mask.png")).unlink()
    results = tmp_path / "results"
    result = run_script("val.py", "--data_path", data, "--category", "demo", "--model_path", model,
                        "--save_path", results, "--save_picture", "False")
    assert_user_error(result, "mask not found")
    assert model.read_bytes() == before
    assert not [p for p in files_under(results) if p.suffix in (".csv", ".json", ".png")]


# ---------------------------------------------------------------- flags and datasets

@pytest.mark.parametrize("category", ["../data", "/etc", "", ".", "..", "a/b", "tiny/../tiny", "a\\b"])
def test_category_must_be_a_plain_folder_name(category):
    with pytest.raises(DataError, match="category must be a plain folder name"):
        check_category_name(category)


def test_category_paths_are_refused_by_every_script(tmp_path):
    data = make_category(tmp_path / "data")
    out = tmp_path / "out"
    for script, category in (("train.py", "../data/tiny"), ("train.py", str(data / "tiny")), ("val.py", ".."),
                             ("predict.py", "../x"), ("train.py", "")):
        result = run_script(script, "--data_path" if script != "predict.py" else "--picture_path", data,
                            "--category", category, "--save_path", out)
        assert_user_error(result, "category must be a plain folder name")
    assert check_category_name("all") == "all" and check_category_name("metal_nut") == "metal_nut"
    assert not out.exists()


def test_impossible_datasets_and_flags_stop_before_fitting(tmp_path):
    """Each one line, exit 2, nothing written under --save_path."""
    cases = {
        "one-image": (make_category(tmp_path / "one", n_train=1), (), "has 1 image(s), at least 3 are needed"),
        "no-defects": (make_category(tmp_path / "nodefect", n_defective=0), (),
                       "has no defective images"),
        "no-good": (make_category(tmp_path / "nogood", n_good_test=0), (), "has no good images"),
        "d-reduced": (make_category(tmp_path / "d"), ("--d_reduced", "449", "--backbone", "resnet18"),
                      "--d_reduced 449 is more than the 448 channels of resnet18"),
        "d-reduced-mobilenet": (make_category(tmp_path / "dm"), ("--d_reduced", "153"),
                                "--d_reduced 153 is more than the 152 channels of mobilenet_v2"),
    }
    for label, (data, extra, message) in cases.items():
        out = tmp_path / f"out-{label}"
        args = ("--data_path", data, "--category", "tiny", "--save_path", out, "--resize", "64", "--crop_size", "64")
        if "--backbone" not in extra:
            args += ("--backbone", "mobilenet_v2")
        result = run_script("train.py", *args, *extra)
        assert_user_error(result, message)
        assert files_under(out) == [], label
    # Without --val the test split is not needed: the same data passes the dataset checks.
    MVTecDataset(tmp_path / "nodefect", "tiny", "train", 64, 64)


def test_val_py_refuses_a_test_split_without_defects(trained, tmp_path):
    out, _ = trained
    model = out / "demo" / "best.pdparams"
    before = model.read_bytes()
    data = make_category(tmp_path / "data", name="demo", n_defective=0)
    result = run_script("val.py", "--data_path", data, "--category", "demo", "--model_path", model,
                        "--save_path", tmp_path / "results", "--save_picture", "False")
    assert_user_error(result, "has no defective images")
    assert model.read_bytes() == before


def test_unreadable_folders_are_data_errors(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root, who is never denied)."""
    data = make_category(tmp_path / "data")
    denied = {data / "tiny" / "test", data / "tiny" / "train"}
    original = Path.iterdir

    def iterdir(self):
        if self in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    for split in ("train", "test"):
        with pytest.raises(DataError, match=f"cannot read {data / 'tiny' / split}: Permission denied"):
            MVTecDataset(data, "tiny", split, 64, 64)
    denied.add(data)
    from datasets.mvtec import list_categories
    with pytest.raises(DataError, match="cannot read data folder .*Permission denied"):
        list_categories(data)


def _without_root_file_access() -> list[str]:
    """A command prefix under which permissions apply: as root, drop the capabilities that
    bypass them (setpriv), else nothing."""
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a folder cannot be made unreadable")
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root and setpriv cannot drop capabilities here")
    return prefix


@pytest.mark.parametrize("split", ["train", "test"])
def test_unreadable_folder_through_train_py(tmp_path, split):
    prefix = _without_root_file_access()
    data = make_category(tmp_path / "data")
    folder = data / "tiny" / split
    folder.chmod(0)
    try:
        result = subprocess.run([*prefix, sys.executable, str(REPO_ROOT / "train.py"), "--data_path", str(data),
                                 "--category", "tiny", "--backbone", "mobilenet_v2", "--save_path",
                                 str(tmp_path / "out"), "--resize", "64", "--crop_size", "64"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        folder.chmod(0o755)
    assert_user_error(result, f"cannot read {folder}: Permission denied")
    assert not (tmp_path / "out").exists()
