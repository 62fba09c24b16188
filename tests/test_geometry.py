"""datasets.geometry: the two flags, the original's Resize(int) -> CenterCrop (checked against
paddle.vision.transforms), exact HxW without a crop, and the notice when a crop discards much."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets.geometry import CROP_NOTICE_SHARE, Geometry, GeometryError, parse_crop, parse_resize


@pytest.mark.parametrize("text, expected", [
    ("256", 256), (256, 256), ("224x448", (224, 448)), ("224,448", (224, 448)), ("224X448", (224, 448)),
    ([100, 300], (100, 300)),
])
def test_parse_resize(text, expected):
    assert parse_resize(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("none", None), ("None", None), (None, None), ("224", (224, 224)), ("224x320", (224, 320)), ([7, 9], (7, 9)),
])
def test_parse_crop(text, expected):
    assert parse_crop(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "axb", "1x2x3", "", "99999", "x224", True])
def test_bad_sizes_are_one_clear_error(text):
    with pytest.raises(GeometryError, match="--resize"):
        parse_resize(text)


def test_combinations_that_cannot_work():
    with pytest.raises(GeometryError, match="needs an exact --resize HxW"):
        Geometry(256, None)
    with pytest.raises(GeometryError, match="larger than --resize"):
        Geometry((200, 400), (224, 224))
    with pytest.raises(GeometryError, match="larger than the resized image"):
        Geometry(256, (224, 320)).apply(Image.new("RGB", (300, 600)))   # portrait: 256 wide


@pytest.mark.parametrize("size", [(900, 900), (300, 301), (280, 100), (100, 280), (256, 640), (257, 199)])
@pytest.mark.parametrize("resize, crop", [(256, 224), (256, (200, 240)), ((224, 448), None), ((300, 200), (224, 100))])
def test_matches_paddle_vision_transforms(size, resize, crop):
    """The original used paddle.vision.transforms.Resize -> CenterCrop with PIL bilinear."""
    from paddle.vision import transforms
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    geometry = Geometry(resize, crop)
    steps = [transforms.Resize(resize)] + ([transforms.CenterCrop(geometry.crop)] if crop is not None else [])
    expected = np.asarray(transforms.Compose(steps)(image))
    np.testing.assert_array_equal(np.asarray(geometry.apply(image)), expected)
    assert geometry.output_size(*size) == expected.shape[:2] == geometry.image_size


def test_shorter_side_truncates_like_int():
    # 100 x 280 (H x W): 256 * 280 / 100 = 716.8 -> 716; 257 x 199: 256 * 257 / 199 = 330.6 -> 330
    assert Geometry(256).resized_size(280, 100) == (256, 716)
    assert Geometry(256).resized_size(199, 257) == (330, 256)
    assert Geometry((10, 20), None).resized_size(5, 5) == (10, 20)


def _tile_with_border_defect():
    """A 100 x 280 grey tile with a white 20x12 defect 4 px from its left edge."""
    tile = np.full((100, 280, 3), 128, np.uint8)
    tile[40:60, 4:16] = 255
    return Image.fromarray(tile)


def test_exact_size_without_crop_keeps_the_border_the_default_crop_loses():
    tile = _tile_with_border_defect()
    default = np.asarray(Geometry().apply(tile))
    assert default.shape == (224, 224, 3) and default.max() == 128          # the defect is gone
    whole = np.asarray(Geometry("224x448", "none").apply(tile))
    assert whole.shape == (224, 448, 3)
    white = np.argwhere(whole[..., 0] > 250)
    # 4..16 of 280 columns -> 6.4..25.6 of 448; rows 40..60 of 100 -> 89.6..134.4 of 224
    assert len(white) > 0
    assert 6 <= white[:, 1].min() and white[:, 1].max() <= 26
    assert 89 <= white[:, 0].min() and white[:, 0].max() <= 135


def test_crop_notice_says_how_much_is_lost():
    tile_w, tile_h = 280, 100
    share = Geometry().discarded_share(tile_w, tile_h)
    assert share == pytest.approx(1 - 224 * 224 / (256 * 716))
    notice = Geometry().crop_notice(tile_w, tile_h)
    assert notice is not None and "73%" in notice and "--resize 256x716 --crop_size none" in notice
    # the faithful default on a square image trims a border (23.4%) without a notice
    assert Geometry().discarded_share(900, 900) == pytest.approx(1 - (224 / 256) ** 2)
    assert Geometry().discarded_share(900, 900) < CROP_NOTICE_SHARE and Geometry().crop_notice(900, 900) is None
    assert Geometry("224x448", "none").discarded_share(tile_w, tile_h) == 0.0
    assert Geometry("224x448", "none").crop_notice(tile_w, tile_h) is None


def test_masks_resize_with_nearest():
    mask = np.zeros((100, 280), np.uint8)
    mask[40:60, 4:16] = 255
    out = np.asarray(Geometry("224x448", "none").apply(Image.fromarray(mask), Image.NEAREST))
    assert set(np.unique(out)) == {0, 255}


def test_meta_round_trip_and_untrusted_values():
    for geometry in (Geometry(), Geometry("224x448", "none"), Geometry((300, 200), (224, 100))):
        meta = geometry.to_meta()
        assert Geometry(meta["resize"], meta["crop_size"]) == geometry
    assert Geometry().to_meta() == {"resize": 256, "crop_size": [224, 224]}
    assert Geometry("224x448", "none").image_size == (224, 448)
    for resize, crop in ((10 ** 9, [1, 1]), ("", None), ([1, 2, 3], None), (256, "x")):
        with pytest.raises(GeometryError):
            Geometry(resize, crop)


def test_the_transform_notes_a_large_crop_once_per_image_shape(monkeypatch):
    """Decoding threads meet many images of one shape: one log line per shape, whichever thread."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from datasets.mvtec import ImageTransform
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    monkeypatch.setattr(logging.getLogger("padim"), "handlers", [handler])
    transform = ImageTransform(250, 224)          # a geometry of its own: notices are kept per process
    shapes = [(280, 100)] * 16 + [(100, 280)] * 16 + [(300, 300)] * 4
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda size: transform.to_display(Image.new("RGB", size)), shapes))
    assert len(lines) == 2 and all("--crop_size none" in line for line in lines)
    assert {"of 100x280 images" in line for line in lines} == {True, False}
