"""Reading URL lists: one URL a line, blank lines and `#` comments skipped, `-` for stdin. Streams."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


def read_urls(source: str | Path) -> Iterator[str]:
    if _is_stdin(source):
        yield from _clean(sys.stdin)
        return
    with open(source, encoding="utf-8", errors="replace") as fh:
        yield from _clean(fh)


def rereader(source: str | Path) -> Callable[[], Iterator[str]] | None:
    """Reads ``source`` again (to find what a stalled job is missing); None for stdin, which cannot be."""
    return None if _is_stdin(source) else lambda: read_urls(source)


def _is_stdin(source: str | Path) -> bool:
    return str(source) == "-"


def _clean(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        url = line.strip()
        if url and not url.startswith("#"):
            yield url
