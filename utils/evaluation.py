"""Turn scored test sets into the reported numbers and files (metrics.json, scores.csv, tables).
No model maths here: inputs are anomaly maps and image scores."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from utils.files import write_text_atomically
from utils.metrics import decision_threshold, f1_max_threshold, image_auroc, pixel_auroc, pro_auc, roc_points

METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "pro_auc")


def compute_metrics(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict:
    """Image/pixel ROC-AUC, PRO up to FPR 0.3, and F1-max image and pixel thresholds."""
    image_threshold, image_f1 = f1_max_threshold(labels, scores)
    pixel_threshold, pixel_f1 = f1_max_threshold(masks.reshape(-1), maps.reshape(-1))
    # Stored for the rule "anomalous when score > threshold", away from any test score.
    image_threshold = decision_threshold(scores, image_threshold)
    pixel_threshold = decision_threshold(maps, pixel_threshold)
    return {
        "image_auroc": float(image_auroc(labels, scores)),
        "pixel_auroc": float(pixel_auroc(masks, maps)),
        "pro_auc": float(pro_auc(masks, maps, fpr_limit=0.3)),
        "image_threshold": float(image_threshold),
        "image_f1": float(image_f1),
        "pixel_threshold": float(pixel_threshold),
        "pixel_f1": float(pixel_f1),
        "n_test": int(len(labels)),
        "n_anomalous": int(labels.sum()),
    }


def roc_curves(maps, scores, masks, labels, metrics: dict) -> dict:
    curves = {"image ROC-AUC": (*roc_points(labels, scores), metrics["image_auroc"])}
    curves["pixel ROC-AUC"] = (*roc_points(masks.reshape(-1), maps.reshape(-1)), metrics["pixel_auroc"])
    return curves


def write_metrics(path, metrics: dict) -> Path:
    return write_text_atomically(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_scores_csv(path, samples, scores) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "image_score"])
    for sample, score in zip(samples, scores):
        writer.writerow([sample.path, sample.label, f"{float(score):.6f}"])
    return write_text_atomically(path, buffer.getvalue())


def summary_rows(per_category: dict) -> list[dict]:
    """One row per category plus the mean row, as in the original README's table."""
    rows = [{"category": name, **{k: metrics[k] for k in METRIC_COLUMNS}} for name, metrics in per_category.items()]
    if rows:
        rows.append({"category": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in METRIC_COLUMNS}})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| category | image ROC-AUC | pixel ROC-AUC | PRO (FPR<=0.3) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['category']} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['pro_auc']:.3f} |")
    return "\n".join(lines)


def write_summary(folder, rows: list[dict]) -> tuple[Path, Path]:
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *METRIC_COLUMNS])
    for row in rows:
        writer.writerow([row["category"], *(f"{row[k]:.4f}" for k in METRIC_COLUMNS)])
    csv_path = write_text_atomically(folder / "summary.csv", buffer.getvalue())
    md_path = write_text_atomically(folder / "summary.md", markdown_table(rows) + "\n")
    return csv_path, md_path
