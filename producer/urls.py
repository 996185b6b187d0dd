"""Reading URL lists: one URL a line, blank lines and `#` comments skipped, `-` for stdin. Streams."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path


def read_urls(source: str | Path) -> Iterator[str]:
    if str(source) == "-":
        yield from _clean(sys.stdin)
        return
    with open(source, encoding="utf-8", errors="replace") as fh:
        yield from _clean(fh)


def _clean(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        url = line.strip()
        if url and not url.startswith("#"):
            yield url
