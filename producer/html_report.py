"""`imgq report JOB -o report.html`: one self-contained HTML page for a person to look at a job.

Thumbnails are fetched again through the worker's :class:`~worker.fetch.Fetcher` (the same limits and
address guard as classification) and decoder, then embedded as small base64 JPEGs. The page loads nothing
from anywhere (its Content-Security-Policy forbids it): it works from a file, offline, or as an attachment.
Failed items, and items whose image can no longer be fetched, get a placeholder instead of a thumbnail.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgq.errors import ItemError
from imgq.jobs import JobStatus, JobStore
from imgq.settings import Settings

THUMB_PX = 96
# Items shown as cards; the counts and distributions still cover the whole job. ~3 KB per thumbnail.
DEFAULT_LIMIT = 2000
# Fetches in flight at once; bodies are dropped as soon as their thumbnail is made.
_FETCH_CHUNK = 64
# What fits on one line of a card at the page's 11 px URL font.
_URL_CHARS = 26

Record = dict[str, Any]


@dataclass
class ReportSummary:
    items: int = 0           # cards on the page
    thumbnails: int = 0      # of which with a thumbnail
    labels: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    pending: int = 0
    versions: set[str] = field(default_factory=set)


def write_report(settings: Settings, store: JobStore, job_id: str, out: Path,
                 *, limit: int = DEFAULT_LIMIT) -> ReportSummary:
    status = store.status(job_id)
    summary = ReportSummary()
    shown: list[tuple[int, Record | None]] = []
    for index, record in enumerate(store.iter_results(job_id, status.total)):
        _tally(summary, record)
        if index < limit:
            shown.append((index, record))
    labelled = {i: str(r["url"]) for i, r in shown if r is not None and not r["error"]}
    thumbs = fetch_thumbnails(labelled, settings)
    summary.items = len(shown)
    summary.thumbnails = sum(1 for t in thumbs.values() if t)
    out.write_text(render_report(status, shown, thumbs, summary), encoding="utf-8")
    return summary


def _tally(summary: ReportSummary, record: Record | None) -> None:
    if record is None:
        summary.pending += 1
    elif record["error"]:
        summary.errors[record["error"]["code"]] += 1
    else:
        summary.labels[record["label"]] += 1
    if record is not None and record.get("model_version"):
        summary.versions.add(record["model_version"])


def thumbnail(body: bytes, settings: Settings) -> str:
    """A data: URI of a JPEG at most THUMB_PX on a side; ItemError if the bytes are not an allowed image."""
    from worker.decode import decode_image  # Pillow and numpy: only when a report is made

    image = decode_image(body, max_pixels=settings.max_pixels, formats=settings.image_formats, draft_size=THUMB_PX)
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=70, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fetch_thumbnails(urls: dict[int, str], settings: Settings) -> dict[int, str | None]:
    """index -> thumbnail data URI, or None where the image could not be fetched or decoded again."""
    from worker.fetch import Fetcher

    async def run() -> dict[int, str | None]:
        thumbs: dict[int, str | None] = {}
        async with Fetcher(settings) as fetcher:
            items = iter(urls.items())
            while chunk := list(itertools.islice(items, _FETCH_CHUNK)):
                bodies = await fetcher.fetch_many([url for _, url in chunk])
                for (index, _), body in zip(chunk, bodies, strict=True):
                    thumbs[index] = _thumb_or_none(body, settings)
        return thumbs

    return asyncio.run(run()) if urls else {}


def _thumb_or_none(body: bytes | ItemError, settings: Settings) -> str | None:
    if isinstance(body, ItemError):
        return None
    try:
        return thumbnail(body, settings)
    except ItemError:
        return None


# -- rendering -------------------------------------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _bars(counts: Counter[str], css_class: str) -> str:
    if not counts:
        return '<p class="none">none</p>'
    top = max(counts.values())
    total = sum(counts.values())
    rows = []
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append(f'<div class="bar-row"><span class="bar-name" title="{_e(name)}">{_e(name)}</span>'
                    f'<span class="bar-track"><span class="bar {css_class}" style="width:{100 * n / top:.1f}%">'
                    f'</span></span><span class="bar-count">{n} <small>{100 * n / total:.0f}%</small></span></div>')
    return "\n".join(rows)


def _short_url(url: str) -> str:
    # Cards are narrow and URLs of one job share their start: show the end, where they differ.
    bare = url.split("://", 1)[-1].split("?", 1)[0]  # the query (often a signature) stays in the tooltip
    if len(bare) <= _URL_CHARS:
        return bare
    tail = bare.rsplit("/", 1)[-1][-(_URL_CHARS - 2):]
    for segment in reversed(bare.split("/")[1:-1]):  # whole path segments, as many as fit
        if len(segment) + len(tail) + 1 > _URL_CHARS - 2:
            break
        tail = f"{segment}/{tail}"
    return f"…/{tail}"


def _card(index: int, record: Record | None, thumb: str | None) -> str:
    if record is None:
        return (f'<figure class="item pending" data-index="{index}" data-label="" data-error="" data-confidence="">'
                f'<div class="thumb placeholder">pending</div><figcaption><span class="idx">#{index}</span>'
                f'<span class="muted">no result yet</span></figcaption></figure>')
    url = str(record["url"])
    short = _e(_short_url(url))
    link = (f'<a class="url" href="{_e(url)}" title="{_e(url)}" rel="noopener noreferrer">{short}</a>'
            if url.startswith(("http://", "https://")) else f'<span class="url" title="{_e(url)}">{short}</span>')
    error = record["error"]
    if error:
        code = str(error["code"])
        message = str(error.get("message", "")).removeprefix(f"{url}: ")  # the URL is on the card already
        return (f'<figure class="item failed" data-index="{index}" data-label="" data-error="{_e(code)}" '
                f'data-confidence=""><div class="thumb placeholder error">{_e(code).replace("_", "_<wbr>")}</div>'
                f'<figcaption>'
                f'<span class="idx">#{index}</span><b class="code">{_e(code)}</b>'
                f'<span class="message" title="{_e(message)}">{_e(message)}</span>{link}</figcaption></figure>')
    label, conf = str(record["label"]), float(record["confidence"])
    level = "high" if conf >= 0.8 else "mid" if conf >= 0.5 else "low"
    image = (f'<img class="thumb" src="{thumb}" alt="{_e(label)}">' if thumb else
             '<div class="thumb placeholder" title="the image could not be fetched again">no thumbnail</div>')
    return (f'<figure class="item" data-index="{index}" data-label="{_e(label)}" data-error="" '
            f'data-confidence="{conf:.6f}">{image}<figcaption><span class="idx">#{index}</span>'
            f'<b class="label">{_e(label)}</b><span class="conf {level}">{100 * conf:.1f}%</span>'
            f'<span class="conf-track"><span class="conf-bar {level}" style="width:{100 * conf:.1f}%"></span></span>'
            f'{link}</figcaption></figure>')


def _options(names: Iterable[str]) -> str:
    return "".join(f'<option value="{_e(n)}">{_e(n)}</option>' for n in sorted(names))


def render_report(status: JobStatus, shown: Sequence[tuple[int, Record | None]], thumbs: dict[int, str | None],
                  summary: ReportSummary, *, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    labelled, failed = sum(summary.labels.values()), sum(summary.errors.values())
    truncated = (f'<p class="note">Showing the first {len(shown)} of {status.total} items; the counts and charts '
                 f'cover all of them (<code>imgq report --limit N</code>).</p>' if len(shown) < status.total else "")
    versions = ", ".join(sorted(summary.versions)) or "none"
    cards = "\n".join(_card(i, r, thumbs.get(i)) for i, r in shown)
    return _PAGE.format(
        job=_e(status.job_id), state=_e(status.state), total=status.total, labelled=labelled, failed=failed,
        pending=summary.pending, versions=_e(versions), generated=_e(now.strftime("%Y-%m-%d %H:%M:%S UTC")),
        truncated=truncated, class_bars=_bars(summary.labels, "label-bar"),
        error_bars=_bars(summary.errors, "error-bar"),
        label_options=_options(summary.labels), error_options=_options(summary.errors), cards=cards,
        shown=len(shown), style=_STYLE, script=_SCRIPT)


_STYLE = """
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#6b7280; --line:#e3e6eb; --accent:#2f6fde;
        --high:#1f9d55; --mid:#d98e04; --low:#d64545; --err:#b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg);
       color: var(--ink); }
header { padding: 18px 24px 8px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h1 code { font-size: 16px; background: #e9edf3; padding: 1px 6px; border-radius: 4px; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 0 0 10px; }
.meta { color: var(--muted); margin: 0; }
.meta b { color: var(--ink); }
.note { background: #fff6e0; border: 1px solid #f1d38b; padding: 6px 10px; border-radius: 6px; margin: 8px 0 0; }
.summary { display: grid; grid-template-columns: 2fr 1fr; gap: 16px; padding: 8px 24px; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
.bar-row { display: grid; grid-template-columns: 130px 1fr 80px; align-items: center; gap: 8px; margin: 3px 0; }
.bar-name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar-track { background: #eef1f5; border-radius: 3px; height: 14px; overflow: hidden; }
.bar { display: block; height: 100%; border-radius: 3px; }
.label-bar { background: var(--accent); }
.error-bar { background: var(--err); }
.bar-count { text-align: right; font-variant-numeric: tabular-nums; }
.bar-count small { color: var(--muted); }
.none { color: var(--muted); margin: 0; }
.controls { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 18px; align-items: center;
            padding: 10px 24px; background: rgba(246,247,249,.96); border-bottom: 1px solid var(--line); }
.controls select { font: inherit; padding: 3px 6px; margin-left: 4px; }
#shown { margin-left: auto; color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; padding: 16px 24px; }
.item { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px;
        display: flex; flex-direction: column; align-items: center; min-width: 0; }
.item.failed { border-color: #f3c4c0; }
.thumb { width: 96px; height: 96px; object-fit: contain; border-radius: 4px; background: #eef1f5; }
.placeholder { display: flex; align-items: center; justify-content: center; text-align: center; font-size: 11px;
               color: var(--muted); border: 1px dashed #c9ced6; padding: 4px; word-break: break-word; }
.placeholder.error { color: var(--err); border-color: #f3c4c0; background: #fdf1f0; font-weight: 600; }
figcaption { width: 100%; margin-top: 6px; display: grid; grid-template-columns: auto 1fr auto; gap: 2px 6px;
             align-items: baseline; min-width: 0; }
.idx { color: var(--muted); font-size: 12px; }
.label, .code { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.code { color: var(--err); grid-column: 2 / 4; }
.conf { font-variant-numeric: tabular-nums; font-size: 12px; font-weight: 600; }
.conf.high { color: var(--high); } .conf.mid { color: var(--mid); } .conf.low { color: var(--low); }
.conf-track { grid-column: 1 / 4; height: 4px; background: #eef1f5; border-radius: 2px; overflow: hidden; }
.conf-bar { display: block; height: 100%; }
.conf-bar.high { background: var(--high); } .conf-bar.mid { background: var(--mid); }
.conf-bar.low { background: var(--low); }
.url { grid-column: 1 / 4; font-size: 11px; color: var(--muted); overflow: hidden; text-overflow: ellipsis;
       white-space: nowrap; }
.message { grid-column: 1 / 4; font-size: 11px; color: #7a271a; overflow: hidden; display: -webkit-box;
           -webkit-line-clamp: 2; -webkit-box-orient: vertical; word-break: break-word; }
a.url:hover { color: var(--accent); }
.muted { color: var(--muted); font-size: 12px; }
.hidden { display: none; }
@media (max-width: 760px) { .summary { grid-template-columns: 1fr; } }
"""

_SCRIPT = """
(function () {
  var grid = document.getElementById('items');
  var cards = Array.prototype.slice.call(grid.children);
  var byLabel = document.getElementById('filter-label');
  var byError = document.getElementById('filter-error');
  var lowFirst = document.getElementById('sort-low-confidence');
  var shown = document.getElementById('shown');
  function conf(card) {  // failed and pending items sort after every labelled one
    var c = card.dataset.confidence;
    return c === '' ? 2 : parseFloat(c);
  }
  function apply() {
    var label = byLabel.value, error = byError.value, n = 0;
    cards.forEach(function (card) {
      var ok = (label === '' || card.dataset.label === label) &&
               (error === '' || (error === '__none__' ? card.dataset.error === '' : card.dataset.error === error));
      card.classList.toggle('hidden', !ok);
      if (ok) { n += 1; }
    });
    var order = cards.slice();
    if (lowFirst.checked) {
      order.sort(function (a, b) { return conf(a) - conf(b) || a.dataset.index - b.dataset.index; });
    }
    order.forEach(function (card) { grid.appendChild(card); });
    shown.textContent = n + ' of ' + cards.length + ' shown';
  }
  byLabel.addEventListener('change', apply);
  byError.addEventListener('change', apply);
  lowFirst.addEventListener('change', apply);
  apply();
})();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgq job {job}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>imgq job <code>{job}</code></h1>
<p class="meta"><b>{total}</b> items &middot; <b>{labelled}</b> labelled &middot; <b>{failed}</b> failed &middot;
<b>{pending}</b> pending &middot; state <b>{state}</b> &middot; model {versions} &middot; generated {generated}</p>
{truncated}
</header>
<section class="summary">
<div class="panel"><h2>Class distribution</h2>
{class_bars}
</div>
<div class="panel"><h2>Errors by code</h2>
{error_bars}
</div>
</section>
<section class="controls">
<label>Label <select id="filter-label"><option value="">all labels</option>{label_options}</select></label>
<label>Error <select id="filter-error"><option value="">all items</option><option value="__none__">no error</option>
{error_options}</select></label>
<label><input type="checkbox" id="sort-low-confidence"> low-confidence first</label>
<span id="shown">{shown} shown</span>
</section>
<main id="items" class="grid">
{cards}
</main>
<script>{script}</script>
</body>
</html>
"""
