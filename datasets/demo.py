"""Synthetic demo category in the MVTec AD layout.

The project ships no images. Without ``--data_path`` the scripts, the tests and TIPC's lite
mode use a category that this module paints itself: a plain-weave fabric (two thread systems,
over/under cells, fibre noise along each thread, per-image random phase, period, brightness and
colour jitter, so normal images vary but share their statistics) and four kinds of defect:

``scratch``  a thin bright curved line (2-4 px wide, 50-140 px long)
``hole``     a dark, irregular round hole
``stain``    an irregular tinted blob; the weave stays visible under it
``cut``      a dark lens-shaped slit

Every defect is painted with a hard mask and only inside it, so the ground-truth mask is exactly
the set of pixels the defect painted: outside the mask an anomalous image is byte-identical to
the clean image rendered from the same sub-seed (``render_sample(..., defect=None)``).
Defects are centred in the middle of the image, so they survive the usual 256 -> 224 centre crop.

Output is deterministic: every image draws from ``numpy.random.default_rng([seed, split, kind,
index, part])``, so the same seed gives byte-identical PNGs. Bump ``DEMO_VERSION`` whenever the
output changes. A category is written into a temporary folder beside its destination and moved
into place with one rename, so a crash never leaves half a category behind.

CLI: ``python -m datasets.demo --out DIR`` (see ``--help``). This module does not import paddle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEMO_CATEGORY",
    "DEMO_VERSION",
    "DEFECT_TYPES",
    "DEFAULTS",
    "generate_demo_category",
    "demo_data_root",
    "render_sample",
    "main",
]

DEMO_CATEGORY = "demo"
DEMO_VERSION = 1
DEFECT_TYPES = ("scratch", "hole", "stain", "cut")
DEFAULTS = {"seed": 0, "image_size": 256, "n_train": 60, "n_test_good": 10, "n_per_defect": 5}

_SPLITS = ("train", "test")
_KINDS = ("good",) + DEFECT_TYPES
_README = "README.txt"
_MIN_SIZE = 64
_ENV_DIR = "PADIM_DEMO_DIR"


# --------------------------------------------------------------------------- texture

def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One plain-weave fabric image, float32 [size, size, 3] in [0, 1]."""
    s = size / 256.0
    period = 16.0 * s * (1.0 + rng.uniform(-0.03, 0.03))
    phx, phy = rng.uniform(0.0, 2.0 * period, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xx + phx) / period  # across the warp threads (which run vertically)
    v = (yy + phy) / period  # across the weft threads (which run horizontally)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    warp_on_top = ((iu + iv) % 2) == 0

    # Rounded thread cross-section; the thread on top dips where it goes under its neighbour.
    warp_h = np.sin(np.pi * fu) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fv))
    weft_h = np.sin(np.pi * fv) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fu))
    height = np.where(warp_on_top, warp_h, weft_h)

    # Fibres: white noise smoothed along each thread's direction.
    noise = rng.standard_normal((2, size, size)).astype(np.float32)
    warp_fib = ndimage.gaussian_filter(noise[0], sigma=(5.0 * s, 0.7 * s), mode="wrap")
    weft_fib = ndimage.gaussian_filter(noise[1], sigma=(0.7 * s, 5.0 * s), mode="wrap")
    fib = np.where(warp_on_top, warp_fib, weft_fib)
    fib /= fib.std() + 1e-6

    # Slow shading across the image (lighting / slight unevenness of the cloth).
    low = rng.standard_normal((8, 8)).astype(np.float32)
    low = ndimage.zoom(low, size / 8.0, order=3, mode="grid-wrap", grid_mode=True)[:size, :size]
    low = low / (np.abs(low).max() + 1e-6)

    warp_col = np.array([0.70, 0.61, 0.46], np.float32)
    weft_col = np.array([0.62, 0.53, 0.39], np.float32)
    col = np.where(warp_on_top[..., None], warp_col, weft_col)
    col = col * (1.0 + rng.uniform(-0.03, 0.03, 3).astype(np.float32))  # dye jitter

    shade = (0.30 + 0.70 * height) * (1.0 + 0.10 * fib) * (1.0 + 0.04 * low)
    shade *= 1.0 + rng.uniform(-0.05, 0.05)  # exposure jitter
    img = col * shade[..., None]
    img += rng.normal(0.0, 1.2 / 255.0, img.shape).astype(np.float32)  # sensor noise
    return np.clip(img, 0.0, 1.0)


# --------------------------------------------------------------------------- defects

def _frame(rng: np.random.Generator, size: int):
    """Random centre (in the middle of the image) and orientation; rotated pixel coordinates."""
    cy, cx = rng.uniform(0.32 * size, 0.68 * size, 2)
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, sn = np.cos(theta), np.sin(theta)
    t = dx * c + dy * sn  # along the defect's axis
    n = -dx * sn + dy * c  # across it
    return t, n


def _blob(rng: np.random.Generator, size: int, r_min: float, r_max: float, harmonics: int,
          wobble: float, aspect: tuple[float, float]):
    """Irregular closed blob: radius modulated by a few angular harmonics. Returns (mask, rho)."""
    t, n = _frame(rng, size)
    radius = rng.uniform(r_min, r_max) * size / 256.0
    n = n * rng.uniform(*aspect)
    ang = np.arctan2(n, t)
    r_ang = np.ones_like(ang)
    for k in range(2, 2 + harmonics):
        r_ang += rng.uniform(0.0, wobble / k) * np.cos(k * ang + rng.uniform(0.0, 2 * np.pi))
    rho = np.hypot(t, n) / (radius * r_ang)
    return rho < 1.0, rho


def _scratch(rng, img, size):
    s = size / 256.0
    t, n = _frame(rng, size)
    half_len = rng.uniform(25.0, 70.0) * s
    width = rng.uniform(2.0, 4.0) * s
    curv = rng.uniform(-1.0, 1.0) * 0.012 / s
    mask = (np.abs(t) <= half_len) & (np.abs(n - curv * t * t) <= width / 2.0)
    bright = np.array([0.93, 0.92, 0.88], np.float32) * rng.uniform(0.92, 1.0)
    return mask, 0.15 * img + 0.85 * bright


def _hole(rng, img, size):
    mask, rho = _blob(rng, size, 7.0, 17.0, harmonics=4, wobble=0.35, aspect=(0.8, 1.25))
    depth = 0.05 + 0.13 * np.clip(rho, 0.0, 1.0) ** 3  # darker in the middle, frayed rim lighter
    dark = np.array([0.55, 0.55, 0.62], np.float32) * depth[..., None]
    return mask, dark + 0.08 * img


def _stain(rng, img, size):
    mask, _ = _blob(rng, size, 12.0, 30.0, harmonics=6, wobble=0.5, aspect=(0.6, 1.6))
    tints = np.array([[0.45, 0.30, 0.22],   # rust / coffee
                      [0.35, 0.45, 0.30],   # greenish grease
                      [0.30, 0.30, 0.38]],  # oil
                     np.float32)
    tint = tints[rng.integers(len(tints))]
    strength = rng.uniform(0.75, 0.95)
    return mask, img * (1.0 - strength + strength * tint)


def _cut(rng, img, size):
    s = size / 256.0
    t, n = _frame(rng, size)
    half_len = rng.uniform(25.0, 60.0) * s
    half_w = rng.uniform(2.0, 4.5) * s
    prof = 1.0 - (t / half_len) ** 2
    mask = (np.abs(t) < half_len) & (np.abs(n) <= half_w * np.sqrt(np.clip(prof, 0.0, None)))
    gap = np.array([0.10, 0.09, 0.11], np.float32)
    return mask, gap + 0.10 * img


_PAINTERS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "cut": _cut}


# --------------------------------------------------------------------------- one sample

def render_sample(seed: int, split: str, index: int, defect: str | None = None,
                  image_size: int = 256, kind: str | None = None):
    """Render one image of the demo category.

    ``split`` is "train" or "test"; ``kind`` is the folder the image lives in ("good" or a defect
    type) and selects its sub-seed; ``defect`` is what gets painted (None: nothing). By default
    ``kind`` follows ``defect``, so ``render_sample(0, "test", 3, "hole")`` is the file
    ``test/hole/003.png``, and ``render_sample(0, "test", 3, None, kind="hole")`` is that same
    image with the hole left out.

    Returns ``(image uint8 [H, W, 3], mask bool [H, W] or None)``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if defect is not None and defect not in _PAINTERS:
        raise ValueError(f"defect must be one of {DEFECT_TYPES} or None, got {defect!r}")
    kind = kind if kind is not None else (defect or "good")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    key = [int(seed), _SPLITS.index(split), _KINDS.index(kind), int(index)]
    img = _texture(np.random.default_rng(key + [0]), image_size)
    mask = None
    if defect is not None:
        mask, painted = _PAINTERS[defect](np.random.default_rng(key + [1]), img, image_size)
        img = np.where(mask[..., None], np.clip(painted, 0.0, 1.0), img)
    return (img * 255.0 + 0.5).astype(np.uint8), mask


# --------------------------------------------------------------------------- a category

def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _readme(seed, image_size, n_train, n_test_good, n_per_defect) -> str:
    return (
        "PaDiM-Paddle demo category (synthetic)\n"
        "======================================\n\n"
        "Every image here is synthetic: painted by datasets/demo.py of PaDiM-Paddle, with no\n"
        "photograph or third-party content. It may be used, copied and changed without restriction.\n\n"
        "Texture: plain-weave fabric with per-image random phase, period, brightness and colour.\n"
        "Defects: scratch (thin bright curve), hole (dark irregular hole), stain (tinted blob),\n"
        "cut (dark lens-shaped slit). Each ground-truth mask is exactly the painted region\n"
        "(uint8 0/255, one channel, same size as its image).\n\n"
        "Layout: MVTec AD (train/good, test/<type>, ground_truth/<type>/<name>_mask.png).\n\n"
        f"generator: datasets/demo.py\n"
        f"version: {DEMO_VERSION}\n"
        f"seed: {seed}\n"
        f"image_size: {image_size}\n"
        f"n_train: {n_train}\n"
        f"n_test_good: {n_test_good}\n"
        f"n_per_defect: {n_per_defect}\n"
        f"defect_types: {', '.join(DEFECT_TYPES)}\n"
        f"command: python -m datasets.demo --out DIR --seed {seed} --image_size {image_size} "
        f"--n_train {n_train} --n_test_good {n_test_good} --n_per_defect {n_per_defect}\n"
    )


def _check_args(category, seed, image_size, n_train, n_test_good, n_per_defect) -> None:
    if not isinstance(category, str) or not category or category in (".", "..") \
            or "/" in category or "\\" in category or category.startswith("."):
        raise ValueError(f"category must be a plain folder name, got {category!r}")
    for name, value, low in (("seed", seed, 0), ("image_size", image_size, _MIN_SIZE),
                             ("n_train", n_train, 1), ("n_test_good", n_test_good, 1),
                             ("n_per_defect", n_per_defect, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_train > 9999 or n_test_good > 9999 or n_per_defect > 9999:
        raise ValueError("at most 9999 images per folder")


def _is_generated(folder: Path) -> bool:
    """True if ``folder`` is a category that this module wrote (it has our README)."""
    try:
        text = (folder / _README).read_text(encoding="utf-8")
    except OSError:
        return False
    return text.startswith("PaDiM-Paddle demo category (synthetic)")


def _write_category(tmp: Path, seed, image_size, n_train, n_test_good, n_per_defect) -> None:
    train_good = tmp / "train" / "good"
    train_good.mkdir(parents=True)
    for i in range(n_train):
        _save_png(train_good / f"{i:03d}.png", render_sample(seed, "train", i, None, image_size)[0])
    test_good = tmp / "test" / "good"
    test_good.mkdir(parents=True)
    for i in range(n_test_good):
        _save_png(test_good / f"{i:03d}.png", render_sample(seed, "test", i, None, image_size)[0])
    for defect in DEFECT_TYPES:
        img_dir = tmp / "test" / defect
        gt_dir = tmp / "ground_truth" / defect
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        for i in range(n_per_defect):
            img, mask = render_sample(seed, "test", i, defect, image_size)
            _save_png(img_dir / f"{i:03d}.png", img)
            _save_png(gt_dir / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    (tmp / _README).write_text(_readme(seed, image_size, n_train, n_test_good, n_per_defect),
                               encoding="utf-8")


def generate_demo_category(root, category: str = DEMO_CATEGORY, seed: int = 0,
                           image_size: int = 256, n_train: int = 60, n_test_good: int = 10,
                           n_per_defect: int = 5, overwrite: bool = True) -> Path:
    """Write the demo category to ``<root>/<category>`` and return that folder.

    The category is built in a temporary folder beside the destination and renamed into place.
    An existing destination is replaced only if it is itself a generated demo category (and
    ``overwrite`` is true); anything else there is an error, never deleted.
    """
    _check_args(category, seed, image_size, n_train, n_test_good, n_per_defect)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / category
    if dest.exists() and not (overwrite and _is_generated(dest)):
        if not overwrite and _is_generated(dest):
            raise FileExistsError(f"{dest} already exists (a generated demo category)")
        raise FileExistsError(f"refusing to overwrite {dest}: it is not a generated demo category")
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.tmp-", dir=root))
    try:
        _write_category(tmp, int(seed), int(image_size), int(n_train), int(n_test_good),
                        int(n_per_defect))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
            if not (overwrite and _is_generated(dest)):
                # Another process finished first (or something else appeared there meanwhile).
                raise FileExistsError(f"{dest} appeared while it was being generated") from None
            # Replace a previous generation: move it aside first, so dest is never half-made.
            old = Path(tempfile.mkdtemp(prefix=f".{category}.old-", dir=root))
            os.rename(dest, old / category)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_complete(folder: Path, n_train: int) -> bool:
    train_good = folder / "train" / "good"
    if not train_good.is_dir() or not _is_generated(folder):
        return False
    if f"version: {DEMO_VERSION}\n" not in (folder / _README).read_text(encoding="utf-8"):
        return False
    return len(list(train_good.glob("*.png"))) == n_train


def demo_data_root(cache_dir=None) -> Path:
    """A data root that holds the default demo category, generated once and then reused.

    The folder is ``cache_dir`` if given, else ``$PADIM_DEMO_DIR``, else
    ``~/.cache/padim_paddle/demo_v{DEMO_VERSION}``. Safe when several processes race: each
    builds in its own temporary folder and the first rename wins; the others use its result.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(_ENV_DIR) or \
            Path.home() / ".cache" / "padim_paddle" / f"demo_v{DEMO_VERSION}"
    root = Path(cache_dir).expanduser()
    dest = root / DEMO_CATEGORY
    if _is_complete(dest, DEFAULTS["n_train"]):
        return root
    # Replace only an outdated or incomplete generation of ours; if nothing is there yet, a
    # process that wins the race to the rename is as good as this one.
    existed = dest.exists()
    try:
        generate_demo_category(root, DEMO_CATEGORY, overwrite=existed, **DEFAULTS)
    except FileExistsError:
        if not _is_complete(dest, DEFAULTS["n_train"]):
            raise
    return root


# --------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m datasets.demo",
                description="Generate the synthetic demo category (MVTec AD layout).")
    p.add_argument("--out", required=True,
                   help="data root to write into; the category goes to OUT/CATEGORY")
    p.add_argument("--category", default=DEMO_CATEGORY,
                   help=f"category folder name (default {DEMO_CATEGORY})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="random seed, >= 0; the same seed gives identical files (default 0)")
    p.add_argument("--image_size", type=int, default=DEFAULTS["image_size"],
                   help=f"side of the square images in pixels, >= {_MIN_SIZE} (default 256)")
    p.add_argument("--n_train", type=int, default=DEFAULTS["n_train"],
                   help="number of normal training images (default 60)")
    p.add_argument("--n_test_good", type=int, default=DEFAULTS["n_test_good"],
                   help="number of normal test images (default 10)")
    p.add_argument("--n_per_defect", type=int, default=DEFAULTS["n_per_defect"],
                   help=f"number of test images per defect type {DEFECT_TYPES} (default 5)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = generate_demo_category(args.out, args.category, seed=args.seed,
                                      image_size=args.image_size, n_train=args.n_train,
                                      n_test_good=args.n_test_good,
                                      n_per_defect=args.n_per_defect)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
