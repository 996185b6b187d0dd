"""The training recipe: every choice ``train()`` makes from the data when the config leaves it open.

A careful practitioner's defaults for small real data sets (hundreds to tens of thousands of images) on a
CPU, each with its reason. ``train()`` stores the resolved :class:`Recipe` in the version's metrics.

    input size    median short side of the images, rounded up to a multiple of 8, within 32..64 px
    epochs        a budget of about 48k 32-px image passes (fewer at 64 px: the cost per image is 4x),
                  within 10..100 epochs; early stopping on the validation split may end sooner
    batch size    1/64 of the training images as a power of two, within 16..64: small sets take many small
                  steps (the demo set reached 98% in 6 epochs at batch 16, 91% at 64), and a 120-image set
                  still takes 7 steps an epoch
    patience      a quarter of the epochs (at least 3), and never before half of them: the one-cycle rate is
                  still high in the first half and validation accuracy is noisy there
    averaging     an exponential moving average of the weights (BatchNorm statistics too) spanning about 2
                  epochs, after a short warm-up, is what is validated and published: the raw weights of a
                  small set swing by points from epoch to epoch while the rate is high (textures, four
                  splits: 83-100% validation accuracy at epoch 50 of 100), the average's do not; one
                  in-place blend of the weights a step
    selection     the epoch with the best validation accuracy, a tie going to the later (further annealed)
                  one; so while validation accuracy holds its best, training runs to the end of the cycle
    balance       sample classes equally when the largest has 1.5x the images of the smallest
    threads       1 for the small CNN: the same weights for the same seed whatever the machine's load, and
                  no 30x slowdown when other processes keep the cores busy
    fine-tuning   with ``init``: the backbone is frozen (BatchNorm statistics too) for the first 20% of the
                  epochs while the head learns, then everything trains with the backbone at 1/10 of the rate
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# AdamW's one-cycle peak: BatchNorm keeps the small CNN stable well above AdamW's 1e-3 default; on the
# benchmark sets' validation splits 1e-2 did no better at these budgets (the demo's 8 short epochs want it).
DEFAULT_LR = 3e-3
MIN_INPUT, MAX_INPUT = 32, 64
SAMPLE_BUDGET_32PX = 48_000
MIN_EPOCHS, MAX_EPOCHS = 10, 100
MIN_BATCH, MAX_BATCH = 16, 64
IMBALANCE_RATIO = 1.5
FREEZE_FRACTION = 0.2
# The weight average spans about this many epochs (see choose_ema_decay).
EMA_EPOCHS = 2.0


@dataclass(frozen=True)
class Recipe:
    input_size: int
    epochs: int  # at most; early stopping may end sooner
    batch_size: int
    patience: int  # 0: never stop early
    min_epochs: int  # no early stop before this epoch
    augment: str
    balance: bool
    lr: float
    weight_decay: float
    label_smoothing: float
    freeze_epochs: int  # fine-tuning: epochs that train the head alone
    backbone_lr_scale: float  # fine-tuning: the backbone's rate relative to ``lr``
    threads: int  # torch intra-op threads: the same seed and threads give the same weights on a CPU
    ema_decay: float  # per optimiser step; 0: validate and publish the raw weights


def choose_input_size(sizes: Iterable[tuple[int, int]]) -> int:
    """From the images' (width, height): the median short side, up to a multiple of 8, within 32..64."""
    short = [min(w, h) for w, h in sizes]
    if not short:
        return MAX_INPUT
    median = statistics.median(short)
    return int(min(MAX_INPUT, max(MIN_INPUT, 8 * math.ceil(median / 8))))


def choose_epochs(n_train: int, input_size: int) -> int:
    budget = SAMPLE_BUDGET_32PX * (32 / input_size) ** 2  # the forward/backward cost grows with the pixels
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(budget / max(1, n_train)))))


def choose_batch_size(n_train: int) -> int:
    target = max(1, n_train // 64)
    return int(min(MAX_BATCH, max(MIN_BATCH, 2 ** int(math.log2(target)))))


def choose_patience(epochs: int) -> tuple[int, int]:
    """(patience, first epoch at which stopping may happen)."""
    return max(3, math.ceil(epochs / 4)), max(1, epochs // 2)


def is_imbalanced(counts: Sequence[int]) -> bool:
    present = [c for c in counts if c > 0]
    return bool(present) and max(present) >= IMBALANCE_RATIO * min(present)


def choose_ema_decay(steps_per_epoch: int, ema_epochs: float = EMA_EPOCHS) -> float:
    """The per-step decay of an average whose time constant is ``ema_epochs`` epochs (0: no average)."""
    if ema_epochs <= 0:
        return 0.0
    return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)


def choose_freeze_epochs(epochs: int) -> int:
    """Head-only epochs when fine-tuning: 20% of the run, at least one, and never the whole run."""
    return 0 if epochs < 2 else min(epochs - 1, max(1, round(FREEZE_FRACTION * epochs)))
