"""The model package with real components: demo data, preprocessing, artifacts, registry and training.

One short training run on the demo set (module-scoped) feeds the prediction, checkpoint and registry tests.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from imgq.errors import ImgqError, ModelNotFoundError
from model.champion import Champion
from model.checkpoint import ArtifactError, load_checkpoint, save_checkpoint
from model.classifier import Classifier
from model.data import load_source
from model.demo_data import CLASSES, demo_images, write_imagefolder
from model.meta import VERSION_PATTERN, ModelMeta, new_version_id
from model.net import ARCHITECTURES, ModelConfig, build_model
from model.pointer import champion_version
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, TrainPreprocess, to_rgb
from model.registry import list_versions, load_champion, publish
from model.train import TrainConfig, TrainResult, train


def _digest(images: list[tuple[Image.Image, int]]) -> list[str]:
    return [hashlib.sha256(img.tobytes()).hexdigest() for img, _ in images]


def _accuracy(classifier: Classifier, images: list[tuple[Image.Image, int]]) -> float:
    predictions = classifier.predict_images([img for img, _ in images], k=1)
    hits = sum(top[0][0] == CLASSES[label] for top, (_, label) in zip(predictions, images, strict=True))
    return hits / len(images)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    # Three epochs instead of the default eight: well above chance, a third of the time.
    return train(TrainConfig(epochs=3), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def test_images() -> list[tuple[Image.Image, int]]:
    return demo_images("test", 25)


# Demo data


def test_demo_images_are_deterministic() -> None:
    first, again = demo_images("train", 3, seed=0), demo_images("train", 3, seed=0)
    assert _digest(first) == _digest(again)
    assert [label for _, label in first] == [label for _, label in again]
    assert _digest(demo_images("train", 3, seed=1)) != _digest(first)
    # A longer run only appends images.
    assert _digest(demo_images("train", 4, seed=0))[: len(first)] == _digest(first)
    assert all(img.size == (96, 96) and img.mode == "RGB" for img, _ in first)


def test_demo_splits_are_disjoint() -> None:
    splits = {split: set(_digest(demo_images(split, 20))) for split in ("train", "val", "test")}
    assert all(len(digests) == 20 * len(CLASSES) for digests in splits.values())
    assert not splits["train"] & splits["val"]
    assert not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]
    with pytest.raises(ValueError, match="train, val, test"):
        demo_images("holdout", 1)


def test_write_imagefolder_round_trips_through_load_source(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path, split="test", n_per_class=2)
    assert len(written) == 2 * len(CLASSES)
    for path, label in written:
        assert path.parent.name == label and path.suffix == ".jpg"
        with Image.open(path) as img:
            assert img.format == "JPEG"
    source = load_source(str(tmp_path))
    assert source.classes == tuple(sorted(CLASSES))
    assert len(source) == len(written) and not source.skipped


# Preprocessing


def test_preprocess_shape_and_normalisation() -> None:
    colour = (255, 0, 128)
    pre = Preprocess(size=40, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = pre(Image.new("RGB", (96, 70), colour))
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert (pre.size, pre.mean, pre.std) == (40, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("size", [40, 64, 224])
def test_preprocess_computes_its_v2_definition_bit_for_bit(size: int) -> None:
    # __call__ is a hand-written fast path; serving and validation must still get exactly pre.transform.
    rng = np.random.default_rng(size)
    images = [img for img, _ in demo_images("val", 1)]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
               ((48, 64), (size, size), (301, 157), (600, 800))]
    pre = Preprocess(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for img in images:
        assert torch.equal(pre(img), pre.transform(img)), img.size


def test_train_preprocess_is_seeded_and_shaped_like_serving() -> None:
    img = demo_images("train", 1)[0][0]
    augment = TrainPreprocess(size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    torch.manual_seed(3)
    first = augment(img)
    torch.manual_seed(3)
    assert torch.equal(first, augment(img))
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32


def test_to_rgb_scales_16_bit_and_handles_transparency() -> None:
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = b"\x00"
    assert to_rgb(palette).mode == "RGB"


# Networks and metadata


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_model_every_architecture(arch: str) -> None:
    module = build_model(ModelConfig(arch=arch, num_classes=4)).eval()
    with torch.inference_mode():
        assert module(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_unknown_architecture_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet18, mobilenet_v3_small"):
        ModelConfig(arch="vgg")


def test_config_and_meta_round_trip_through_json() -> None:
    config = ModelConfig(arch="cnn", num_classes=3, channels=(8, 16))
    meta = ModelMeta(version="v", config=config, classes=("a", "b", "c"), mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, metrics={"val_accuracy": 0.5}, created_at="now")
    assert ModelMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert meta.input_size == config.input_size
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**config.to_dict(), "depth": 3})


def test_version_ids_sort_by_time_and_name_the_weights() -> None:
    version = new_version_id(hashlib.sha256(b"weights").hexdigest())
    assert VERSION_PATTERN.match(version)
    assert version.endswith(hashlib.sha256(b"weights").hexdigest()[:8])


# Training and prediction


def test_short_training_beats_an_untrained_model(
    trained: TrainResult, test_images: list[tuple[Image.Image, int]]
) -> None:
    assert len(trained.epochs) == 3 and trained.epochs[-1].train_loss < trained.epochs[0].train_loss
    assert trained.val_accuracy > 0.6  # chance is 1/6
    champion = load_champion(trained.model_dir)
    assert champion.version == trained.version
    assert _accuracy(champion, test_images) > 0.6

    torch.manual_seed(0)
    untrained = Classifier(build_model(champion.meta.config), champion.meta)
    assert _accuracy(untrained, test_images) < 0.35

    metrics = champion.meta.metrics
    assert metrics["val_accuracy"] == trained.val_accuracy
    assert metrics["classes"] == list(CLASSES) and len(metrics["history"]) == 3
    assert metrics["train_size"] > 0 and metrics["val_size"] > 0


def test_predict_returns_sorted_top_k(trained: TrainResult, test_images: list[tuple[Image.Image, int]]) -> None:
    classifier = load_champion(trained.model_dir)
    batch = torch.stack([classifier.preprocess(img) for img, _ in test_images[:5]])
    for row in classifier.predict(batch, k=3):
        probs = [p for _, p in row]
        assert len(row) == 3 and probs == sorted(probs, reverse=True)
        assert all(label in CLASSES for label, _ in row) and sum(probs) <= 1 + 1e-6
    for row in classifier.predict(batch, k=100):
        assert sorted(label for label, _ in row) == sorted(CLASSES)
        assert sum(p for _, p in row) == pytest.approx(1.0, abs=1e-5)
    assert classifier.predict_images([]) == []
    with pytest.raises(ValueError, match="shape"):
        classifier.predict(torch.zeros(1, 3, 8, 8))


# Artifacts


@pytest.fixture
def artifact(trained: TrainResult, tmp_path: Path) -> Path:
    classifier = load_champion(trained.model_dir)
    return save_checkpoint(classifier.module, classifier.meta, tmp_path / "artifact")


def test_checkpoint_round_trip_gives_identical_predictions(
    trained: TrainResult, artifact: Path, test_images: list[tuple[Image.Image, int]]
) -> None:
    images = [img for img, _ in test_images]
    original = load_champion(trained.model_dir)
    reloaded = load_checkpoint(artifact)
    assert reloaded.meta == original.meta and not reloaded.module.training
    assert reloaded.predict_images(images, k=6) == original.predict_images(images, k=6)


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the artifact."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return pathlib.Path.touch, (self.marker,)


def _edit_tensors(directory: Path, edit: str) -> None:
    path = directory / "weights.safetensors"
    tensors = safetensors.torch.load_file(path)
    name = "head.2.weight"
    if edit == "misshaped":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    elif edit == "nan":
        tensors[name][0, 0] = float("nan")
    elif edit == "missing":
        del tensors[name]
    elif edit == "extra":
        tensors["head.9.weight"] = torch.zeros(2)
    safetensors.torch.save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("misshaped", "'head.2.weight' is torch.float32 \\(7, 128\\), expected"),
        ("nan", "'head.2.weight' contains NaN"),
        ("missing", "missing head.2.weight"),
        ("extra", "unexpected head.9.weight"),
    ],
)
def test_load_refuses_wrong_tensors(artifact: Path, edit: str, message: str) -> None:
    _edit_tensors(artifact, edit)
    with pytest.raises(ArtifactError, match=message):
        load_checkpoint(artifact)


def test_load_refuses_a_pickle_without_running_it(artifact: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (artifact / "weights.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_checkpoint(artifact)
    assert not marker.exists()
    # A torch.save() file (a zip of pickles) is refused the same way.
    torch.save(build_model(ModelConfig()).state_dict(), artifact / "weights.safetensors")
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: not a valid safetensors file"):
        load_checkpoint(artifact)


def test_load_refuses_a_truncated_file(artifact: Path) -> None:
    path = artifact / "weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_checkpoint(artifact)


def test_load_refuses_bad_metadata(artifact: Path) -> None:
    meta_path = artifact / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "classes": ["only", "two"]}))
    with pytest.raises(ArtifactError, match=r"meta\.json: bad metadata: 2 class names for a 6-class model"):
        load_checkpoint(artifact)
    meta_path.write_text("{")
    with pytest.raises(ArtifactError, match=r"meta\.json: not readable JSON"):
        load_checkpoint(artifact)
    meta_path.unlink()
    with pytest.raises(ArtifactError, match=r"meta\.json: missing"):
        load_checkpoint(artifact)


# Registry


def test_empty_model_dir_has_no_champion(tmp_path: Path) -> None:
    assert champion_version(tmp_path) is None and list_versions(tmp_path) == []
    with pytest.raises(ModelNotFoundError, match="imgq train --data demo"):
        load_champion(tmp_path / "missing")


def test_registry_publish_list_and_promote(trained: TrainResult, tmp_path: Path) -> None:
    meta = load_champion(trained.model_dir).meta
    fields: dict[str, Any] = {"config": meta.config, "classes": meta.classes, "mean": meta.mean, "std": meta.std}
    torch.manual_seed(1)
    first = publish(tmp_path, build_model(meta.config), **fields, metrics={"n": 1})
    second = publish(tmp_path, build_model(meta.config), **fields, metrics={"n": 2})
    assert first != second
    assert [m.version for m in list_versions(tmp_path)] == [first, second]
    assert [m.metrics["n"] for m in list_versions(tmp_path)] == [1, 2]
    with pytest.raises(ModelNotFoundError, match="2 unpromoted versions"):
        load_champion(tmp_path)

    Champion(tmp_path).set(second)
    assert champion_version(tmp_path) == second and load_champion(tmp_path).version == second
    Champion(tmp_path).set(first)
    assert load_champion(tmp_path).version == first
    with pytest.raises(ImgqError, match=f"available: {first}, {second}"):
        Champion(tmp_path).set("20200101T000000Z-00000000")
    with pytest.raises(ImgqError, match="no model version"):
        Champion(tmp_path).set("../../etc")
    assert not list(tmp_path.glob("versions/.*")) and not list(tmp_path.glob(".*"))


def test_a_corrupt_champion_is_refused_not_served(trained: TrainResult, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    shutil.copytree(trained.model_dir, model_dir)
    weights = model_dir / "versions" / trained.version / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=re.escape(str(weights))):
        load_champion(model_dir)


# ImageFolder sources


def test_imagefolder_with_a_corrupt_file_trains_on_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    written = write_imagefolder(data, n_per_class=6)
    bad = data / "circle" / "broken.jpg"
    bad.write_bytes(written[0][0].read_bytes()[:200])  # a JPEG header, then nothing
    (data / "star" / "notes.txt").write_text("not an image")

    source = load_source(str(data))
    assert len(source) == len(written)
    assert sorted(Path(path).name for path, _ in source.skipped) == ["broken.jpg", "notes.txt"]
    train_part, val_part = source.split(0.25, seed=0)
    assert len(train_part) + len(val_part) == len(source)
    assert {label for _, label in val_part.items} == set(range(len(CLASSES)))
    assert not {p for p, _ in train_part.items} & {p for p, _ in val_part.items}

    result = train(TrainConfig(source=str(data), epochs=1, batch_size=8), tmp_path / "models", promote=False)
    assert any("broken.jpg" in line for line in result.skipped)
    assert champion_version(tmp_path / "models") is None
    (meta,) = list_versions(tmp_path / "models")
    assert meta.version == result.version and len(meta.metrics["skipped_files"]) == 2
    assert meta.classes == tuple(sorted(CLASSES))


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImgqError, match="neither 'demo' nor a directory"):
        load_source(str(tmp_path / "nowhere"))
    (tmp_path / "only").mkdir()
    with pytest.raises(ImgqError, match="at least 2"):
        load_source(str(tmp_path))
