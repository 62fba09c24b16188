"""Figures: the original's panels (image, ground truth, heat map, mask, contour) and ROC curves.

The colour scale is given in absolute anomaly units by the caller (from the model file), never
taken from the image being drawn: a normal image stays blue.
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Paddle configures the root logger at INFO, which would print matplotlib's font-cache chatter.
logging.getLogger("matplotlib").setLevel(logging.WARNING)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from skimage import morphology  # noqa: E402
from skimage.segmentation import mark_boundaries  # noqa: E402

from utils.files import temp_path_beside  # noqa: E402


def _save(figure, path) -> Path:
    try:
        with temp_path_beside(path, suffix=Path(path).suffix or ".png") as temp_name:
            figure.savefig(temp_name, dpi=100)
    finally:
        plt.close(figure)
    return Path(path)


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def picture_file(save_path, category: str, image_path, root: Path, single: bool, folder: str) -> Path:
    """Where predict.py (folder 'predict') and infer.py (folder 'infer') put an image's picture:
    ``<save_path>/<category>/<folder>/<path relative to the input, '/' -> '_'>.png``; a .png/.jpg
    ``save_path`` with a single input image is the picture's own name."""
    save_path = Path(save_path)
    if single and save_path.suffix.lower() in PICTURE_SUFFIXES:
        return save_path
    relative = Path(image_path).relative_to(root) if root.is_dir() else Path(Path(image_path).name)
    name = "_".join(relative.with_suffix("").parts) + ".png"
    return save_path / category / folder / name


def predicted_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Pixels above the threshold, cleaned with an opening by a disk of radius 4 (as the original)."""
    mask = anomaly_map > pixel_threshold
    return morphology.opening(mask, morphology.disk(4))


def plot_panels(path, image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float,
                vmin: float, vmax: float, ground_truth: np.ndarray | None = None,
                title: str | None = None) -> Path:
    """Save the 5-panel (with ground truth, as val) or 4-panel (as predict/infer) figure."""
    mask = predicted_mask(anomaly_map, pixel_threshold)
    contour = mark_boundaries(image, mask, color=(1, 0, 0), mode="thick")
    panels = 5 if ground_truth is not None else 4
    figure, axes = plt.subplots(1, panels, figsize=(12, 3))
    figure.subplots_adjust(right=0.9)
    norm = mcolors.Normalize(vmin=vmin, vmax=vmax, clip=True)
    for axis in axes:
        axis.axes.xaxis.set_visible(False)
        axis.axes.yaxis.set_visible(False)
    k = 0
    axes[k].imshow(image)
    axes[k].title.set_text("Image")
    if ground_truth is not None:
        k += 1
        axes[k].imshow(ground_truth, cmap="gray", vmin=0, vmax=1)
        axes[k].title.set_text("GroundTruth")
    k += 1
    axes[k].imshow(image, cmap="gray", interpolation="none")
    heat = axes[k].imshow(anomaly_map, cmap="jet", alpha=0.5, interpolation="none", norm=norm)
    axes[k].title.set_text("Predicted heat map")
    k += 1
    axes[k].imshow(mask, cmap="gray", vmin=0, vmax=1)
    axes[k].title.set_text("Predicted mask")
    k += 1
    axes[k].imshow(contour)
    axes[k].title.set_text("Segmentation result")
    colorbar_axes = figure.add_axes([0.92, 0.15, 0.015, 0.7])
    colorbar = plt.colorbar(heat, cax=colorbar_axes)
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label("Anomaly Score", fontdict={"family": "serif", "size": 8})
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def plot_roc(path, curves: dict, title: str) -> Path:
    """``curves``: {label: (fpr, tpr, auc)}."""
    figure, axis = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, auc) in curves.items():
        axis.plot(fpr, tpr, label=f"{label}: {auc:.3f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    return _save(figure, path)


def report_prediction(logger, label: str, sample_path: str, anomaly_map: np.ndarray, score: float,
                      image_threshold: float, pixel_threshold: float, display: tuple, picture=None,
                      display_image=None) -> bool:
    """The per-image output of predict.py and infer.py: one line with score, threshold and verdict,
    and the 4-panel picture when ``picture`` (a path) is given. Returns True when anomalous."""
    anomalous = bool(score > image_threshold)
    verdict = "anomalous" if anomalous else "normal"
    line = f"{label} : {sample_path}  score {score:.4f}  threshold {image_threshold:.4f}  -> {verdict}"
    if picture is not None:
        title = f"{Path(sample_path).name}: score {score:.2f} ({verdict}, threshold {image_threshold:.2f})"
        plot_panels(picture, display_image, anomaly_map, pixel_threshold, *display, title=title)
        line += f"  picture {picture}"
    logger.info(line)
    return anomalous
