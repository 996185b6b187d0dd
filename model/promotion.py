"""The promotion gate: a new version becomes champion only if it is at least as good on the same data.

The champion is re-measured on the candidate's own held-out set (with the champion's own preprocessing),
so both numbers come from the same images; stored accuracies from different splits are never compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.classifier import Classifier
from model.data import ImageRef, open_image


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_accuracy: float
    champion_accuracy: float | None


def measure(classifier: Classifier, items: Sequence[tuple[ImageRef, int]], classes: Sequence[str],
            batch: int = 128) -> float | None:
    """Accuracy of ``classifier`` on ``items`` labelled by ``classes``; None if its classes differ."""
    if set(classifier.classes) != set(classes):
        return None
    correct = 0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        predictions = classifier.predict_images([open_image(ref) for ref, _ in chunk], k=1)
        correct += sum(p[0][0] == classes[label] for p, (_, label) in zip(predictions, chunk, strict=True))
    return correct / len(items) if items else 0.0


def decide(candidate_accuracy: float, champion: Classifier | None, items: Sequence[tuple[ImageRef, int]],
           classes: Sequence[str], *, tolerance: float) -> Decision:
    if champion is None:
        return Decision(True, "no champion yet", candidate_accuracy, None)
    reference = measure(champion, items, classes)
    if reference is None:
        return Decision(False, f"classes differ from champion {champion.version} "
                        f"({', '.join(champion.classes)}); promote it by hand if intended",
                        candidate_accuracy, None)
    if candidate_accuracy + tolerance >= reference:
        return Decision(True, f"validation accuracy {candidate_accuracy:.4f} >= champion {champion.version}'s "
                        f"{reference:.4f} on the same held-out set (tolerance {tolerance:g})",
                        candidate_accuracy, reference)
    return Decision(False, f"validation accuracy {candidate_accuracy:.4f} < champion {champion.version}'s "
                    f"{reference:.4f} on the same held-out set (tolerance {tolerance:g}); kept as a candidate",
                    candidate_accuracy, reference)
