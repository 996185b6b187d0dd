"""A version's training report: metrics.json plus PNG plots a person can open.

    metrics.json     accuracy, per-class precision/recall, confusion matrix, per-epoch history
    curves.png       loss and accuracy per epoch, train and validation
    confusion.png    the validation confusion matrix

The plots need matplotlib (the ``report`` extra); without it a version gets metrics.json alone, and says so
in the log.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

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
    """The report files for ``metrics`` (which must hold history, classes and confusion; ``version`` and
    ``best_epoch``, when present, label the plots)."""
    files = {METRICS_FILE: (json.dumps(metrics, indent=2) + "\n").encode()}
    try:
        plt = _pyplot()
    except ImportError:
        log.info("matplotlib is not installed (the `report` extra): no %s or %s", CURVES_FILE, CONFUSION_FILE)
        return files
    title = f"model {metrics['version']}" if metrics.get("version") else "model"
    return {**files, CURVES_FILE: _curves(plt, metrics["history"], title, metrics.get("best_epoch")),
            CONFUSION_FILE: _confusion(plt, metrics["confusion"], metrics["classes"], title)}


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on workers), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _curves(plt: Any, history: Sequence[dict[str, float]], title: str, best_epoch: int | None) -> bytes:
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    if best_epoch is None and history:  # the kept epoch: the best validation accuracy, the earliest of ties
        best_epoch = int(max(history, key=lambda h: (h["val_accuracy"], -h["epoch"]))["epoch"])
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _png(plt, fig)


def _confusion(plt: Any, confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    """Counts, and beside them each row as a share of its true class (what recall looks like per class)."""
    n = len(classes)
    shares = [[v / total if (total := sum(row)) else 0.0 for v in row] for row in confusion]
    fig, axes = plt.subplots(1, 2, figsize=(3.0 + 1.8 * n, 1.4 + 0.7 * n))
    panels = ((axes[0], confusion, "counts", "{:d}"), (axes[1], shares, "share of each true class", "{:.0%}"))
    for ax, values, name, fmt in panels:
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set(xlabel="predicted", ylabel="true" if ax is axes[0] else "", title=name)
        peak = max((max(row) for row in values), default=0)
        for i in range(n):
            for j in range(n):
                value = values[i][j]
                ax.text(j, i, fmt.format(value), ha="center", va="center",
                        color="white" if value > peak / 2 else "black")
    fig.suptitle(f"{title}: validation confusion matrix")
    fig.tight_layout()
    return _png(plt, fig)
