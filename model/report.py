"""A version's training report: metrics.json plus PNG plots a person can open.

    metrics.json     accuracy, per-class precision/recall, confusion matrix, per-epoch history
    curves.png       loss and accuracy per epoch, train and validation
    confusion.png    the validation confusion matrix
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt
import torch

METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"


def confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, n_classes: int) -> list[list[int]]:
    """rows: true class, columns: predicted class."""
    flat = truth.to(torch.int64) * n_classes + predicted.to(torch.int64)
    counts = torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return [[int(v) for v in row] for row in counts.tolist()]


def per_class(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(classes):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        out[name] = {"precision": tp / predicted if predicted else 0.0,
                     "recall": tp / actual if actual else 0.0, "support": actual}
    return out


def render(metrics: dict[str, Any]) -> dict[str, bytes]:
    """The report files for ``metrics`` (which must hold history, classes and confusion)."""
    return {METRICS_FILE: (json.dumps(metrics, indent=2) + "\n").encode(),
            CURVES_FILE: _curves(metrics["history"]),
            CONFUSION_FILE: _confusion(metrics["confusion"], metrics["classes"])}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _curves(history: Sequence[dict[str, float]]) -> bytes:
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def _confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 1.0 + 0.7 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="validation confusion matrix")
    peak = max((max(row) for row in confusion), default=0)
    for i in range(n):
        for j in range(n):
            value = confusion[i][j]
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    return _png(fig)
