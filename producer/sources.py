"""Reading URL lists: one URL a line, blank lines and `#` comments skipped, `-` for stdin. Streams.

Files are UTF-8. A byte-order mark (U+FEFF, which some editors write at the start of a file, and which a
concatenation of such files leaves at the start of a line) is dropped. A line that is not valid UTF-8 is
never "repaired" into a different URL: it is yielded as an :class:`UndecodableLine`, a ``str`` (the line
with U+FFFD where the bad bytes were, so an index still lines up with the file and reconcile can compare
it) that the submitter turns into an ``invalid_url`` result naming the line, without fetching anything.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from imgq.errors import ImgqError

_BOM = "\ufeff"


class UndecodableLine(str):
    """A line of the URL file that is not valid UTF-8; ``str(self)`` is the line with U+FFFD replacements."""

    reason: str  # e.g. "line 17 is not valid UTF-8 (byte 0xff at offset 12); the URL was not fetched"

    def __new__(cls, raw: bytes, line_no: int, exc: UnicodeDecodeError) -> UndecodableLine:
        self = super().__new__(cls, _strip(raw.decode("utf-8", errors="replace")))
        self.reason = (f"line {line_no} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                       "the URL was not fetched")
        return self


def read_urls(source: str | Path) -> Iterator[str]:
    """The URLs of ``source``, streamed. The file is opened here, not at the first URL: a path that cannot be
    read fails (OSError) before anything, e.g. a job record, is created for it."""
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
        raise ImgqError(f"{name} holds no URL (blank lines and # comments are skipped): nothing was submitted; "
                        "give a file with one URL a line") from None
    return itertools.chain([head], urls)


def rereader(source: str | Path) -> Callable[[], Iterator[str]] | None:
    """Reads ``source`` again (to find what a stalled job is missing); None for stdin, which cannot be."""
    return None if _is_stdin(source) else lambda: read_urls(source)


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
