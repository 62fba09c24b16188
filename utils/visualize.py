"""Figures: the original's panels (image, ground truth, heat map, mask, contour) and ROC curves.

The colour scale is given in absolute anomaly units by the caller (from the model file), never
taken from the image being drawn: a normal image stays blue. The per-image panels are composed
in NumPy and PIL (utils.pictures, which also has the PictureWriter pool that draws them in worker
processes); only the ROC plot goes through matplotlib, imported when it is drawn.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from utils.files import temp_path_beside

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


def plot_panels(path, image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float,
                vmin: float, vmax: float, ground_truth: np.ndarray | None = None,
                title: str | None = None) -> Path:
    """Save the 5-panel (with ground truth, as val) or 4-panel (as predict/infer) figure."""
    from utils.pictures import draw_panels

    return draw_panels(path, image, anomaly_map, pixel_threshold, vmin, vmax, ground_truth, title)


def plot_roc(path, curves: dict, title: str) -> Path:
    """``curves``: {label: (fpr, tpr, auc)}."""
    import matplotlib

    matplotlib.use("Agg")
    # Paddle configures the root logger at INFO, which would print matplotlib's font-cache chatter.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, auc) in curves.items():
        axis.plot(fpr, tpr, label=f"{label}: {auc:.3f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    try:
        with temp_path_beside(path, suffix=Path(path).suffix or ".png") as temp_name:
            figure.savefig(temp_name, dpi=100)
    finally:
        plt.close(figure)
    return Path(path)


def report_prediction(logger, label: str, sample_path: str, anomaly_map: np.ndarray, score: float,
                      image_threshold: float, pixel_threshold: float, display: tuple, picture=None,
                      display_image=None, writer=None) -> bool:
    """The per-image output of predict.py and infer.py: one line with score, threshold and verdict,
    and the 4-panel picture when ``picture`` (a path) is given, drawn here or handed to ``writer``
    (a utils.pictures.PictureWriter) when one is given. Returns True when anomalous."""
    anomalous = bool(score > image_threshold)
    verdict = "anomalous" if anomalous else "normal"
    line = f"{label} : {sample_path}  score {score:.4f}  threshold {image_threshold:.4f}  -> {verdict}"
    if picture is not None:
        title = f"{Path(sample_path).name}: score {score:.2f} ({verdict}, threshold {image_threshold:.2f})"
        draw = writer.submit if writer is not None else plot_panels
        draw(picture, display_image, anomaly_map, pixel_threshold, *display, title=title)
        line += f"  picture {picture}"
    logger.info(line)
    return anomalous
