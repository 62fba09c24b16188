"""The ROC curves figure, through matplotlib (imported when it is drawn).

The per-image panels (image, ground truth, heat map, mask, contour) are composed in NumPy and
PIL by utils.pictures, whose PictureWriter draws them in worker processes.
"""
from __future__ import annotations

import logging
from pathlib import Path

from utils.files import temp_path_beside


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
