"""Reading a job's input: a URL list or a table (CSV, TSV, JSONL, Parquet), streamed, whatever its size.

URL lists (any other name, and ``-`` for stdin) hold one URL a line; blank lines and `#` comments are skipped.
They are UTF-8. A byte-order mark (U+FEFF, which some editors write at the start of a file, and which a
concatenation of such files leaves at the start of a line) is dropped. A line that is not valid UTF-8 is
never "repaired" into a different URL: it is yielded as an :class:`UndecodableLine`, a ``str`` (the line
with U+FFFD where the bad bytes were, so an index still lines up with the file and reconcile can compare
it) that the submitter turns into an ``invalid_url`` result naming the line, without fetching anything.

Tables are chosen by extension (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq``). Their URL
is in one column (``url`` unless named), and ``keep`` columns are copied into each result record. Each data
row is one item, in file order: a row whose URL cell is empty or null, not valid UTF-8, or (JSONL) a line that
is not a JSON object, is an :class:`Unfetchable` item that ends as one ``invalid_url`` result; no row is ever
dropped (but CSV's blank lines and JSONL's empty lines, which are no row). CSV and TSV cells are kept as the
text they are (``007`` stays ``"007"``); JSONL values as they are; Parquet values as JSON scalars
(:func:`json_scalar`). A URL read from a table is a :class:`TableUrl`, a ``str`` carrying its row's ``kept``
columns. The columns are checked when the file is opened (the CSV header, the Parquet schema, the first JSONL
object): a missing one fails before any job is created.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import itertools
import json
import math
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from imgq.errors import ImgqError

_BOM = "\ufeff"
# Rows read from a Parquet file at a time: a few MB of URLs, whatever the file's size.
_PARQUET_ROWS = 8192
_PARQUET_BUFFER = 1 << 20
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                  ".pq": "parquet"}

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Columns:
    """Which columns of a table matter: the URL's, and those copied into each result record."""

    url: str = "url"
    keep: tuple[str, ...] = ()

    def option_text(self) -> str:
        """The flags that select these columns again (for a command line in a message)."""
        url = "" if self.url == "url" else f" --url-column {self.url}"
        return url + (f" --keep {','.join(self.keep)}" if self.keep else "")


class TableUrl(str):
    """A URL read from a table row, with the row's kept columns."""

    kept: dict[str, Scalar]

    def __new__(cls, url: str, kept: dict[str, Scalar]) -> TableUrl:
        self = super().__new__(cls, url)
        self.kept = kept
        return self


class Unfetchable(str):
    """An item answered at submit time, never fetched (``reason`` says why); ``str(self)`` is what stands for
    its URL in the result."""

    reason: str
    kept: dict[str, Scalar]


class UndecodableLine(Unfetchable):
    """A line of the URL file that is not valid UTF-8; ``str(self)`` is the line with U+FFFD replacements."""

    def __new__(cls, raw: bytes, line_no: int, exc: UnicodeDecodeError) -> UndecodableLine:
        self = super().__new__(cls, _strip(raw.decode("utf-8", errors="replace")))
        self.reason = (f"line {line_no} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                       "the URL was not fetched")
        self.kept = {}
        return self


class BadRow(Unfetchable):
    """A table row with no URL to fetch: an empty or null URL cell, one that is not valid UTF-8, a JSONL line
    that is not a JSON object."""

    def __new__(cls, text: str, reason: str, kept: dict[str, Scalar]) -> BadRow:
        self = super().__new__(cls, text)
        self.reason = reason
        self.kept = kept
        return self


def kept_of(url: str) -> dict[str, Scalar]:
    """The kept columns an input item carries ({} for a line of a URL list)."""
    kept: dict[str, Scalar] = getattr(url, "kept", {})
    return kept


def is_table(source: str | Path) -> bool:
    return not _is_stdin(source) and Path(source).suffix.lower() in TABLE_SUFFIXES


def read_items(source: str | Path, columns: Columns | None = None) -> Iterator[str]:
    """The items of ``source``, a table or a URL list, streamed. The file is opened (and a table's columns
    checked) here, not at the first item: a path that cannot be read (OSError) or a table without the columns
    (ImgqError) fails before anything, e.g. a job record, is created for it."""
    if not is_table(source):
        return read_urls(source)
    path = Path(source)
    cols = columns or Columns()
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        return _parquet(path, cols)
    if kind == "jsonl":
        return _jsonl(path, cols)
    return _delimited(path, cols, "\t" if kind == "tsv" else ",")


def read_urls(source: str | Path) -> Iterator[str]:
    """The URLs of the URL list ``source``, streamed (opened here, as :func:`read_items` says)."""
    if _is_stdin(source):
        return _clean(sys.stdin.buffer)
    fh = open(source, "rb")  # noqa: SIM115 (closed by _closing when the URLs are used up or dropped)
    return _closing(fh)


def _closing(fh: BinaryIO) -> Iterator[str]:
    with fh:
        yield from _clean(fh)


def first_url(urls: Iterator[str], source: str | Path) -> Iterator[str]:
    """``urls`` unchanged, after checking that there is at least one: an empty file is a mistake (a wrong
    path, an export that failed), not an empty job."""
    try:
        head = next(urls)
    except StopIteration:
        name = "stdin" if _is_stdin(source) else str(source)
        what = "no data row" if is_table(source) else "no URL (blank lines and # comments are skipped)"
        raise ImgqError(f"{name} holds {what}: nothing was submitted; give a file with one URL a line or a table "
                        "with a URL column") from None
    return itertools.chain([head], urls)


def rereader(source: str | Path, columns: Columns | None = None) -> Callable[[], Iterator[str]] | None:
    """Reads ``source`` again (to find what a stalled job is missing); None for stdin, which cannot be."""
    return None if _is_stdin(source) else lambda: read_items(source, columns)


def json_scalar(value: object) -> Scalar:
    """A kept value as JSON can carry it, the same every time it is read (resume compares them): dates and
    times as ISO 8601 text, decimals as their exact text, durations in seconds, NaN and infinities as null,
    bytes as UTF-8 text, lists, structs and maps as their JSON text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return json.dumps(value, default=json_scalar, separators=(",", ":"), ensure_ascii=False)


def _is_stdin(source: str | Path) -> bool:
    return str(source) == "-"


def _strip(line: str) -> str:
    return line.strip().removeprefix(_BOM).strip()


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines split as text mode's universal newlines split them (\\n, \\r\\n or \\r)."""
    for chunk in chunks:
        yield from chunk.splitlines()


def _clean(chunks: Iterable[bytes]) -> Iterator[str]:
    for line_no, raw in enumerate(_lines(chunks), start=1):
        try:
            url: str = _strip(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            url = UndecodableLine(raw, line_no, exc)
        if url and not url.startswith("#"):
            yield url


def _require(path: Path, names: Sequence[str], cols: Columns) -> None:
    """Every column named must be in the table: one line naming the first missing one and the columns there are."""
    have = set(names)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    if cols.url not in have:
        raise ImgqError(f"{path} has no column {cols.url!r} (its columns: {shown}); name the URL column with "
                        "--url-column")
    for name in cols.keep:
        if name not in have:
            raise ImgqError(f"{path} has no column {name!r} to keep (its columns: {shown}); fix --keep")


def _url_cell(value: object, where: str, cols: Columns, kept: dict[str, Scalar]) -> str:
    """A URL cell as an item: the URL, or a :class:`BadRow` if there is none to fetch."""
    if value is None or (url := str(value).strip()) == "":
        return BadRow("", f"{where} has no URL (its {cols.url!r} cell is empty); nothing was fetched", kept)
    return TableUrl(url, kept) if kept else url


# CSV and TSV: the csv module, so quoting and fields spanning lines are read as every CSV writer means them.
# Bytes that are not UTF-8 are read as surrogates (surrogateescape), so one bad cell flags its row only.

def _delimited(path: Path, cols: Columns, delimiter: str) -> Iterator[str]:
    fh = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")  # noqa: SIM115 (closed below)
    try:
        reader = csv.reader(fh, delimiter=delimiter)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise ImgqError(f"{path} is empty: a table needs a header row naming its columns (one of them "
                            f"{cols.url!r})")
        _require(path, header, cols)
    except BaseException:
        fh.close()
        raise
    return _delimited_rows(fh, reader, header, cols)


def _delimited_rows(fh: Any, reader: Any, header: list[str], cols: Columns) -> Iterator[str]:
    at = {name: header.index(name) for name in (cols.url, *cols.keep)}
    url_at = at[cols.url]
    with fh:
        for row_no, row in enumerate((r for r in reader if r), start=1):
            kept: dict[str, Scalar] = {name: _text(row[at[name]]) if at[name] < len(row) else None
                                       for name in cols.keep}
            cell = row[url_at].strip() if url_at < len(row) else ""
            where = f"row {row_no} (line {reader.line_num})"
            if not _is_utf8(cell):
                yield BadRow(_text(cell), f"{where}: its {cols.url!r} cell is not valid UTF-8; the URL was not "
                             "fetched", kept)
            else:
                yield _url_cell(cell, where, cols, kept)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(cell: str) -> str:
    """A cell read with surrogateescape, as valid text (bad bytes become U+FFFD)."""
    return cell if _is_utf8(cell) else cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# JSONL: one object a line. It has no header: the first object's keys are checked for the columns (a later
# row without the URL key is a row with no URL; one without a kept key keeps null).

def _jsonl(path: Path, cols: Columns) -> Iterator[str]:
    fh = open(path, "rb")  # noqa: SIM115 (closed by _jsonl_rows)
    try:
        rows = _jsonl_rows(fh, path, cols)
        head = next(rows, None)
    except BaseException:
        fh.close()
        raise
    return iter(()) if head is None else itertools.chain([head], rows)


def _jsonl_rows(fh: BinaryIO, path: Path, cols: Columns) -> Iterator[str]:
    checked = False
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            line = raw.strip().removeprefix(_BOM.encode())
            if not line:
                continue
            where = f"line {line_no}"
            try:
                obj = json.loads(line)
            except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
                yield BadRow(line.decode("utf-8", "replace")[:200], f"{where} is not JSON ({exc}); nothing was "
                             "fetched", dict.fromkeys(cols.keep))
                continue
            if not isinstance(obj, dict):
                yield BadRow(line.decode("utf-8", "replace")[:200], f"{where} is not a JSON object; nothing was "
                             "fetched", dict.fromkeys(cols.keep))
                continue
            if not checked:
                _require(path, list(obj), cols)
                checked = True
            kept = {name: json_scalar(obj.get(name)) for name in cols.keep}
            yield _url_cell(obj.get(cols.url), where, cols, kept)


# Parquet: pyarrow reads the needed columns only, a batch of rows at a time, through a buffer.

def _parquet(path: Path, cols: Columns) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Buffered column reads without pre-buffering: Arrow holds about a buffer per column, not whole
        # column chunks of a row group (measured: 8 MiB of Arrow memory for 1M or 5M rows, 51 MiB without).
        pf = pq.ParquetFile(path, buffer_size=_PARQUET_BUFFER, pre_buffer=False)
    except (pa.ArrowException, ValueError) as exc:
        raise ImgqError(f"{path} is not a Parquet file that can be read ({exc}); check the file") from exc
    _require(path, pf.schema_arrow.names, cols)
    return _parquet_rows(pf, cols)


def _parquet_rows(pf: Any, cols: Columns) -> Iterator[str]:
    names = list(dict.fromkeys((cols.url, *cols.keep)))
    row_no = 0
    with pf:
        for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=names):
            urls = _arrow_values(batch.column(names.index(cols.url)))
            kept_columns = {name: _arrow_values(batch.column(names.index(name))) for name in cols.keep}
            for i, url in enumerate(urls):
                row_no += 1
                kept = {name: json_scalar(values[i]) for name, values in kept_columns.items()}
                yield _url_cell(url, f"row {row_no}", cols, kept)


def _arrow_values(column: Any) -> list[Any]:
    """A column's values as Python objects; timestamps as ISO 8601 text, formatted by Arrow, so nanoseconds
    are kept (a Python datetime has microseconds only)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_timestamp(column.type):
        fmt = "%Y-%m-%dT%H:%M:%S" + ("%z" if column.type.tz else "")
        column = pc.strftime(column, format=fmt)
    values: list[Any] = column.to_pylist()
    return values
