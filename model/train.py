"""Train a classifier and publish it: the loop of torchvision's references/classification, small.

Each step is the tutorial's four: transform a batch (the serving resize, then :mod:`model.augment` on the
whole batch), forward, backward, optimiser step. What the config leaves open (input size, epochs, batch size,
patience, class balance, the fine-tuning schedule) is chosen from the data by :mod:`model.recipe`.
Validation uses :class:`Preprocess`, the serving preset, so the reported accuracy is what serving gets.
An exponential moving average of the weights is what is validated, and the best epoch's average (by
validation accuracy, the later on a tie) is published; the champion changes only if asked.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from imgq.errors import ImgqError
from model import recipe, registry
from model.augment import DEFAULT_AUGMENT, augment, policy
from model.champion import Champion
from model.classifier import resolve_device
from model.data import ImageRef, LabeledImages, load_source, open_image
from model.net import ModelConfig, build_model, is_head
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from model.recipe import MAX_INPUT, Recipe
from model.report import confusion_matrix, per_class
from model.report import render as render_report

log = logging.getLogger(__name__)

# Up to this many bytes of uint8 training pixels are decoded once and kept (60k images at 64 px); a larger
# set is decoded every epoch, by ``num_workers`` DataLoader workers.
PIXEL_CACHE_BYTES = 768 * 2**20


@dataclass
class TrainConfig:
    """What to train. ``None`` means "choose from the data" (:mod:`model.recipe` says how and why)."""

    source: str = "demo"
    arch: str = "cnn"
    # At most this many epochs; early stopping on the validation split may end sooner.
    epochs: int | None = None
    batch_size: int | None = None
    # OneCycle's peak rate for AdamW; None: 3e-3 (the demo set's own recipe says 1e-2 for its short run).
    lr: float | None = None
    # Decoupled (AdamW) decay on convolution and linear weights; BatchNorm and biases are not decayed.
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    # Training and serving size in pixels; None: from the images' median size (32..64).
    input_size: int | None = None
    # none | light | standard (model.augment): light never mirrors, so digits and text keep their meaning.
    augment: str = DEFAULT_AUGMENT
    # Sample classes equally; None: when the largest class has 1.5x the images of the smallest.
    balance: bool | None = None
    # Ignored for "demo", which has its own validation split.
    val_fraction: float = 0.2
    device: str = "cpu"
    # DataLoader workers decoding images when the set is too large to keep its pixels in memory.
    num_workers: int = 0
    # torch intra-op threads while training (the result depends on it in the last float bits); None: 1 for the
    # small CNN, whose steps gain at most 1.5x from a second thread on an idle machine and were ~30x slower
    # with two on a busy one; torch's setting for the torchvision networks.
    threads: int | None = None
    # Stop after this many epochs without a better validation score (0 = never stop early); None: a quarter
    # of the epochs, and not in the first half.
    patience: int | None = None
    # A local safetensors file to start from (nothing is downloaded); tensors whose name and shape match
    # are loaded, the rest (e.g. a 1000-class head) keep their fresh initialisation.
    init: str | None = None
    # Fine-tuning from ``init``: epochs that train the head alone (None: 20% of the epochs), then the backbone
    # joins at ``backbone_lr_scale`` times the rate.
    freeze_epochs: int | None = None
    backbone_lr_scale: float = 0.1
    # Validate and publish an exponential moving average of the weights spanning about this many epochs
    # (0: the raw weights); None: the recipe's choice (model.recipe.EMA_EPOCHS).
    ema_epochs: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "input_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, not {value}")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0 or self.num_workers < 0:
            raise ValueError("lr must be > 0, weight_decay and num_workers >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, not {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if not 0.0 < self.backbone_lr_scale <= 1.0:
            raise ValueError(f"backbone_lr_scale must be in (0, 1], not {self.backbone_lr_scale}")
        if (self.patience is not None and self.patience < 0) or (self.freeze_epochs or 0) < 0:
            raise ValueError("patience and freeze_epochs must be >= 0")
        if self.ema_epochs is not None and self.ema_epochs < 0:
            raise ValueError(f"ema_epochs must be >= 0, not {self.ema_epochs}")
        policy(self.augment)  # a ValueError that lists the choices


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    version: str
    val_accuracy: float
    epochs: list[EpochStats]
    model_dir: Path
    # Files of an ImageFolder source that did not decode, as "path: why".
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    # The held-out set the accuracy was measured on: the promotion gate re-measures the champion on it.
    val_items: tuple[tuple[ImageRef, int], ...] = ()


def train(
    config: TrainConfig,
    model_dir: Path,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
    promote: bool = True,
    data: LabeledImages | None = None,
) -> TrainResult:
    """Train on ``config.source`` (or ``data``, already loaded), publish the best epoch to ``model_dir``,
    make it champion of ``model_dir`` alone if ``promote`` (Champion's no-Redis path: a deployment promotes
    through ``model.champion.Champion`` with its Redis, as the retrain gate does, with ``promote=False`` here)."""
    torch.manual_seed(config.seed)  # the initial weights and dropout; sampling and augmentation have their own
    device = resolve_device(config.device)
    ModelConfig(arch=config.arch, input_size=config.input_size or MAX_INPUT)  # fail fast on a bad arch
    data = data if data is not None else load_source(config.source)
    skipped = [f"{path}: {why}" for path, why in data.skipped]
    for line in skipped:
        log.warning("skipped unreadable training file %s", line)
    train_set, val_set = data.split(config.val_fraction, config.seed)
    if not len(val_set) or not len(train_set):
        raise ImgqError(f"{config.source}: too few images to hold some out for validation (2 per class needed)")
    plan = make_recipe(config, train_set)
    log.info("recipe: %s", plan)
    model_config = ModelConfig(arch=config.arch, input_size=plan.input_size, num_classes=len(data.classes))

    size, mean, std = plan.input_size, IMAGENET_MEAN, IMAGENET_STD
    # The validation set is decoded and tensorised once, not every epoch.
    val_pre = Preprocess(size=size, mean=mean, std=std)
    val_x = torch.stack([val_pre(open_image(ref)) for ref, _ in val_set.items])
    val_y = torch.tensor([label for _, label in val_set.items])
    loader = _loader(train_set, val_pre, plan, config, pin_memory=device.type == "cuda")
    chosen, draws = policy(plan.augment), torch.Generator().manual_seed(config.seed + 1)

    def prepare(pixels: torch.Tensor) -> torch.Tensor:
        """uint8 resized pixels -> the augmented, normalised batch (serving's arithmetic, model.augment)."""
        return val_pre.normalise(augment(pixels, chosen, draws))

    # channels_last: about 30% faster convolutions on CPU for this CNN, no change in results.
    model = build_model(model_config)
    if config.init:
        _initialise(model, Path(config.init))
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, config.arch, plan, fine_tune=bool(config.init)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=plan.epochs * len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=plan.label_smoothing)
    # The average's BatchNorm statistics are averaged too (use_buffers), so it is validated as it is served.
    ema = AveragedModel(model, multi_avg_fn=_ema_update(plan.ema_decay), use_buffers=True) if plan.ema_decay else None
    served: nn.Module = ema.module if ema is not None else model

    history: list[EpochStats] = []
    best: EpochStats | None = None
    best_state: dict[str, torch.Tensor] = {}
    with intra_op_threads(plan.threads):
        for epoch in range(1, plan.epochs + 1):
            start = time.perf_counter()
            frozen = epoch <= plan.freeze_epochs
            _set_frozen(model, config.arch, frozen)
            train_loss, train_acc = _train_one_epoch(model, loader, prepare, criterion, optimizer, scheduler, device,
                                                     frozen_backbone=config.arch if frozen else None, ema=ema)
            val_loss, val_acc = evaluate(served, val_x, val_y, device=device)
            stats = EpochStats(epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - start)
            history.append(stats)
            log.info("epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f (%.1f s)%s", epoch, train_loss,
                     train_acc, val_loss, val_acc, stats.seconds, " (backbone frozen)" if frozen else "")
            if best is None or _better(stats, best):
                best = stats
                best_state = {k: v.detach().clone() for k, v in served.state_dict().items()}
            if on_epoch is not None:
                on_epoch(stats)
            if plan.patience and epoch >= plan.min_epochs and epoch - best.epoch >= plan.patience:
                log.info("early stop: no better validation score for %d epochs", plan.patience)
                break
    assert best is not None  # epochs >= 1
    _set_frozen(model, config.arch, False)
    model.load_state_dict(best_state)
    confusion = confusion_matrix(predict_labels(model, val_x, device=device), val_y, len(data.classes))

    metrics = {
        "val_accuracy": best.val_accuracy,
        "val_loss": best.val_loss,
        "best_epoch": best.epoch,
        "history": [dataclasses.asdict(s) for s in history],
        "classes": list(data.classes),
        "train_size": len(train_set),
        "val_size": len(val_set),
        "skipped_files": skipped,
        "train_config": dataclasses.asdict(config),
        "recipe": dataclasses.asdict(plan),
        "epochs_run": len(history),
        "confusion": confusion,
        "per_class": per_class(confusion, data.classes),
    }
    version = registry.publish(
        model_dir, model, config=model_config, classes=data.classes, mean=mean, std=std, metrics=metrics,
        extra_files=lambda v: render_report({"version": v, **metrics}),
    )
    if promote:
        Champion(model_dir).set(version)  # the one way to promote: locked, with history
    return TrainResult(version, best.val_accuracy, history, model_dir, skipped, metrics, data.classes,
                       val_set.items)


def predict_labels(model: nn.Module, images: torch.Tensor, *, device: torch.device,
                   batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True, memory_format=torch.channels_last)
            out.append(model(x).argmax(dim=1).cpu())
    return torch.cat(out)


def _initialise(model: nn.Module, path: Path) -> None:
    """Start from local weights; safetensors only, so nothing is unpickled."""
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ImgqError(f"--init {path}: not a readable safetensors file ({exc})") from None
    own = model.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ImgqError(f"--init {path}: no tensor matches the model's names and shapes")
    model.load_state_dict(usable, strict=False)
    log.info("initialised %d of %d tensors from %s", len(usable), len(own), path)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on preprocessed ``images``."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True, memory_format=torch.channels_last)
            y = labels[i:i + batch_size].to(device, non_blocking=True)
            logits = model(x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    return total_loss / len(labels), correct / len(labels)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _better(stats: EpochStats, best: EpochStats) -> bool:
    """Higher validation accuracy wins; a tie goes to the later epoch, trained further down the one-cycle
    rate. Not to the lower validation loss: that is plain cross-entropy, which a model trained with label
    smoothing scores worse as it converges, so it picked early, high-rate epochs of small sets whose
    validation accuracy sits at 100% (the benchmark's digits, faces, textures)."""
    return stats.val_accuracy >= best.val_accuracy


def make_recipe(config: TrainConfig, train_set: LabeledImages) -> Recipe:
    """Resolve every choice ``config`` leaves open (None) from the training part of the data."""
    n = len(train_set)
    size = config.input_size or train_set.input_size or recipe.choose_input_size(_sizes(train_set.items))
    epochs = config.epochs or train_set.epochs or recipe.choose_epochs(n, size)
    patience, min_epochs = recipe.choose_patience(epochs) if config.patience is None else (config.patience, 1)
    counts = [0] * len(train_set.classes)
    for _, label in train_set.items:
        counts[label] += 1
    freeze = 0
    if config.init:
        freeze = recipe.choose_freeze_epochs(epochs) if config.freeze_epochs is None else config.freeze_epochs
    batch = config.batch_size or recipe.choose_batch_size(n)
    steps = max(1, n // batch)  # _loader drops a last partial batch
    ema_epochs = recipe.EMA_EPOCHS if config.ema_epochs is None else config.ema_epochs
    return Recipe(
        input_size=size, epochs=epochs, batch_size=batch,
        patience=patience, min_epochs=min_epochs, augment=config.augment,
        balance=recipe.is_imbalanced(counts) if config.balance is None else config.balance,
        lr=config.lr or train_set.lr or recipe.DEFAULT_LR, weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        freeze_epochs=min(freeze, epochs), backbone_lr_scale=config.backbone_lr_scale if config.init else 1.0,
        threads=config.threads or (1 if config.arch == "cnn" else torch.get_num_threads()),
        ema_decay=recipe.choose_ema_decay(steps, ema_epochs),
    )


def _sizes(items: Sequence[tuple[ImageRef, int]], most: int = 1000) -> list[tuple[int, int]]:
    """(width, height) of up to ``most`` images spread over the set; files are read for their header only."""
    step = max(1, len(items) // most)
    sizes = []
    for ref, _ in items[::step]:
        if isinstance(ref, Image.Image):
            sizes.append(ref.size)
        else:
            with Image.open(ref) as img:
                sizes.append(img.size)
    return sizes


def _loader(train_set: LabeledImages, pre: Preprocess, plan: Recipe, config: TrainConfig, *,
            pin_memory: bool) -> DataLoader[tuple[torch.Tensor, int]]:
    """Batches of uint8 resized pixels: decoded once and kept in memory when they fit, else per epoch."""
    labels = [label for _, label in train_set.items]
    generator = torch.Generator().manual_seed(config.seed)
    sampler: Sampler[int]
    if plan.balance:
        counts = torch.bincount(torch.tensor(labels), minlength=len(train_set.classes)).clamp(min=1)
        weights = (1.0 / counts.double())[torch.tensor(labels)]
        sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(labels), generator=generator)
    else:
        sampler = RandomSampler(range(len(labels)), generator=generator)
    cached = len(labels) * 3 * pre.size * pre.size <= PIXEL_CACHE_BYTES
    return DataLoader(
        _Pixels(train_set.items, pre, cache=cached), batch_size=plan.batch_size, sampler=sampler,
        # A last batch of one would break BatchNorm's batch statistics.
        drop_last=len(labels) > plan.batch_size,
        num_workers=0 if cached else config.num_workers, pin_memory=pin_memory,
    )


def _param_groups(model: nn.Module, arch: str, plan: Recipe, *, fine_tune: bool) -> list[dict[str, Any]]:
    """AdamW groups: no decay on BatchNorm and biases; a fine-tuned backbone at ``backbone_lr_scale``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        backbone = fine_tune and not is_head(arch, name)
        groups.setdefault((backbone, param.ndim > 1), []).append(param)
    return [{"params": params, "lr": plan.lr * (plan.backbone_lr_scale if backbone else 1.0),
             "weight_decay": plan.weight_decay if decay else 0.0}
            for (backbone, decay), params in sorted(groups.items())]


_Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]


def _ema_update(decay: float) -> Callable[[_Tensors, _Tensors, torch.Tensor | int], None]:
    """AveragedModel's update: an exponential average with a warm-up, and integer buffers copied."""

    @torch.no_grad()
    def update(averaged: _Tensors, current: _Tensors, n_averaged: torch.Tensor | int) -> None:
        # The warm-up of timm's and torchvision's EMAs: the first steps' weights are noise, not worth keeping.
        n = int(n_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:  # BatchNorm's batch counters: a float average would truncate them
                avg.copy_(cur)

    return update


def _set_frozen(model: nn.Module, arch: str, frozen: bool) -> None:
    """Freeze (or thaw) everything but the head: no gradients, so AdamW leaves those weights as they are."""
    for name, param in model.named_parameters():
        if not is_head(arch, name):
            param.requires_grad_(not frozen)


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, int]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    frozen_backbone: str | None = None,
    ema: AveragedModel | None = None,
) -> tuple[float, float]:
    model.train()
    if frozen_backbone is not None:
        # A frozen backbone also keeps its BatchNorm statistics: those layers run as at serving time.
        for name, child in model.named_children():
            if not is_head(frozen_backbone, name):
                child.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for pixels, labels in loader:
        images = prepare(pixels.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += len(labels)
    return total_loss / seen, correct / seen


class _Pixels(Dataset[tuple[torch.Tensor, int]]):
    """Training images as serving resizes them (uint8), augmented later a whole batch at a time."""

    def __init__(self, items: Sequence[tuple[ImageRef, int]], pre: Preprocess, *, cache: bool) -> None:
        self.items = items
        self.pre = pre
        self.cache = torch.stack([pre.pixels(open_image(ref)) for ref, _ in items]) if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ref, label = self.items[index]
        return (self.cache[index] if self.cache is not None else self.pre.pixels(open_image(ref))), label
