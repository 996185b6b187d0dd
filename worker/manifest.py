"""Training data from a manifest (CSV or JSONL of url,label), fetched like any classified URL.

Images go through the same Fetcher and decoder, with the same limits, as classification, and are cached
by URL so a retrain does not download them again. Items that fail are reported, never silently dropped.
`imgq results JOB --below 0.6 -o review.csv` writes a manifest in this format.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

from imgq.errors import ImgqError, ItemError
from imgq.settings import Settings
from model.data import ImageRef, LabeledImages, load_source
from worker.decode import decode_image
from worker.fetch import fetch_all

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl")


def is_manifest(source: str) -> bool:
    return source.endswith(MANIFEST_SUFFIXES) and Path(source).is_file()


def load_training_data(source: str, settings: Settings) -> LabeledImages:
    """`demo`, an ImageFolder directory, or a manifest file."""
    return load_manifest(Path(source), settings) if is_manifest(source) else load_source(source)


def read_manifest(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        if path.suffix == ".jsonl":
            for n, line in enumerate(fh, 1):
                if line.strip():
                    record = json.loads(line)
                    rows.append(_row(path, n, record.get("url"), record.get("label")))
        else:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"url", "label"} <= set(reader.fieldnames):
                raise ImgqError(f"{path}: a manifest CSV needs a header with `url` and `label` columns")
            for n, record in enumerate(reader, 2):
                rows.append(_row(path, n, record.get("url"), record.get("label")))
    return rows


def _row(path: Path, line: int, url: object, label: object) -> tuple[str, str]:
    if not isinstance(url, str) or not url or not isinstance(label, str) or not label:
        raise ImgqError(f"{path}:{line}: every row needs a non-empty url and label")
    return url.strip(), label.strip()


def load_manifest(path: Path, settings: Settings) -> LabeledImages:
    rows = read_manifest(path)
    classes = tuple(sorted({label for _, label in rows}))
    if len(classes) < 2:
        raise ImgqError(f"{path}: a manifest needs at least two labels, found {list(classes)}")
    cache = Path(settings.cache_dir) if settings.cache_dir else settings.model_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    paths = [cache / (hashlib.sha256(url.encode()).hexdigest() + ".img") for url, _ in rows]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    fetched = fetch_all([rows[i][0] for i in todo], settings) if todo else []
    failed: dict[int, ItemError] = {}
    for i, body in zip(todo, fetched, strict=True):
        if isinstance(body, ItemError):
            failed[i] = body
            continue
        try:  # only cache what decodes, with the serving limits
            decode_image(body, max_pixels=settings.max_pixels, formats=settings.image_formats)
        except ItemError as err:
            failed[i] = err
            continue
        tmp = paths[i].with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.replace(paths[i])

    index = {name: n for n, name in enumerate(classes)}
    items: list[tuple[ImageRef, int]] = [(paths[i], index[label]) for i, (_, label) in enumerate(rows)
                                         if i not in failed]
    skipped = tuple((rows[i][0], f"{err.code.value}: {err.message}") for i, err in sorted(failed.items()))
    for url, why in skipped:
        log.warning("manifest item skipped: %s (%s)", url, why)
    return LabeledImages(classes=classes, items=tuple(items), skipped=skipped)
