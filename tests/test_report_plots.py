"""The training report's files: plots when matplotlib is there (the [report] extra), metrics.json alone when not."""

from __future__ import annotations

import json

import pytest

from model import report

METRICS = {
    "version": "20261201T000000Z-abcd1234",
    "history": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e + 0.1 * (e == 3),
                 "train_accuracy": 0.3 * e, "val_accuracy": [0.5, 0.9, 0.85][e - 1]} for e in (1, 2, 3)],
    "confusion": [[5, 1], [0, 4]],
    "classes": ["circle", "square"],
}


def test_a_report_has_metrics_and_both_plots() -> None:
    files = report.render(METRICS)
    assert set(files) == {report.METRICS_FILE, report.CURVES_FILE, report.CONFUSION_FILE}
    assert json.loads(files[report.METRICS_FILE])["version"] == METRICS["version"]
    for name in (report.CURVES_FILE, report.CONFUSION_FILE):
        assert files[name].startswith(b"\x89PNG\r\n\x1a\n"), name


def test_without_matplotlib_a_report_is_metrics_json_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "_pyplot", missing)
    assert set(report.render(METRICS)) == {report.METRICS_FILE}
