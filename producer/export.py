"""Exporting results in input order: JSONL (the full record), CSV (top-1 only) or Parquet (the full record);
a job's summary; review manifests. The part files of a streamed export (:mod:`producer.follow`) are written
with the same record writers.

A record may carry fields beyond its own (`--keep` columns copied from the input table): every format carries
them. JSONL writes the record as it is; CSV and Parquet add one column for each extra field any record has
(the union, in first-seen order), empty where a record lacks it, so a CSV or Parquet export of a whole job
reads the job twice (once for the columns).

Parquet columns are the JSONL record's fields, with the same names and nesting: ``index`` int64, ``url``,
``label``, ``model_version`` string, ``confidence`` float64, ``topk`` list<struct<label: string, score:
float64>>, ``error`` struct<code: string, message: string> (null for a label), then the extra fields: bool,
int64, float64 or string from the values they hold (a field whose values mix kinds, or hold lists or
objects, is a string of JSON). Reading a file back (``pyarrow.parquet.read_table(f).to_pylist()``) gives the
JSONL records.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imgq.jobs import RECORD_FIELDS, JobStore

FORMATS = ("jsonl", "csv", "parquet")
# What -o's extension says when --format does not.
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
               ".pq": "parquet"}
CSV_FIELDS = ("index", "url", "label", "confidence", "model_version", "error_code", "error_message")
# Parquet rows per row group (and records read from Redis per write): bounds the exporter's memory.
ROW_GROUP = 65_536


def format_for(path: Path | None, fmt: str | None) -> str:
    """``--format`` if given, else from ``-o``'s extension (.csv, .parquet/.pq), else jsonl."""
    if fmt is not None:
        return fmt
    return _EXTENSIONS.get(path.suffix.lower(), "jsonl") if path is not None else "jsonl"


@dataclass
class ExportSummary:
    written: int = 0
    missing: int = 0
    labelled: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    exported: int = 0  # results no longer in Redis: `imgq results --follow` moved them into part files

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"results": self.written, "missing": self.missing, "labelled": self.labelled,
                               "errors": dict(sorted(self.errors.items())), "labels": dict(sorted(self.labels.items()))}
        return {**out, "exported": self.exported} if self.exported else out

    def describe(self) -> str:
        def counts(c: Counter[str]) -> str:
            return ", ".join(f"{k}={n}" for k, n in sorted(c.items())) or "none"

        lines = [f"{'results':>9}: {self.written}", f"{'missing':>9}: {self.missing}",
                 f"{'labelled':>9}: {self.labelled} ({counts(self.labels)})",
                 f"{'errors':>9}: {sum(self.errors.values())} ({counts(self.errors)})"]
        if self.exported:
            lines.append(f"{'exported':>9}: {self.exported} (in part files of `imgq results --follow`, not counted "
                         "above)")
        return "\n".join(lines)

    def add(self, record: dict[str, Any]) -> None:
        self.written += 1
        if record["error"]:
            self.errors[record["error"]["code"]] += 1
        else:
            self.labelled += 1
            self.labels[record["label"]] += 1


class ExtraFields:
    """The extra fields records carry beyond the record's own, in first-seen order, with the kinds of value
    each one holds (for its Parquet type)."""

    def __init__(self) -> None:
        self.kinds: dict[str, set[type]] = {}

    @classmethod
    def of(cls, records: Iterable[dict[str, Any] | None]) -> ExtraFields:
        columns = cls()
        for record in records:
            if record is not None:
                columns.observe(record)
        return columns

    def observe(self, record: dict[str, Any]) -> None:
        if len(record) == len(RECORD_FIELDS):  # the common case: no extra field
            return
        for name, value in record.items():
            if name not in RECORD_FIELDS:
                kinds = self.kinds.setdefault(name, set())
                if value is not None:
                    kinds.add(type(value))

    @property
    def names(self) -> list[str]:
        return list(self.kinds)

    def kind(self, name: str) -> str:
        """bool, int, float, str, or json (mixed kinds, lists, objects: written as JSON text)."""
        kinds = self.kinds[name]
        if kinds == {bool}:
            return "bool"
        if kinds == {int}:
            return "int"
        if kinds and kinds <= {int, float}:
            return "float"
        return "str" if kinds <= {str} else "json"


def open_output(path: Path | None) -> TextIO:
    """``path`` for writing, or stdout for None or ``-``."""
    if path is None or str(path) == "-":
        return sys.stdout
    return open(path, "w", encoding="utf-8", newline="")  # the caller closes it


def export_results(store: JobStore, job_id: str, out: TextIO | None, fmt: str = "jsonl") -> ExportSummary:
    """Write the results that are in Redis, in input order (``out`` None: only count them)."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"unknown text format {fmt!r}; choose jsonl or csv (parquet: export_parquet)")
    status = store.status(job_id)
    summary = ExportSummary(exported=status.exported)
    writer = None
    if fmt == "csv" and out is not None:
        writer = CsvWriter(out, ExtraFields.of(store.iter_results(job_id, status.total)))
    for record in store.iter_results(job_id, status.total):
        if record is None:
            summary.missing += 1
            continue
        summary.add(record)
        if out is None:
            continue
        if writer:
            writer.write(record)
        else:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    summary.missing -= status.exported  # an exported index reads as None here, but it has its result
    return summary


def export_parquet(store: JobStore, job_id: str, path: Path) -> ExportSummary:
    """The results that are in Redis, in input order, as one Parquet file (written under a temporary name and
    renamed, so ``path`` is never half written)."""
    import pyarrow.parquet as pq

    status = store.status(job_id)
    summary = ExportSummary(exported=status.exported)
    schema = parquet_schema(ExtraFields.of(store.iter_results(job_id, status.total)))
    tmp = path.with_name(f".{path.name}.tmp")
    rows: list[dict[str, Any]] = []
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for record in store.iter_results(job_id, status.total):
                if record is None:
                    summary.missing += 1
                    continue
                summary.add(record)
                rows.append(record)
                if len(rows) >= ROW_GROUP:
                    writer.write_table(parquet_table(rows, schema))
                    rows.clear()
            if rows or summary.written == 0:  # an empty job still gets a file with its schema
                writer.write_table(parquet_table(rows, schema))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    summary.missing -= status.exported
    return summary


class CsvWriter:
    """``CSV_FIELDS`` then the extra columns; a header first."""

    def __init__(self, out: TextIO, columns: ExtraFields) -> None:
        self.extras = columns.names
        self.writer = csv.DictWriter(out, fieldnames=[*CSV_FIELDS, *self.extras])
        self.writer.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        error = record["error"] or {}
        row = {"index": record["index"], "url": record["url"], "label": record["label"] or "",
               "confidence": "" if record["confidence"] is None else record["confidence"],
               "model_version": record["model_version"] or "", "error_code": error.get("code", ""),
               "error_message": error.get("message", "")}
        for name in self.extras:
            value = record.get(name)
            row[name] = "" if value is None else value if isinstance(value, str | int | float) else json.dumps(value)
        self.writer.writerow(row)


def write_records(records: Sequence[dict[str, Any]], path: Path, fmt: str) -> None:
    """``records`` as one whole file of ``fmt`` at ``path`` (a part file), flushed and fsynced."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = parquet_schema(ExtraFields.of(records))
        with open(path, "wb") as fh:
            pq.write_table(parquet_table(records, schema), fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        return
    with open(path, "w", encoding="utf-8", newline="") as text:
        if fmt == "csv":
            csv_writer = CsvWriter(text, ExtraFields.of(records))
            for record in records:
                csv_writer.write(record)
        else:
            text.writelines(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        text.flush()
        os.fsync(text.fileno())


def parquet_schema(columns: ExtraFields) -> Any:
    """The record's own columns (module docstring), then ``columns``."""
    import pyarrow as pa

    types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(), "json": pa.string()}
    return pa.schema([
        ("index", pa.int64()), ("url", pa.string()), ("label", pa.string()), ("confidence", pa.float64()),
        ("topk", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
        ("model_version", pa.string()), ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
        *((name, types[columns.kind(name)]) for name in columns.names),
    ])


def parquet_table(records: Sequence[dict[str, Any]], schema: Any) -> Any:
    import pyarrow as pa

    as_json = [f.name for f in schema if f.name not in RECORD_FIELDS and not _scalar_type(f.type)]
    if as_json:  # string columns: their non-string values as JSON text
        records = [{**r, **{n: _json_text(r.get(n)) for n in as_json}} for r in records]
    return pa.Table.from_pylist(list(records), schema=schema)


def _scalar_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_boolean(arrow_type) or pa.types.is_integer(arrow_type) or
                pa.types.is_floating(arrow_type))


def _json_text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value)


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
