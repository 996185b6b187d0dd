"""`imgq evaluate --data DIR [--model VERSION]`: how a model does on a labelled ImageFolder.

Every image goes through the model's own serving :class:`~model.preprocess.Preprocess`, exactly as a
classified URL does. The result has the accuracy, per-class precision and recall, the confusion matrix
(rows: true class, columns: predicted) and every misclassified image; :func:`write_report` writes it as
``evaluation.json`` plus one self-contained HTML page (thumbnails embedded, nothing loaded from anywhere).

Folder classes are matched to the model's classes by name. Images of a class the model does not know are
not scored (it could never be right about them): they are counted in ``unknown_classes`` and said so.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import Environment

from imgq.errors import ImgqError
from model.checkpoint import load_checkpoint
from model.classifier import Classifier
from model.data import load_imagefolder, open_image
from model.meta import VERSION_PATTERN
from model.pointer import champion_version
from model.registry import list_versions, load_champion, version_dir
from model.report import confusion_matrix, per_class

HTML_FILE = "evaluation.html"
JSON_FILE = "evaluation.json"
THUMB_PX = 96
# Misclassified images shown on the page (all of them are in the JSON); ~3 KB per thumbnail.
MAX_SHOWN = 500
_BATCH = 64


@dataclass(frozen=True)
class Miss:
    path: str
    truth: str
    predicted: str
    probability: float


@dataclass
class Evaluation:
    version: str
    data: str
    classes: tuple[str, ...]
    images: int
    accuracy: float
    confusion: list[list[int]]
    per_class: dict[str, dict[str, float]]
    misclassified: list[Miss] = field(default_factory=list)
    # Files that would not decode, as "path: why".
    skipped: list[str] = field(default_factory=list)
    # Folder class -> images not scored because the model has no such class.
    unknown_classes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}

    def describe(self) -> str:
        """A plain-text summary for the terminal."""
        width = max(len(c) for c in self.classes)
        lines = [f"model {self.version} on {self.data}: accuracy {self.accuracy:.4f} "
                 f"({self.images - len(self.misclassified)}/{self.images})",
                 f"{'class':<{width}}  precision  recall  images"]
        for name in self.classes:
            row = self.per_class[name]
            lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {int(row['support']):6d}")
        lines.append("confusion (rows: true, columns: predicted): " + json.dumps(self.confusion))
        if self.unknown_classes:
            lines.append("not scored, classes the model does not know: "
                         + ", ".join(f"{k} ({v} images)" for k, v in sorted(self.unknown_classes.items())))
        if self.skipped:
            lines.append(f"{len(self.skipped)} files could not be read:")
            lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


def evaluate(data: Path, model_dir: Path, version: str | None = None, *, out: Path | None = None,
             device: str = "cpu") -> Evaluation:
    """Score ``version`` (default: the champion) of ``model_dir`` on the ImageFolder ``data``; with ``out``,
    also write ``out/evaluation.json`` and ``out/evaluation.html``."""
    if version is None:
        if champion_version(model_dir) is None:
            raise ImgqError(f"no champion in {model_dir}: name a version with --model, or train one first")
        classifier = load_champion(model_dir, device)
    else:
        if not VERSION_PATTERN.match(version) or not version_dir(model_dir, version).is_dir():
            known = [m.version for m in list_versions(model_dir)]
            raise ImgqError(f"no model version {version!r} in {model_dir}; available: {', '.join(known) or 'none'}")
        classifier = load_checkpoint(version_dir(model_dir, version), device)
    result = evaluate_classifier(data, classifier)
    if out is not None:
        write_report(result, out)
    return result


def evaluate_classifier(data: Path, classifier: Classifier) -> Evaluation:
    """The numbers for one loaded model; ``data`` is root/<class>/<image>."""
    if not data.is_dir():
        raise ImgqError(f"{data}: not a directory (expected root/<class>/<image>)")
    folder = load_imagefolder(data)
    index = {name: i for i, name in enumerate(classifier.classes)}
    unknown: dict[str, int] = {}
    items: list[tuple[Path, int]] = []
    for ref, label in folder.items:
        name = folder.classes[label]
        if name in index:
            assert isinstance(ref, Path)  # load_imagefolder keeps paths
            items.append((ref, index[name]))
        else:
            unknown[name] = unknown.get(name, 0) + 1
    if not items:
        raise ImgqError(f"{data}: none of its classes {list(folder.classes)} is one of the model's "
                        f"{list(classifier.classes)}")
    predicted: list[int] = []
    probabilities: list[float] = []
    for start in range(0, len(items), _BATCH):
        chunk = items[start:start + _BATCH]
        top = classifier.predict_images([open_image(path) for path, _ in chunk], k=1)
        predicted += [index[row[0][0]] for row in top]
        probabilities += [row[0][1] for row in top]
    truth = [label for _, label in items]
    confusion = confusion_matrix(torch.tensor(predicted), torch.tensor(truth), len(classifier.classes))
    misses = [Miss(str(path), classifier.classes[t], classifier.classes[p], round(prob, 4))
              for (path, t), p, prob in zip(items, predicted, probabilities, strict=True) if p != t]
    return Evaluation(
        version=classifier.version, data=str(data), classes=tuple(classifier.classes), images=len(items),
        accuracy=(len(items) - len(misses)) / len(items), confusion=confusion,
        per_class=per_class(confusion, classifier.classes), misclassified=misses,
        skipped=[f"{path}: {why}" for path, why in folder.skipped], unknown_classes=unknown,
    )


def write_report(result: Evaluation, out: Path) -> Path:
    """``out/evaluation.json`` and ``out/evaluation.html``; returns the HTML file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    page = out / HTML_FILE
    page.write_text(render_html(result), encoding="utf-8")
    return page


def render_html(result: Evaluation) -> str:
    shown = result.misclassified[:MAX_SHOWN]
    return _TEMPLATE.render(r=result, shown=[(m, _thumbnail(m.path)) for m in shown],
                            more=len(result.misclassified) - len(shown),
                            peak=max((max(row) for row in result.confusion), default=0) or 1)


def _thumbnail(path: str) -> str:
    """A data: URI of a small JPEG, or "" when the file no longer decodes."""
    try:
        image = open_image(Path(path))
    except Exception:  # the file changed since it was scored: show the card without a picture
        return ""
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_TEMPLATE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgq evaluation {{ r.version }}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222 }
table { border-collapse: collapse; margin: 0.5em 0 1.5em } td, th { border: 1px solid #ccc; padding: 3px 8px }
td.n { text-align: right } .cards { display: flex; flex-wrap: wrap; gap: 8px }
.card { width: 120px; border: 1px solid #ddd; padding: 4px; font-size: 11px; overflow-wrap: anywhere }
.card img { display: block; margin: 0 auto 4px; max-width: 96px; max-height: 96px } .bad { color: #b00 }
</style></head><body>
<h1>Model {{ r.version }}</h1>
<p>{{ r.data }}: <b>accuracy {{ "%.4f"|format(r.accuracy) }}</b>
({{ r.images - r.misclassified|length }} of {{ r.images }} images right)</p>
{% if r.unknown_classes %}<p>Not scored (classes the model does not know):
{% for k, v in r.unknown_classes|dictsort %}{{ k }} ({{ v }}){% if not loop.last %}, {% endif %}{% endfor %}
</p>{% endif %}
{% if r.skipped %}<p>{{ r.skipped|length }} files could not be read.</p>{% endif %}
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>images</th></tr>
{% for name in r.classes %}{% set c = r.per_class[name] %}<tr><td>{{ name }}</td>
<td class="n">{{ "%.3f"|format(c.precision) }}</td><td class="n">{{ "%.3f"|format(c.recall) }}</td>
<td class="n">{{ c.support }}</td></tr>
{% endfor %}</table>
<h2>Confusion matrix</h2><p>Rows: true class; columns: predicted.</p>
<table><tr><th></th>{% for name in r.classes %}<th>{{ name }}</th>{% endfor %}</tr>
{% for name in r.classes %}<tr><th>{{ name }}</th>{% for v in r.confusion[loop.index0] %}
<td class="n" style="background: rgba(30, 90, 200, {{ "%.2f"|format(0.6 * v / peak) }})">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Misclassified ({{ r.misclassified|length }})</h2>
<div class="cards">{% for m, src in shown %}<div class="card">
{% if src %}<img src="{{ src }}" alt="">{% endif %}<div>{{ m.path.rsplit("/", 1)[-1] }}</div>
<div>true: {{ m.truth }}</div><div class="bad">predicted: {{ m.predicted }} ({{ "%.2f"|format(m.probability) }})</div>
</div>{% endfor %}</div>
{% if more %}<p>{{ more }} more misclassified images are listed in evaluation.json.</p>{% endif %}
</body></html>
""")
