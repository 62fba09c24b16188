"""datasets.demo: determinism, layout, exact masks, CLI, cache reuse, speed."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.demo import (DEFECT_TYPES, DEMO_CATEGORY, DEMO_VERSION, demo_data_root,
                           generate_demo_category, render_sample)

REPO = Path(__file__).resolve().parents[1]
LITE = dict(n_train=4, n_test_good=2, n_per_defect=2)


def tree_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "datasets.demo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def default_category(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_default")
    t0 = time.perf_counter()
    path = generate_demo_category(root)
    return path, time.perf_counter() - t0


def test_generation_is_fast(default_category):
    path, elapsed = default_category
    assert path.name == DEMO_CATEGORY
    assert elapsed < 5.0, f"default demo category took {elapsed:.1f} s"


def test_layout_and_masks(default_category):
    path, _ = default_category
    assert len(DEFECT_TYPES) >= 4 and {"scratch", "hole", "stain", "cut"} <= set(DEFECT_TYPES)
    train = sorted((path / "train" / "good").glob("*.png"))
    assert [p.name for p in train[:2]] == ["000.png", "001.png"] and len(train) == 60
    assert len(list((path / "test" / "good").glob("*.png"))) == 10
    assert not (path / "ground_truth" / "good").exists()
    assert sorted(p.name for p in (path / "test").iterdir()) == sorted(("good",) + DEFECT_TYPES)
    readme = (path / "README.txt").read_text()
    assert "synthetic" in readme and f"version: {DEMO_VERSION}" in readme and "seed: 0" in readme
    for p in train[:3]:
        im = Image.open(p)
        assert im.mode == "RGB" and im.size == (256, 256)
    fractions = []
    for defect in DEFECT_TYPES:
        images = sorted((path / "test" / defect).glob("*.png"))
        assert len(images) == 5
        for img_path in images:
            mask_path = path / "ground_truth" / defect / f"{img_path.stem}_mask.png"
            im, mask = Image.open(img_path), Image.open(mask_path)
            assert im.mode == "RGB" and mask.mode == "L" and mask.size == im.size
            m = np.asarray(mask)
            assert set(np.unique(m)) == {0, 255}
            fractions.append((m > 0).mean())
            # The defect lies inside the 224/256 centre crop.
            c = (256 - 224) // 2
            assert m[c:-c, c:-c].sum() > 0.8 * m.sum()
    fractions = np.array(fractions)
    assert fractions.min() > 0.0005 and fractions.max() < 0.06
    assert np.median(fractions) > 0.003


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_exactly_the_painted_region(defect):
    for index in range(3):
        img, mask = render_sample(0, "test", index, defect)
        clean, none = render_sample(0, "test", index, None, kind=defect)
        assert none is None and mask.dtype == bool and mask.any()
        assert np.array_equal(img[~mask], clean[~mask])  # outside: untouched, byte for byte
        changed = np.any(img != clean, axis=-1)
        assert changed[mask].mean() > 0.9                # inside: nearly every pixel painted
        # ... and clearly: the mean colour change inside is large.
        diff = np.abs(img.astype(int) - clean.astype(int)).sum(-1)
        assert diff[mask].mean() > 60


def test_normal_images_vary_but_share_statistics():
    imgs = np.stack([render_sample(0, "train", i)[0] for i in range(6)]).astype(float)
    assert all(not np.array_equal(imgs[0], imgs[i]) for i in range(1, 6))
    means = imgs.mean(axis=(1, 2, 3))
    assert means.std() < 0.05 * means.mean()
    test_img = render_sample(0, "test", 0)[0]
    assert not any(np.array_equal(test_img, im) for im in imgs.astype(np.uint8))


def test_deterministic(tmp_path):
    a = generate_demo_category(tmp_path / "a", seed=3, **LITE)
    b = generate_demo_category(tmp_path / "b", seed=3, **LITE)
    c = generate_demo_category(tmp_path / "c", seed=4, **LITE)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert ta == tb
    assert ta.keys() == tc.keys()
    assert ta["train/good/000.png"] != tc["train/good/000.png"]
    assert ta["test/hole/000.png"] != tc["test/hole/000.png"]
    # No temporary folders are left beside the category.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [DEMO_CATEGORY]


def test_regenerate_replaces_only_a_demo_category(tmp_path):
    generate_demo_category(tmp_path, seed=1, **LITE)
    path = generate_demo_category(tmp_path, seed=2, **LITE)
    assert "seed: 2" in (path / "README.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_CATEGORY]
    real = tmp_path / "bottle"
    (real / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a generated demo"):
        generate_demo_category(tmp_path, category="bottle", **LITE)
    assert (real / "train" / "good").is_dir()
    with pytest.raises(ValueError):
        generate_demo_category(tmp_path, category="../x", **LITE)
    with pytest.raises(ValueError):
        generate_demo_category(tmp_path, image_size=16, **LITE)


def test_other_image_size(tmp_path):
    path = generate_demo_category(tmp_path, image_size=128, n_train=1, n_test_good=1,
                                  n_per_defect=1)
    for defect in DEFECT_TYPES:
        assert Image.open(path / "test" / defect / "000.png").size == (128, 128)
        m = np.asarray(Image.open(path / "ground_truth" / defect / "000_mask.png"))
        assert m.shape == (128, 128) and m.any()


def test_cli_lite(tmp_path):
    out = tmp_path / "lite"
    r = run_cli("--out", str(out), "--n_train", "8", "--n_test_good", "2", "--n_per_defect", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / DEMO_CATEGORY)
    assert len(r.stdout.strip().splitlines()) == 1
    assert len(list((out / "demo" / "train" / "good").glob("*.png"))) == 8
    assert len(list((out / "demo" / "test" / "good").glob("*.png"))) == 2
    for defect in DEFECT_TYPES:
        assert len(list((out / "demo" / "test" / defect).glob("*.png"))) == 1
        assert (out / "demo" / "ground_truth" / defect / "000_mask.png").is_file()
    r = run_cli("--out", str(out), "--category", "capsule", "--n_train", "1",
                "--n_test_good", "1", "--n_per_defect", "1", "--seed", "5", "--image_size", "64")
    assert r.returncode == 0, r.stderr
    assert (out / "capsule" / "test" / "cut" / "000.png").is_file()


@pytest.mark.parametrize("args", [
    ["--n_train", "0"],
    ["--n_train", "abc"],
    ["--image_size", "8"],
    ["--seed", "-1"],
    ["--bogus"],
    ["--category", "a/b"],
    [],  # --out missing
])
def test_cli_bad_args(tmp_path, args):
    full = args if args == [] else ["--out", str(tmp_path / "x"), *args]
    r = run_cli(*full)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "x" / DEMO_CATEGORY).exists()


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--out", "--seed", "--n_train", "--n_test_good", "--n_per_defect",
                 "--image_size", "--category"):
        assert flag in r.stdout


def test_demo_data_root_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PADIM_DEMO_DIR", str(tmp_path / "cache"))
    root = demo_data_root()
    assert root == tmp_path / "cache"
    first = root / DEMO_CATEGORY / "train" / "good" / "000.png"
    assert len(list(first.parent.glob("*.png"))) == 60
    old = time.time() - 1000
    os.utime(first, (old, old))
    stamp = first.stat().st_mtime_ns
    assert demo_data_root() == root
    assert first.stat().st_mtime_ns == stamp  # not regenerated
    # An explicit cache_dir wins over the environment variable.
    assert demo_data_root(tmp_path / "cache") == root


def test_demo_data_root_repairs_incomplete_cache(tmp_path):
    # An older/partial generation of ours is replaced; something else is never deleted.
    generate_demo_category(tmp_path / "c", **LITE)
    root = demo_data_root(tmp_path / "c")
    assert len(list((root / DEMO_CATEGORY / "train" / "good").glob("*.png"))) == 60
    foreign = tmp_path / "f" / DEMO_CATEGORY
    foreign.mkdir(parents=True)
    with pytest.raises(FileExistsError):
        demo_data_root(tmp_path / "f")
    assert foreign.is_dir()


def test_demo_data_root_race_lost_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its category into place first: use theirs, leave no temp."""
    import datasets.demo as demo

    for key, value in LITE.items():
        monkeypatch.setitem(demo.DEFAULTS, key, value)
    real_write = demo._write_category
    calls = []

    def write_then_lose(tmp, *args):
        real_write(tmp, *args)
        if not calls:  # the other process finishes while we are still writing
            calls.append(1)
            demo.generate_demo_category(tmp_path, overwrite=False, **demo.DEFAULTS)

    monkeypatch.setattr(demo, "_write_category", write_then_lose)
    winner_readme = tmp_path / DEMO_CATEGORY / "README.txt"
    assert demo.demo_data_root(tmp_path) == tmp_path
    assert winner_readme.is_file() and calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_CATEGORY]
