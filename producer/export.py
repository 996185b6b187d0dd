"""Exporting results: JSONL (the full record) or CSV (top-1 only), in input order; a job's summary."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imgq.jobs import JobStore

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("index", "url", "label", "confidence", "model_version", "error_code", "error_message")


@dataclass
class ExportSummary:
    written: int = 0
    missing: int = 0
    labelled: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"results": self.written, "missing": self.missing, "labelled": self.labelled,
                "errors": dict(sorted(self.errors.items())), "labels": dict(sorted(self.labels.items()))}

    def describe(self) -> str:
        def counts(c: Counter[str]) -> str:
            return ", ".join(f"{k}={n}" for k, n in sorted(c.items())) or "none"

        return "\n".join([f"{'results':>9}: {self.written}", f"{'missing':>9}: {self.missing}",
                          f"{'labelled':>9}: {self.labelled} ({counts(self.labels)})",
                          f"{'errors':>9}: {sum(self.errors.values())} ({counts(self.errors)})"])


def open_output(path: Path | None) -> TextIO:
    """``path`` for writing, or stdout for None or ``-``."""
    if path is None or str(path) == "-":
        return sys.stdout
    return open(path, "w", encoding="utf-8", newline="")  # the caller closes it


def export_results(store: JobStore, job_id: str, out: TextIO | None, fmt: str = "jsonl") -> ExportSummary:
    """Write the results that exist, in input order (``out`` None: only count them)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    total = store.status(job_id).total
    summary = ExportSummary()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS) if fmt == "csv" and out is not None else None
    if writer:
        writer.writeheader()
    for record in store.iter_results(job_id, total):
        if record is None:
            summary.missing += 1
            continue
        summary.written += 1
        if record["error"]:
            summary.errors[record["error"]["code"]] += 1
        else:
            summary.labelled += 1
            summary.labels[record["label"]] += 1
        if out is None:
            continue
        if writer:
            writer.writerow(_csv_row(record))
        else:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    return summary


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    error = record["error"] or {}
    return {"index": record["index"], "url": record["url"], "label": record["label"] or "",
            "confidence": "" if record["confidence"] is None else record["confidence"],
            "model_version": record["model_version"] or "", "error_code": error.get("code", ""),
            "error_message": error.get("message", "")}


REVIEW_FIELDS = ("url", "label", "confidence", "model_version", "index")


def export_review(store: JobStore, job_id: str, out: TextIO, below: float, fmt: str = "csv") -> int:
    """Labelled items with confidence < ``below``, as a training manifest (url,label): a person corrects
    the labels, and `imgq retrain --data review.csv` learns from them. Returns the number written."""
    total = store.status(job_id).total
    writer = csv.DictWriter(out, fieldnames=REVIEW_FIELDS, extrasaction="ignore") if fmt == "csv" else None
    if writer:
        writer.writeheader()
    written = 0
    for record in store.iter_results(job_id, total):
        if record is None or record["error"] or record["confidence"] >= below:
            continue
        written += 1
        if writer:
            writer.writerow(record)
        else:
            out.write(json.dumps({k: record[k] for k in REVIEW_FIELDS}, separators=(",", ":")) + "\n")
    return written
