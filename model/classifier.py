"""A loaded model ready to serve: batch of tensors (or images) in, top-k labels with probabilities out."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from imgq.settings import AMP_CHOICES
from model.meta import ModelMeta
from model.preprocess import Preprocess

log = logging.getLogger(__name__)

Prediction = list[tuple[str, float]]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when torch sees a GPU, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class ServingOptions:
    """How a :class:`Classifier` runs its forward pass. Only ``channels_last`` applies on CPU."""

    # NHWC activations: oneDNN on CPU and cuDNN's tensor-core kernels on GPU are faster on them (the default
    # CNN at 64 px: ~2x per forward on one CPU thread); results differ by float rounding only.
    channels_last: bool = True
    # CUDA only: autocast dtype. auto = bf16 where the GPU has it (no overflow risk), else fp16; off = fp32.
    amp: str = "auto"
    # torch.compile the module. Each new batch shape compiles on first use (seconds), so off by default.
    compile: bool = False
    # CPU only: serve a frozen TorchScript graph (BatchNorm folded into the convolutions, weights prepacked
    # for oneDNN): at 64 px ~25% less forward time for imgq's CNN, ~45% for a loaded TorchScript file.
    # Checked against the module itself on a probe batch; a model it cannot freeze is served as it is.
    optimize: bool = True


# A worker process sets these once (worker.serving.Serving) before loading models, so hot-reloaded models get them too.
_process_options = ServingOptions()


def configure_serving(options: ServingOptions) -> None:
    """The options every :class:`Classifier` created later in this process uses unless given its own."""
    global _process_options
    if options.amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {options.amp!r}")
    _process_options = options


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _eval_mode(module: nn.Module) -> nn.Module:
    try:
        return module.eval()
    except NotImplementedError:  # a torch.export program: its mode was fixed when it was exported
        return module


def _frozen(module: nn.Module, meta: ModelMeta, channels_last: bool) -> nn.Module | None:
    """``module`` as a frozen, inference-optimised TorchScript graph, or None where that does not apply or
    does not compute what the module does. imgq's own networks are traced (they have no data-dependent
    control flow) and TorchScript files frozen as they are; a torch.export program is left alone."""
    if not isinstance(module, torch.jit.ScriptModule) and meta.architecture is None:
        return None
    size = meta.input_size
    # A generator of its own: building a Classifier (the promotion gate does) never moves the global RNG.
    probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        probe = probe.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        try:
            want = module(probe).float()
        except Exception:  # a module that cannot run this input: the load's probe batch says why, not this
            return None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.* is deprecated": still the API for this
            scripted = (module if isinstance(module, torch.jit.ScriptModule)
                        else torch.jit.trace(module, probe, check_trace=False))  # type: ignore[no-untyped-call]
            frozen: nn.Module = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))
            got = frozen(probe).float()
    except Exception as exc:  # whatever TorchScript cannot freeze: serve the module as it is
        log.warning("model %s: served without freezing (%s: %s)", meta.version, type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return None
    tolerance = 1e-4 * max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=tolerance):
        log.warning("model %s: served without freezing (the frozen graph's output differs)", meta.version)
        return None
    return frozen


class Classifier:
    """One model version in eval mode on one device; ``preprocess`` is the preset it was validated with."""

    def __init__(self, module: nn.Module, meta: ModelMeta, device: str | torch.device = "cpu",
                 options: ServingOptions | None = None) -> None:
        self.meta = meta
        self.version = meta.version
        self.classes = meta.classes
        self.device = resolve_device(device)
        self.options = options or _process_options
        self.module = _eval_mode(module.to(self.device))
        if self.options.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.amp_dtype = _amp_dtype(self.options.amp, self.device)
        self._forward: nn.Module = self.module
        if self.options.compile and meta.architecture is not None:  # an imported archive is compiled already
            self._forward = torch.compile(self.module)  # type: ignore[assignment]  # lazy: compiles on first call
        elif self.options.optimize and self.device.type == "cpu":
            self._forward = _frozen(self.module, meta, self.options.channels_last) or self.module
        self.preprocess = Preprocess(size=meta.input_size, mean=meta.mean, std=meta.std)

    def predict(self, batch: torch.Tensor, k: int = 3) -> list[Prediction]:
        """Top-``k`` ``(label, probability)`` per row, most likely first; ``k`` is capped at the classes."""
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        size = self.meta.input_size
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a batch of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return []
        k = min(k, len(self.classes))
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # page-locked, so the copy below is an asynchronous DMA
        with torch.inference_mode():
            logits = self.logits(batch.to(self.device, non_blocking=True))
            top_p, top_i = logits.float().softmax(dim=1).topk(k, dim=1)
        probs: list[list[float]] = top_p.cpu().tolist()
        indices: list[list[int]] = top_i.cpu().tolist()
        return [[(self.classes[i], p) for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(indices, probs, strict=True)]

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The forward pass alone, on a batch already on :attr:`device`, with this model's serving options."""
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out: torch.Tensor = self._forward(batch)
        return out

    def predict_images(self, images: Sequence[Image.Image], k: int = 3) -> list[Prediction]:
        """Preprocess RGB images with this model's preset, then :meth:`predict`."""
        if not images:
            return []
        return self.predict(torch.stack([self.preprocess(img) for img in images]), k)

    def __repr__(self) -> str:
        return f"Classifier(version={self.version!r}, arch={self.meta.arch!r}, device={self.device})"
