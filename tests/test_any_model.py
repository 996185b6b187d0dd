"""Any model: a network the test builds itself, saved as TorchScript and torch.export, registered with
`imgq models add`, gated and promoted, hot-reloaded by a real worker that labels a job with its classes;
archives that would run code at load or at serving are refused without running it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from model.archive import check_export_archive
from model.checkpoint import ArtifactError, load_checkpoint
from model.meta import EXPORT, TORCHSCRIPT, ModelMeta
from model.pointer import champion_version
from model.registry import import_archive, list_versions, version_dir
from producer.demo import serve_directory
from tests.support import Cluster, closed_port_url, wait_until

COLOURS = ("red", "green", "blue")
SIZE = 32
# Pixels in [0, 1]: the net reads colours directly.
PLAIN: dict[str, Any] = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


class ColourNet(nn.Module):
    """Logits = each channel's mean brightness: a red image is `red`. ``order`` permutes the outputs."""

    def __init__(self, order: tuple[int, ...] = (0, 1, 2)) -> None:
        super().__init__()
        self.order = list(order)
        self.scale = nn.Parameter(torch.tensor(10.0))  # a weight, so the archive has a weights payload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, self.order] * self.scale


def save_torchscript(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, and still the API
        torch.jit.script(module.eval()).save(str(path))  # type: ignore[no-untyped-call]
    return path


def save_export(module: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)  # the batcher sends any N
    program = torch.export.export(module.eval(), (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def write_colour_images(root: Path, per_class: int = 3) -> dict[str, str]:
    """root/<colour>/<i>.jpg (an ImageFolder); returns relative path -> colour."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    truth = {}
    for name in COLOURS:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = tuple(max(0, v - 15 * i) for v in rgb[name])
            Image.new("RGB", (120 + 10 * i, 90), shade).save(root / name / f"{i}.jpg", quality=90)
            truth[f"{name}/{i}.jpg"] = name
    return truth


def imgq(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def add_args(path: Path, *more: str) -> list[str]:
    return ["models", "add", str(path), "--classes", ",".join(COLOURS), "--input-size", str(SIZE),
            "--mean", "0,0,0", "--std", "1,1,1", *more]


@pytest.fixture
def registry(tmp_path: Path) -> dict[str, str]:
    """An empty registry and no Redis (a closed port): the local form of the commands."""
    return {"IMGQ_MODEL_DIR": str(tmp_path / "models"), "IMGQ_REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0"}


def _closed_port() -> int:
    return int(closed_port_url().split(":")[2].split("/")[0])


# Registering and loading


@pytest.mark.parametrize("fmt", [TORCHSCRIPT, EXPORT])
def test_an_archive_registers_loads_and_labels_by_its_classes(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / ("net.ts" if fmt == TORCHSCRIPT else "net.pt2")
    (save_torchscript if fmt == TORCHSCRIPT else save_export)(ColourNet(), path)
    models = tmp_path / "models"
    version = import_archive(models, path, classes=COLOURS, input_size=SIZE, **PLAIN)
    meta = list_versions(models)[0]
    assert (meta.version, meta.format, meta.input_size, meta.classes, meta.arch) == (version, fmt, SIZE, COLOURS, fmt)
    assert sorted(p.name for p in version_dir(models, version).iterdir()) == sorted(["meta.json", meta.artifact_file])
    assert ModelMeta.from_dict(json.loads((version_dir(models, version) / "meta.json").read_text())) == meta
    classifier = load_checkpoint(version_dir(models, version))
    images = [Image.new("RGB", (50, 40), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    assert [p[0][0] for p in classifier.predict_images(images, k=1)] == list(COLOURS)
    # Any batch size the batcher forms, including 1 (the export was made at 2 with a dynamic batch).
    assert len(classifier.predict(torch.rand(1, 3, SIZE, SIZE), k=3)[0]) == 3
    assert len(classifier.predict(torch.rand(37, 3, SIZE, SIZE))) == 37


def test_meta_without_a_format_is_a_safetensors_model_and_an_archive_has_no_config() -> None:
    legacy = {"version": "v", "config": {"num_classes": 3}, "classes": list(COLOURS), "mean": [0, 0, 0],
              "std": [1, 1, 1], "metrics": {}, "created_at": "now"}  # meta.json from before imported models
    meta = ModelMeta.from_dict(legacy)
    assert (meta.format, meta.artifact_file, meta.input_size, meta.arch) == ("safetensors", "weights.safetensors", 64,
                                                                             "cnn")
    without_config = {k: v for k, v in legacy.items() if k != "config"}
    archive = ModelMeta.from_dict({**without_config, "format": EXPORT, "input_size": 32})
    assert (archive.artifact_file, archive.input_size, archive.architecture) == ("model.pt2", 32, None)
    with pytest.raises(ValueError, match="imported export archive"):
        archive.config  # noqa: B018  (the property raises)
    with pytest.raises(ValueError, match="differ from"):
        ModelMeta.from_dict({**legacy, "format": EXPORT})  # an archive's meta has input_size, not config


def test_add_refuses_bad_archives_with_one_line(tmp_path: Path, registry: dict[str, str]) -> None:
    ts = save_torchscript(ColourNet(), tmp_path / "net.ts")
    pt2 = save_export(ColourNet(), tmp_path / "net.pt2")
    cases = [
        (["models", "add", str(ts), "--classes", "a,b", "--input-size", str(SIZE)], 1, "output is (2, 3)"),
        (["models", "add", str(pt2), "--classes", "a,b,c,d", "--input-size", str(SIZE)], 1, "expected [2, 4]"),
        (["models", "add", str(pt2), "--classes", "a,b,c", "--input-size", "48"], 1, "is the input size right?"),
        (add_args(tmp_path / "missing.ts"), 1, "no such file"),
        (add_args(Path(__file__)), 1, "not a TorchScript or torch.export archive (not a zip file)"),
        (["models", "add", str(ts), "--classes", ",".join(COLOURS)], 2, "--input-size N are required"),
        (["models", "add", str(ts), "--classes", "a,a", "--input-size", "32"], 2, "a class name repeats"),
        (["models", "list", "--classes", "a,b"], 2, "--classes is for `imgq models add`"),
    ]
    for args, code, message in cases:
        out = imgq(*args, env=registry)
        assert out.returncode == code, (args, out.stderr)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert list_versions(tmp_path / "models") == []  # nothing refused was published, not even half
    assert f"{ts}: the model's output" in imgq(*cases[0][0], env=registry).stderr  # the user's file, not a copy


def test_a_model_exported_in_training_mode_is_refused(tmp_path: Path) -> None:
    # TorchScript modules are put in eval mode on load; a torch.export program keeps the mode it was exported in.
    noisy = nn.Sequential(nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3)).train()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(noisy, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "noisy.pt2"))
    with pytest.raises(ArtifactError, match="two forward passes on the same batch differ"):
        import_archive(tmp_path / "models", tmp_path / "noisy.pt2", classes=COLOURS, input_size=SIZE, **PLAIN)
    assert list_versions(tmp_path / "models") == []


# Archives that would run code


def _rewrite(src: Path, dst: Path, edit: Mapping[str, bytes | None]) -> Path:
    """A copy of a zip with the members whose name ends with a key replaced (None: removed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            key = next((k for k in edit if item.filename.endswith(k)), None)
            data = zin.read(item) if key is None else edit[key]
            if data is not None:
                zout.writestr(item, data)
        for key, data in edit.items():
            if key.startswith("+") and data is not None:
                zout.writestr(f"{zin.namelist()[0].split('/')[0]}/{key[1:]}", data)
    return dst


def _member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith(suffix)))


def test_export_archives_that_run_code_at_load_are_refused_before_torch_reads_them(tmp_path: Path) -> None:
    good = save_export(ColourNet(), tmp_path / "good.pt2")
    check_export_archive(good)
    marker = tmp_path / "pwned"
    program = _member(good, "models/model.json").decode()
    symbol = program[program.index("Symbol('s"):]
    symbol = symbol[:symbol.index(")") + 1]
    # torch.export.load hands this string to sympy.sympify, which evals it: stock torch 2.14 creates the marker.
    evil_expr = program.replace(symbol, f"(__import__('pathlib').Path({str(marker)!r}).touch() or {symbol})", 1)
    weights = json.loads(_member(good, "model_weights_config.json"))
    next(iter(weights["config"].values()))["use_pickle"] = True  # -> torch.load(weights_only=False)
    graph = json.loads(program)
    graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"  # resolves from the torch module
    guarded = json.loads(program)
    guarded["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch()"]
    cases = {
        "sympify": ({"models/model.json": evil_expr.encode()}, "a symbolic shape is not a plain expression"),
        "pickle": ({"model_weights_config.json": json.dumps(weights).encode()}, "is pickled"),
        "target": ({"models/model.json": json.dumps(graph).encode()}, "calls torch.os.system"),
        "guards": ({"models/model.json": json.dumps(guarded).encode()}, "guards code"),
        "aoti": ({"+data/aotinductor/model/model.so": b"\x7fELF"}, "compiled code or a legacy pickle"),
    }
    for name, (edit, message) in cases.items():
        bad = _rewrite(good, tmp_path / f"{name}.pt2", edit)
        with pytest.raises(ArtifactError, match=message):
            import_archive(tmp_path / "models", bad, classes=COLOURS, input_size=SIZE, **PLAIN)
        assert not marker.exists(), name
    assert list_versions(tmp_path / "models") == []


def test_a_torchscript_program_that_touches_files_is_refused(tmp_path: Path) -> None:
    class Writer(nn.Module):
        def __init__(self, target: str) -> None:
            super().__init__()
            self.target = target

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.ops.aten.save(x, self.target)
            return x.mean(dim=(2, 3))

    path = save_torchscript(Writer(str(tmp_path / "written")), tmp_path / "writer.ts")
    with pytest.raises(ArtifactError, match="calls aten::save"):
        import_archive(tmp_path / "models", path, classes=COLOURS, input_size=SIZE, **PLAIN)
    assert not (tmp_path / "written").exists()


# The gate


def test_add_with_data_runs_the_gate_and_without_data_promote_is_the_override(
        tmp_path: Path, registry: dict[str, str]) -> None:
    data = tmp_path / "colours"
    write_colour_images(data)
    right = save_torchscript(ColourNet(), tmp_path / "right.ts")
    wrong = save_export(ColourNet(order=(2, 0, 1)), tmp_path / "wrong.pt2")  # says red for blue...

    first = imgq(*add_args(wrong, "--promote"), env=registry)  # no data: promoted by hand, and says so
    assert first.returncode == 0, first.stderr
    v_wrong = first.stdout.strip()
    assert "promoted without a gate" in first.stderr and champion_version(Path(registry["IMGQ_MODEL_DIR"])) == v_wrong

    better = imgq(*add_args(right, "--data", str(data), "--promote"), env=registry)
    assert better.returncode == 0, better.stderr
    v_right = better.stdout.strip()
    assert "accuracy 1.0000" in better.stderr and "promoted to champion" in better.stderr, better.stderr
    assert champion_version(Path(registry["IMGQ_MODEL_DIR"])) == v_right

    worse = imgq(*add_args(wrong, "--data", str(data), "--promote"), env=registry)  # same bytes, new version
    assert worse.returncode == 0, worse.stderr
    assert "NOT promoted" in worse.stderr and "< champion" in worse.stderr, worse.stderr
    assert champion_version(Path(registry["IMGQ_MODEL_DIR"])) == v_right

    listed = json.loads(imgq("models", "list", "--json", env=registry).stdout)
    by_version = {m["version"]: m for m in listed}
    assert by_version[v_right]["val_accuracy"] == 1.0 and by_version[v_right]["arch"] == TORCHSCRIPT
    assert by_version[v_right]["champion"] and by_version[v_wrong]["val_accuracy"] is None

    other = tmp_path / "other"
    for name in ("cat", "dog"):
        (other / name).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(other / name / "a.png")
    mismatch = imgq(*add_args(right, "--data", str(other)), env=registry)
    assert mismatch.returncode == 1 and "differ from --classes" in mismatch.stderr, mismatch.stderr


# Served by a real worker, hot-reloaded


def test_a_worker_hot_reloads_to_an_added_model_and_labels_with_its_classes(lifecycle: Cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    truth = write_colour_images(site, per_class=4)
    lifecycle.start_worker()
    lifecycle.wait_ready()
    env = lifecycle.settings.to_env()
    with serve_directory(site) as base:
        urls = [f"{base}/{name}" for name in truth]
        before = lifecycle.submit(urls)
        lifecycle.wait(before)
        trained = {str(r["model_version"]) for r in lifecycle.results(before)}
        assert trained == {champion_version(lifecycle.settings.model_dir)}

        archives = (save_export(ColourNet(), tmp_path / "colour.pt2"), save_torchscript(ColourNet(), tmp_path / "c.ts"))
        for archive in archives:
            added = imgq(*add_args(archive, "--promote"), env=env)
            assert added.returncode == 0, added.stderr
            version = added.stdout.strip()
            assert version not in trained

            def served_by_new(version: str = version) -> bool:
                job = lifecycle.submit(urls)
                lifecycle.wait(job)
                results = lifecycle.results(job)
                if {r["model_version"] for r in results} != {version}:
                    return False  # the worker checks the pointer between batches: a batch or two may be old
                assert all(r["error"] is None and len(r["topk"]) == 3 for r in results), results  # type: ignore[arg-type]
                assert [r["label"] for r in results] == [truth[u.removeprefix(base + "/")] for u in urls]
                return True

            wait_until(served_by_new, 180, f"the worker to serve {archive.name} ({version})", poll_s=0.5)
    assert "refused model" not in "".join(w.log_tail() for w in lifecycle.workers)
