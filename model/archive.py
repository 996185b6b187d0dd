"""A user's own network as a TorchScript (``model.ts``) or ``torch.export`` (``model.pt2``) archive, checked
before torch reads it and loaded without unpickling anything.

What torch 2.14 does with these files, and so what is checked here first:

* ``torch.jit.load``: the zip's ``data.pkl``/``constants.pkl`` are read by TorchScript's own C++ unpickler,
  which builds tensors and TorchScript objects only (no Python global is ever looked up), and ``code/`` is
  compiled by the TorchScript compiler, not run by Python. But the program may call any registered operator,
  and ``aten::save`` writes files and ``aten::from_file`` reads them: after loading, every node of the
  inlined ``forward`` graph must be an ``aten::``/``prim::`` operator outside :data:`_DENIED_OPS`.
* ``torch.export.load`` is NOT safe on an untrusted file as it stands (its own docstring: "uses pickle under
  the hood"): tensors marked ``use_pickle`` and the legacy weight files go to ``torch.load(weights_only=False)``;
  the sample inputs to ``torch.load(weights_only=True)`` with a fallback to ``weights_only=False``; "opaque"
  constants to ``pickle.loads``; symbolic-shape strings (``expr_str``) to ``sympy.sympify``, which is ``eval``;
  ``guards_code`` becomes Python source in the loaded module; node targets are resolved as attribute paths
  from the ``torch`` module (``torch.os.system`` resolves); ``data/aotinductor/`` holds native libraries
  that are ``dlopen``ed. So :func:`check_export_archive` reads the zip itself and refuses all of that before
  torch sees it: no pickled payload but sample inputs that load with ``weights_only=True``, no AOTInductor
  or legacy files, only ``torch.ops.aten.*`` and ``_operator.getitem`` targets, symbolic shapes only as
  ``Symbol('s0', ...)`` and integer arithmetic, no guards code.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgq.errors import ImgqError
from model.meta import EXPORT, TORCHSCRIPT

# Operators that touch files (the rest of aten is arithmetic on tensors).
_DENIED_OPS = frozenset({"aten::save", "aten::from_file", "debugprims::load_tensor"})
_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")
# What torch writes for a dynamic dimension: Symbol('s77', positive=True, integer=True), maybe in integer
# arithmetic (2*s77, FloorDiv(s77, 2)); anything else would be evaluated by sympify.
_SYMBOL = r"Symbol\('[su]\d+'(?:, (?:positive|integer|nonnegative|real)=(?:True|False))*\)"
_EXPR_TOKEN = re.compile(rf"\s+|{_SYMBOL}|[su]\d+|\d+|[-+*/(),]|FloorDiv|CeilDiv|Mod|PythonMod|Max|Min")
_MAX_JSON = 64 << 20  # a graph description larger than this is not a small classifier


class ArchiveError(ImgqError):
    """A TorchScript or torch.export archive that imgq refuses to load."""


def load_torchscript(path: Path, device: torch.device) -> nn.Module:
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path}: not a TorchScript archive (not a zip file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": it still is the API
            module: nn.Module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch raises RuntimeError and friends for every malformed archive
        raise ArchiveError(f"{path}: not a TorchScript archive: {_first_line(exc)}") from None
    _check_script_ops(path, module)
    return module


def load_export(path: Path, device: torch.device) -> nn.Module:
    check_export_archive(path)
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise ArchiveError(f"{path}: not a torch.export archive: {_first_line(exc)}") from None
    loaded: nn.Module = module.to(device)
    return loaded


def _check_script_ops(path: Path, module: Any) -> None:
    try:
        graph = module.inlined_graph  # forward with every method and submodule call inlined
    except Exception as exc:
        raise ArchiveError(f"{path}: the TorchScript module has no forward graph: {_first_line(exc)}") from None
    stack = [graph]
    while stack:
        for node in stack.pop().nodes():
            kind = node.kind()
            if kind in _DENIED_OPS or kind.split("::")[0] not in ("aten", "prim"):
                raise ArchiveError(f"{path}: the TorchScript program calls {kind}, which imgq does not run "
                                   "(only aten and prim operators that do not touch files)")
            stack.extend(node.blocks())


def check_export_archive(path: Path) -> None:
    """Refuse a ``.pt2`` file that would make ``torch.export.load`` run anything but tensor operators."""
    try:
        with zipfile.ZipFile(path) as zf:
            _check_zip(path, zf)
    except zipfile.BadZipFile:
        raise ArchiveError(f"{path}: not a torch.export archive (not a zip file)") from None


def _check_zip(path: Path, zf: zipfile.ZipFile) -> None:
    names = zf.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise ArchiveError(f"{path}: not a torch.export archive (expected one top-level folder)")
    root = roots.pop()
    inner = {n[len(root) + 1:] for n in names}
    if "archive_version" not in inner:
        raise ArchiveError(f"{path}: not a torch.export archive from torch >= 2.7 (no archive_version); "
                           "export it again with torch.export.save")
    refused = sorted(n for n in inner if n.startswith("data/aotinductor/") or n == "version"
                     or re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", n))
    if refused:
        raise ArchiveError(f"{path}: holds {refused[0]} (compiled code or a legacy pickle); imgq loads only "
                           "torch.export.save archives of a plain program")
    programs = sorted(n for n in inner if re.fullmatch(r"models/[^/]+\.json", n))
    if not programs:
        raise ArchiveError(f"{path}: not a torch.export archive (no models/*.json)")
    for program in programs:
        name = program[len("models/"):-len(".json")]
        graph = _json(path, zf, f"{root}/{program}")
        if graph.get("guards_code"):
            raise ArchiveError(f"{path}: the program carries guards code (Python source); export it without")
        _check_graph(path, graph)
        for config in (f"data/weights/{name}_weights_config.json", f"data/constants/{name}_constants_config.json"):
            if config in inner:
                _check_payloads(path, _json(path, zf, f"{root}/{config}"), config)
        sample = f"{root}/data/sample_inputs/{name}.pt"
        if sample in names:
            try:
                # What torch.export.load tries first; it falls back to weights_only=False only if this fails.
                torch.load(io.BytesIO(zf.read(sample)), weights_only=True)
            except Exception as exc:
                raise ArchiveError(f"{path}: its sample inputs are not plain tensors "
                                   f"({_first_line(exc)})") from None


def _json(path: Path, zf: zipfile.ZipFile, name: str) -> dict[str, Any]:
    if zf.getinfo(name).file_size > _MAX_JSON:
        raise ArchiveError(f"{path}: {name} is over {_MAX_JSON >> 20} MiB")
    try:
        data = json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{path}: {name} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{path}: {name} is not a JSON object")
    return data


def _check_graph(path: Path, graph: dict[str, Any]) -> None:
    stack: list[Any] = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "target" and isinstance(value, str) and not _TARGET.fullmatch(value):
                    raise ArchiveError(f"{path}: the program calls {value}, which imgq does not run "
                                       "(only torch.ops.aten operators)")
                if key == "target" and "from_file" in str(value):
                    raise ArchiveError(f"{path}: the program calls {value}, which reads files")
                if key == "expr_str" and not (isinstance(value, str) and _is_shape_expression(value)):
                    raise ArchiveError(f"{path}: a symbolic shape is not a plain expression: {str(value)[:80]!r}")
                stack.append(value)


def _is_shape_expression(text: str) -> bool:
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if match is None:
            return False
        pos = match.end()
    return True


def _check_payloads(path: Path, config: dict[str, Any], name: str) -> None:
    entries = config.get("config")
    if not isinstance(entries, dict):
        raise ArchiveError(f"{path}: {name} has no payload table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise ArchiveError(f"{path}: {fqn!r} in {name} is pickled; imgq loads only raw tensor payloads")
        if name.startswith("data/constants/") and not str(meta.get("path_name", "")).startswith("tensor_"):
            raise ArchiveError(f"{path}: constant {fqn!r} is a Python or script object, not a tensor")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def detect_format(path: Path) -> str:
    """``torchscript`` or ``export``, from what the zip holds (both are zips; their file names vary)."""
    try:
        with zipfile.ZipFile(path) as zf:
            inner = {n.split("/", 1)[1] for n in zf.namelist() if "/" in n}
    except zipfile.BadZipFile:
        raise ArchiveError(f"{path}: not a TorchScript or torch.export archive (not a zip file); save the "
                           "model with torch.jit.save or torch.export.save") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if "archive_version" in inner and any(n.startswith("models/") for n in inner):
        return EXPORT
    if "data.pkl" in inner and any(n.startswith("code/") for n in inner):
        return TORCHSCRIPT
    raise ArchiveError(f"{path}: a zip, but neither a TorchScript nor a torch.export archive; save the model "
                       "with torch.jit.save or torch.export.save")
