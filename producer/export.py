"""Exporting results: JSONL (the full record) or CSV (top-1 only), in input order."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
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


def export_results(store: JobStore, job_id: str, out: TextIO, fmt: str = "jsonl") -> ExportSummary:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    total = store.status(job_id).total
    summary = ExportSummary()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS) if fmt == "csv" else None
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
