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
