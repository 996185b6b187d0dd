"""JPEG decode and preprocessing on the GPU (nvJPEG through torchvision), when ``IMGQ_GPU_DECODE`` is on.

A JPEG body gets the same checks as on the Pillow path first (allowed format by magic bytes, size within
``IMGQ_MAX_PIXELS`` from the header, at most ``IMGQ_MAX_JPEG_SCANS`` scans, nothing decoded yet), then a
batch is decoded in one nvJPEG call, resized with antialiased bilinear and normalised on the GPU. Everything
else goes to Pillow (``fallback``): other formats, bodies that fail a check (Pillow refuses them with its
code, e.g. ``too_complex``), JPEGs with an EXIF orientation (torchvision applies it on CPU only), and JPEGs
nvJPEG refuses (e.g. corrupt), so every image is upright and every error keeps the code the Pillow path
gives it. The fallback runs in the engine's decode pool under the batch's deadline; the nvJPEG call itself
cannot be stopped, which is why the structural checks (:func:`worker.decode.check_complexity`) come first.
(torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec and warns once.)

The GPU resize matches Pillow's to within rounding, not bit for bit, which is why this is opt-in.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from imgq.errors import ItemError
from imgq.settings import Settings
from model.classifier import Classifier
from worker.decode import check_complexity, sniff_format

_ORIENTATION = 0x0112  # EXIF tag
Prepared = torch.Tensor | ItemError
Fallback = Callable[[Sequence[bytes | ItemError]], list[Prepared]]


class GpuDecoder:
    def __init__(self, settings: Settings, device: torch.device) -> None:
        # The engine uses it on CUDA only; on CPU torchvision decodes with libjpeg, which the tests use.
        self.settings = settings
        self.device = device
        # nvJPEG state in torchvision is per process: one batch decodes at a time, tasks take turns.
        self._lock = threading.Lock()
        self._norm: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # torchvision is imported by the one engine that decodes on the GPU, not by every worker (~2 s).
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional

        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        self._resize = functional.resize

    def prepare(self, bodies: Sequence[bytes | ItemError], model: Classifier, fallback: Fallback) -> list[Prepared]:
        """One tensor (on the GPU) or ItemError per body, in order."""
        out: list[Prepared | None] = [None] * len(bodies)
        on_gpu = [i for i, body in enumerate(bodies) if isinstance(body, bytes) and self._accepts(body)]
        decoded = self._decode([bodies[i] for i in on_gpu])  # type: ignore[misc]  # only bytes are accepted
        for i, image in zip(on_gpu, decoded, strict=True):
            if image is not None:
                out[i] = self._preprocess(image, model)
        rest = [i for i, item in enumerate(out) if item is None]
        for i, item in zip(rest, fallback([bodies[i] for i in rest]), strict=True):
            out[i] = item.to(self.device, non_blocking=True) if isinstance(item, torch.Tensor) else item
        return [item for item in out if item is not None]

    def _accepts(self, body: bytes) -> bool:
        if "JPEG" not in self.settings.image_formats or sniff_format(body) != "JPEG":
            return False
        try:  # before Pillow parses the header below, and nvJPEG decodes every scan (neither can be stopped)
            check_complexity(body, "JPEG", self.settings.max_jpeg_scans)
        except ItemError:
            return False
        try:
            header = Image.open(io.BytesIO(body), formats=["JPEG"])  # reads the header, decodes nothing
            width, height = header.size
            upright = header.getexif().get(_ORIENTATION, 1) == 1
        except Exception:  # Pillow explains what is wrong on the fallback path
            return False
        return upright and 0 < width * height <= self.settings.max_pixels

    def _decode(self, bodies: Sequence[bytes]) -> list[torch.Tensor | None]:
        if not bodies:
            return []
        # bytearray: torch.frombuffer wants a writable buffer; the copy is small next to the decode.
        data = [torch.frombuffer(bytearray(body), dtype=torch.uint8) for body in bodies]
        with self._lock:
            try:
                return list(self._decode_jpeg(data, mode=self._rgb, device=self.device))
            except RuntimeError:
                pass  # one bad image fails the whole batch: find it, one by one
            return [self._decode_one(d) for d in data]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            image: torch.Tensor = self._decode_jpeg(data, mode=self._rgb, device=self.device)
            return image
        except RuntimeError:
            return None

    def _preprocess(self, image: torch.Tensor, model: Classifier) -> torch.Tensor:
        """What :class:`model.preprocess.Preprocess` does to a PIL image, on a uint8 CHW CUDA tensor."""
        pre = model.preprocess
        resized = self._resize(image, [pre.size, pre.size], antialias=True)
        mean, std = self._stats(pre.mean, pre.std)
        normalised: torch.Tensor = (resized.float().div_(255) - mean) / std
        return normalised

    def _stats(self, mean: tuple[float, float, float], std: tuple[float, float, float]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*mean, *std)
        if key not in self._norm:
            self._norm[key] = (torch.tensor(mean, device=self.device).view(3, 1, 1),
                               torch.tensor(std, device=self.device).view(3, 1, 1))
        return self._norm[key]
