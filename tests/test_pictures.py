"""The per-image panels (NumPy/PIL) against hand-made maps and scikit-image/matplotlib as
references, and the PictureWriter pool: every file written, failures surfaced, nothing half-written."""
import numpy as np
import pytest
from PIL import Image

from utils.pictures import (JET, PANEL_SIDE_LIMIT, PictureError, PictureWriter, draw_panels, jet_indices,
                            nice_ticks, open_mask, panel_arrays, thick_boundaries)

HOT = (slice(20, 44), slice(24, 48))        # a 24x24 square, wider than the opening's disk


def hot_square(shape=(64, 72), inside=10.0, outside=0.0):
    anomaly_map = np.full(shape, outside, dtype=np.float32)
    anomaly_map[HOT] = inside
    return anomaly_map


def grey_image(shape=(64, 72), level=128):
    return np.full(shape + (3,), level, dtype=np.uint8)


def panels_by_title(*args, **kwargs):
    return dict(panel_arrays(*args, **kwargs))


def test_jet_table_is_matplotlibs():
    import matplotlib
    reference = np.round(matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(JET.astype(int) - reference).max() <= 1


def test_colour_scale_is_fixed_and_clipped():
    values = np.array([-5.0, 0.0, 4.999, 5.0, 10.0, 99.0])
    assert jet_indices(values, 0.0, 10.0).tolist() == [0, 0, 127, 128, 255, 255]
    # the scale is the caller's, not the image's: a flat low map stays at the bottom colour
    assert jet_indices(np.full((4, 4), 2.0), 0.0, 10.0).max() == int(2.0 / 10 * 256)


def test_heat_panel_is_red_on_the_hot_square_and_blue_elsewhere():
    panels = panels_by_title(grey_image(), hot_square(), 5.0, 0.0, 10.0)
    heat = panels["Predicted heat map"].astype(int)
    # half of jet's top (dark red 128,0,0) and bottom (dark blue 0,0,128) over grey 128
    assert np.all(heat[HOT] == (128, 64, 64))
    outside = np.ones(heat.shape[:2], bool)
    outside[HOT] = False
    assert np.all(heat[outside] == (64, 64, 128))


def test_mask_panel_is_the_map_above_the_threshold_opened_by_a_disk():
    from skimage import morphology
    anomaly_map = hot_square() + np.linspace(0, 1, 72, dtype=np.float32)[None, :]
    mask = panels_by_title(grey_image(), anomaly_map, 5.0, 0.0, 10.0)["Predicted mask"]
    assert set(np.unique(mask)) == {0, 255}
    expected = morphology.opening(anomaly_map > 5.0, morphology.disk(4))
    assert np.array_equal(mask == 255, expected)
    assert mask[24:40, 28:44].all() and not mask[~np.pad(np.ones((24, 24), bool), ((20, 20), (24, 24)))].any()


def test_specks_narrower_than_the_disk_are_opened_away():
    anomaly_map = hot_square()
    anomaly_map[2:5, 2:5] = 10.0                   # a 3x3 speck
    mask = panels_by_title(grey_image(), anomaly_map, 5.0, 0.0, 10.0)["Predicted mask"]
    assert not mask[2:5, 2:5].any() and mask[24:40, 28:44].all()


@pytest.mark.parametrize("seed", [0, 1])
def test_opening_and_boundaries_match_scikit_image(seed):
    from skimage import morphology
    from skimage.segmentation import find_boundaries
    rng = np.random.default_rng(seed)
    blobs = rng.random((40, 50)) > 0.45
    blobs = morphology.dilation(blobs, morphology.disk(2)) > 0      # shapes touching the border too
    assert np.array_equal(open_mask(blobs), morphology.opening(blobs, morphology.disk(4)))
    assert np.array_equal(thick_boundaries(blobs), find_boundaries(blobs, mode="thick"))


def test_segmentation_panel_outlines_the_mask_in_red():
    from skimage import morphology
    from skimage.segmentation import mark_boundaries
    image = grey_image()
    result = panels_by_title(image, hot_square(), 5.0, 0.0, 10.0)["Segmentation result"]
    red = np.all(result == (255, 0, 0), axis=2)
    assert red[20, 36] and red[19, 36] and red[43, 36] and red[44, 36]     # both sides of the edge
    assert not red[30, 36] and np.array_equal(result[30, 36], image[30, 36])
    assert not red[:15].any()
    expected = mark_boundaries(image, morphology.opening(hot_square() > 5.0, morphology.disk(4)),
                               color=(1, 0, 0), mode="thick")
    assert np.array_equal(result, np.round(expected * 255))


def test_panels_with_and_without_ground_truth():
    shape = (64, 72)
    truth = np.zeros(shape, np.float32)
    truth[10:20, 10:20] = 1.0
    with_truth = panel_arrays(grey_image(), hot_square(), 5.0, 0.0, 10.0, ground_truth=truth)
    assert [title for title, _ in with_truth] == ["Image", "GroundTruth", "Predicted heat map", "Predicted mask",
                                                 "Segmentation result"]
    assert np.array_equal(with_truth[1][1], np.where(truth > 0, 255, 0))
    assert len(panel_arrays(grey_image(), hot_square(), 5.0, 0.0, 10.0)) == 4


def test_large_images_are_drawn_downscaled():
    side = PANEL_SIDE_LIMIT * 2
    anomaly_map = np.zeros((side, side), np.float32)
    anomaly_map[side // 4:side // 2, side // 4:side // 2] = 10.0
    panels = panels_by_title(grey_image((side, side)), anomaly_map, 5.0, 0.0, 10.0)
    assert all(panel.shape[:2] == (PANEL_SIDE_LIMIT, PANEL_SIDE_LIMIT) for panel in panels.values())
    mask = panels["Predicted mask"] > 127
    quarter = PANEL_SIDE_LIMIT // 4
    assert mask[quarter + 2:2 * quarter - 2, quarter + 2:2 * quarter - 2].all() and mask.sum() < (quarter + 2) ** 2


def test_nice_ticks():
    assert nice_ticks(5.0, 35.0) == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0]
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3.3, 3.3) == [3.3]


def test_draw_panels_writes_one_png(tmp_path):
    target = tmp_path / "deep" / "picture.png"
    draw_panels(target, grey_image(), hot_square(), 5.0, 0.0, 10.0, title="a title")
    with Image.open(target) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.width > 4 * 72 and picture.height > 64
    assert [p.name for p in target.parent.iterdir()] == ["picture.png"]


def test_mismatched_map_is_refused():
    with pytest.raises(ValueError, match="differ in size"):
        panel_arrays(grey_image(), np.zeros((10, 10), np.float32), 5.0, 0.0, 10.0)


@pytest.mark.parametrize("workers", [0, 1])
def test_writer_writes_every_picture_and_reports_the_failing_one(tmp_path, workers):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    targets = [tmp_path / "out" / f"{i}.png" for i in range(5)]
    writer = PictureWriter(workers=workers, max_pending=2)
    for i, target in enumerate(targets[:3]):
        writer.submit(target, grey_image(), hot_square(), 5.0, 0.0, 10.0, title=f"image {i}")
    writer.submit(blocker / "bad.png", grey_image(), hot_square(), 5.0, 0.0, 10.0)
    for target in targets[3:]:
        writer.submit(target, grey_image(), hot_square(), 5.0, 0.0, 10.0, ground_truth=np.zeros((64, 72)))
    with pytest.raises(PictureError, match="1 picture.*not_a_folder"):
        writer.close()
    assert sorted(writer.written) == sorted(targets)
    for target in targets:
        with Image.open(target) as picture:
            picture.load()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(t.name for t in targets)


def test_writer_in_a_with_block(tmp_path):
    with PictureWriter(workers=1) as writer:
        writer.submit(tmp_path / "a.png", grey_image(), hot_square(), 5.0, 0.0, 10.0)
    assert writer.written == [tmp_path / "a.png"]
    with pytest.raises(KeyError):
        with PictureWriter(workers=0) as writer:
            writer.submit(tmp_path / "b.png", grey_image(), hot_square(), 5.0, 0.0, 10.0)
            raise KeyError("the caller's own error is the one that propagates")
    with pytest.raises(PictureError, match="closed"):
        writer.submit(tmp_path / "c.png", grey_image(), hot_square(), 5.0, 0.0, 10.0)
