"""The throughput knobs: how a worker splits its cores, the Classifier's serving options, GPU-path decoding.

No figures are asserted (those are `make bench`'s job); these check that each path gives the same answers
as the plain one. The CUDA tests run only where torch sees a GPU.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch

from imgq.errors import ItemError, SettingsError
from imgq.settings import Settings
from model.classifier import Classifier, ServingOptions, configure_serving
from model.demo_data import CLASSES
from model.meta import ModelMeta
from model.net import ModelConfig, build_model
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from tests.images import exif_rotated_jpeg, jpeg, png
from worker import cores
from worker.batcher import Batcher
from worker.decode import decode_image
from worker.gpu_decode import Fallback, GpuDecoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# In a fresh interpreter: configure malloc as a worker does, then allocate and free a block the size of a
# forward pass's activations, and report where glibc put it and whether it kept the memory afterwards.
_MALLOC_PROBE = """
import ctypes, json, sys
from worker.malloc import configure_malloc
configure_malloc(int(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20
p = libc.malloc(size)
mmapped = bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2)  # IS_MMAPPED
libc.free(p)
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
print(json.dumps({"mmapped": mmapped, "kept": libc.mallinfo2().keepcost >= size}))
"""


def _classifier(device: str = "cpu", **options: object) -> Classifier:
    torch.manual_seed(0)
    config = ModelConfig()
    meta = ModelMeta(version="20261125T000000Z-00000000", config=config, classes=CLASSES, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, metrics={}, created_at="2026-11-25T00:00:00+00:00")
    return Classifier(build_model(config), meta, device, ServingOptions(**options))  # type: ignore[arg-type]


def test_cpu_auto_gives_each_forward_half_the_cores_and_covers_them(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for n, want in ((1, (1, 1, 2)), (2, (1, 2, 2)), (16, (8, 2, 16))):
        monkeypatch.setattr(cores, "available_cores", lambda n=n: n)
        auto = Settings()
        assert (cores.torch_threads(auto, cpu), cores.infer_threads(auto, cpu), cores.decode_threads(auto)) == want
    explicit = Settings(torch_threads=3, infer_threads=1, decode_threads=5)
    assert (cores.torch_threads(explicit, cpu), cores.infer_threads(explicit, cpu), cores.decode_threads(explicit)) \
        == (3, 1, 5)
    assert (cores.torch_threads(Settings(), gpu), cores.infer_threads(Settings(), gpu)) == (None, 1)
    assert cores.available_cores() >= 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_worker_malloc_reuses_freed_batch_buffers_instead_of_faulting_them_in_again() -> None:
    def probe(arenas: int) -> dict[str, bool]:
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, str(arenas)], check=True, capture_output=True,
                             text=True).stdout
        result: dict[str, bool] = json.loads(out)
        return result

    # glibc's defaults: a fresh mmap per batch buffer, unmapped again on free (page faults every batch)
    assert probe(0) == {"mmapped": True, "kept": False}
    # the worker's tuning: from the heap, and the freed memory stays for the next batch
    assert probe(2) == {"mmapped": False, "kept": True}


def test_new_settings_parse_and_name_their_choices() -> None:
    s = Settings.from_env({"IMGQ_COMPILE": "yes", "IMGQ_GPU_DECODE": "0", "IMGQ_AMP": "bf16"})
    assert (s.compile, s.gpu_decode, s.amp) == (True, False, "bf16")
    assert Settings.from_env(s.to_env()) == s
    with pytest.raises(SettingsError, match="IMGQ_COMPILE='maybe' is not a valid bool"):
        Settings.from_env({"IMGQ_COMPILE": "maybe"})
    with pytest.raises(SettingsError, match="IMGQ_AMP='fp8': must be one of auto, off, bf16, fp16"):
        Settings.from_env({"IMGQ_AMP": "fp8"})
    with pytest.raises(SettingsError, match="IMGQ_DECODE_THREADS=-1: must be >= 0"):
        Settings.from_env({"IMGQ_DECODE_THREADS": "-1"})


def test_channels_last_changes_no_prediction_and_amp_is_off_on_cpu() -> None:
    plain, fast = _classifier(channels_last=False), _classifier(channels_last=True, amp="fp16")
    assert fast.amp_dtype is None  # CPU: autocast never enabled
    batch = torch.randn(8, 3, 64, 64)
    assert torch.allclose(plain.logits(batch), fast.logits(batch), atol=1e-4)
    assert [p[0][0] for p in plain.predict(batch)] == [p[0][0] for p in fast.predict(batch)]


def test_frozen_graph_serves_the_same_answers_for_any_batch_size_and_leaves_the_module_alone() -> None:
    plain, frozen = _classifier(optimize=False), _classifier()
    assert isinstance(frozen._forward, torch.jit.ScriptModule) and frozen.module is not frozen._forward
    assert plain._forward is plain.module and not isinstance(plain.module, torch.jit.ScriptModule)
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 3, 17, 64):  # traced on a batch of 4: other sizes must run and agree too
        batch = torch.randn(rows, 3, 64, 64, generator=generator)
        assert torch.allclose(plain.logits(batch), frozen.logits(batch), atol=1e-4)
        assert [p[0][0] for p in plain.predict(batch)] == [p[0][0] for p in frozen.predict(batch)]
    torch.manual_seed(0)  # what _classifier does before its Classifier: the RNG state freezing must leave as is
    build_model(ModelConfig())
    want = torch.random.get_rng_state()
    _classifier(optimize=True)
    assert torch.equal(torch.random.get_rng_state(), want)


def test_a_module_that_cannot_be_frozen_is_served_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    class Untraceable(torch.nn.Module):  # returns a dict: torch.jit.trace refuses it
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model(ModelConfig())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner(x)
            if torch.jit.is_tracing():  # type: ignore[attr-defined,no-untyped-call]
                return {"logits": out}  # type: ignore[return-value]
            return out

    meta = _classifier().meta
    with caplog.at_level("WARNING", logger="model.classifier"):
        c = Classifier(Untraceable().eval(), meta, "cpu", ServingOptions())
    assert c._forward is c.module
    assert "served without freezing" in caplog.text
    assert len(c.predict(torch.randn(2, 3, 64, 64))) == 2


def test_configure_serving_applies_to_models_loaded_later_and_checks_amp() -> None:
    try:
        configure_serving(ServingOptions(channels_last=False))
        assert _classifier().options == ServingOptions(channels_last=True)  # its own options win
        torch.manual_seed(0)
        c = Classifier(build_model(ModelConfig()), _classifier().meta)
        assert c.options.channels_last is False
        with pytest.raises(ValueError, match="amp must be one of"):
            configure_serving(ServingOptions(amp="fp8"))
    finally:
        configure_serving(ServingOptions())


def test_batcher_with_two_runners_answers_every_request_in_order() -> None:
    model = _classifier()
    batcher = Batcher(max_batch=8, max_wait_s=0.002, runners=2)
    try:
        rows = [torch.randn(3, 64, 64) for _ in range(20)]
        want = model.predict(torch.stack(rows))
        got = [p for i in range(0, 20, 5) for p in batcher.predict(model, rows[i:i + 5], 3)]
        assert [[label for label, _ in p] for p in got] == [[label for label, _ in p] for p in want]
        assert [score for p in got for _, score in p] == pytest.approx([score for p in want for _, score in p],
                                                                       abs=1e-5)
    finally:
        batcher.close()


def _pillow(model: Classifier, settings: Settings) -> Fallback:
    def fallback(bodies: Sequence[bytes | ItemError]) -> list[torch.Tensor | ItemError]:
        out: list[torch.Tensor | ItemError] = []
        for body in bodies:
            try:
                assert isinstance(body, bytes)
                out.append(model.preprocess(decode_image(body, max_pixels=settings.max_pixels,
                                                         formats=settings.image_formats)))
            except ItemError as exc:
                out.append(exc)
        return out

    return fallback


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_gpu_decode_matches_pillow_and_hands_the_rest_to_it(device: str) -> None:
    settings, model = Settings(), _classifier()
    decoder = GpuDecoder(settings, torch.device(device))
    photo = jpeg((320, 240), quality=95)
    bodies: list[bytes | ItemError] = [photo, png(), exif_rotated_jpeg(), b"<html>", photo[:300]]
    sent_to_pillow: list[int] = []
    pillow = _pillow(model, settings)

    def fallback(rest: Sequence[bytes | ItemError]) -> list[torch.Tensor | ItemError]:
        sent_to_pillow.append(len(rest))
        return pillow(rest)

    out = decoder.prepare(bodies, model, fallback)
    reference = pillow(bodies)
    assert sent_to_pillow == [4]  # only the plain JPEG is decoded by torchvision
    assert isinstance(out[0], torch.Tensor) and isinstance(reference[0], torch.Tensor)
    assert out[0].device.type == device
    # Same pixels up to one 8-bit step of rounding in the resize, in normalised units.
    assert (out[0].cpu() - reference[0]).abs().max() <= 1 / 255 / min(IMAGENET_STD) + 1e-4
    for got, want in zip(out[1:], reference[1:], strict=True):
        if isinstance(want, ItemError):
            assert isinstance(got, ItemError) and got.code == want.code
        else:
            assert isinstance(got, torch.Tensor) and torch.equal(got.cpu(), want)


@cuda
def test_cuda_mixed_precision_agrees_with_fp32_on_cpu() -> None:
    cpu, gpu = _classifier(), _classifier("cuda")
    assert gpu.amp_dtype in (torch.bfloat16, torch.float16)
    batch = torch.randn(16, 3, 64, 64)
    want = [p[0][0] for p in cpu.predict(batch)]
    got = [p[0][0] for p in gpu.predict(batch)]
    assert sum(a == b for a, b in zip(got, want, strict=True)) >= 15  # reduced precision may flip a near tie
