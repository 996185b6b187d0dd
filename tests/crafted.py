"""Decode-time bombs for tests, built in memory: images far under IMGQ_MAX_BYTES that cost seconds of CPU.

:func:`many_scan_jpeg` is the progressive-JPEG scan attack libjpeg-turbo documents: a progressive JPEG may
carry any number of scans, every scan is a pass of the entropy decoder over every block of its component,
and a scan of an image with nothing left to refine codes to a few bytes (end-of-band runs). So a file of
~100 KB can ask for thousands of passes over millions of blocks.

It is built from a small-detail progressive JPEG that Pillow writes: libjpeg's standard progression ends
with the luma AC refinement scan (Ss=1, Se=63, Ah=1, Al=0), whose table is already defined; that scan
(its SOS segment and entropy-coded data) is repeated before EOI. libjpeg warns about a repeated
refinement ("bogus progression") but decodes each repeat in full; Pillow ignores libjpeg's warnings.

:func:`many_segment_jpeg` and :func:`many_chunk_png` are bombs of Pillow's own parsing: empty segments or
chunks, which Pillow reads one by one in Python.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

from PIL import Image

SOS = 0xDA
EOI = 0xD9


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of every marker segment, a scan's entropy-coded data counted in its SOS segment.

    A reader of the marker structure as libjpeg reads it: a marker is 0xFF (any number of fill 0xFF) and a
    byte that is not 0x00; inside entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or RSTn.
    """
    out: list[tuple[int, int, int]] = []
    pos = 2  # after SOI
    while pos < len(data):
        assert data[pos] == 0xFF, f"expected a marker at {pos}"
        while data[pos + 1] == 0xFF:
            pos += 1
        marker = data[pos + 1]
        if marker == EOI:
            out.append((marker, pos, pos + 2))
            break
        (length,) = struct.unpack(">H", data[pos + 2: pos + 4])
        end = pos + 2 + length
        if marker == SOS:
            end = _end_of_scan(data, end)
        out.append((marker, pos, end))
        pos = end
    return out


def _end_of_scan(data: bytes, pos: int) -> int:
    while True:
        pos = data.index(b"\xff", pos)
        follower = data[pos + 1]
        if follower == 0x00 or 0xD0 <= follower <= 0xD7 or follower == 0xFF:
            pos += 1 if follower == 0xFF else 2
            continue
        return pos


def scan_count(data: bytes) -> int:
    return sum(1 for marker, _, _ in segments(data) if marker == SOS)


@cache
def many_scan_jpeg(scans: int = 5000, size: int = 2048) -> bytes:
    """A progressive greyscale ``size`` x ``size`` JPEG with ``scans`` scans (at least the ~6 libjpeg writes)."""
    base = io.BytesIO()
    # Greyscale and flat: its refinement scans are end-of-band runs of a few bytes each.
    Image.new("L", (size, size), 128).save(base, "JPEG", progressive=True, quality=90)
    data = base.getvalue()
    segs = segments(data)
    (eoi, eoi_start, _), (last, scan_start, scan_end) = segs[-1], segs[-2]
    assert eoi == EOI and last == SOS, "expected the progression to end with a scan, then EOI"
    sos_header = data[scan_start + 4: scan_start + 2 + struct.unpack(">H", data[scan_start + 2: scan_start + 4])[0]]
    # Ns=1, then (component id, tables), then Ss, Se, Ah<<4|Al: the luma AC refinement 1..63, Ah=1, Al=0.
    assert sos_header[0] == 1 and sos_header[3:6] == b"\x01\x3f\x10", sos_header.hex()
    existing = sum(1 for marker, _, _ in segs if marker == SOS)
    repeat = data[scan_start:scan_end]
    return data[:eoi_start] + repeat * max(0, scans - existing) + data[eoi_start:]


def many_segment_jpeg(segments: int = 1_000_000) -> bytes:
    """A tiny JPEG whose header carries ``segments`` empty APP1 segments (4 bytes each) before its frame.

    Pillow parses header segments in Python, a few microseconds each: 5 million (20 MB) cost ~15 s.
    """
    base = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(base, "JPEG")
    data = base.getvalue()
    return data[:2] + b"\xff\xe1\x00\x02" * segments + data[2:]


def many_chunk_png(chunks: int = 1_000_000) -> bytes:
    """A tiny PNG with ``chunks`` empty ancillary chunks (12 bytes each) after IHDR; Pillow reads each in Python."""
    base = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(base, "PNG")
    data = base.getvalue()
    empty = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
    ihdr_end = 8 + 25
    return data[:ihdr_end] + empty * chunks + data[ihdr_end:]
