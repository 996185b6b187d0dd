"""The layout's rules, checked on the source: imports run one way (issue 13, README "How a URL travels").

    imgq/      the shared bottom: imports none of model/, worker/, producer/, cli/
    model/, worker/, producer/  on it; producer/ reaches into worker/ only for the fetch and decode limits
               the HTML report's thumbnails reuse
    cli/       on top of all of them; nothing imports it
No file-level import cycle anywhere (imports inside functions count too), and a client module
(`producer.submit`) loads neither torch nor the worker's Celery app.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("imgq", "model", "worker", "producer", "cli")
# producer/ -> worker/ imports that are deliberate: the report fetches thumbnails with the worker's limits.
PRODUCER_MAY_USE = {"producer.html_report": {"worker.decode", "worker.fetch"}}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_shared_bottom_imports_no_side_and_nothing_imports_the_cli() -> None:
    graph = _graph()
    bad = {m: sorted(t for t in ts if t.split(".")[0] != "imgq")
           for m, ts in graph.items() if m.split(".")[0] == "imgq"}
    assert not {m: ts for m, ts in bad.items() if ts}, bad
    into_cli = {m: sorted(t for t in ts if t.split(".")[0] == "cli")
                for m, ts in graph.items() if m.split(".")[0] != "cli"}
    assert not {m: ts for m, ts in into_cli.items() if ts}


def test_producer_reaches_into_worker_only_for_the_report_thumbnails() -> None:
    graph = _graph()
    reach = {m: {t for t in ts if t.split(".")[0] == "worker"} - PRODUCER_MAY_USE.get(m, set())
             for m, ts in graph.items() if m.split(".")[0] == "producer"}
    assert not {m: ts for m, ts in reach.items() if ts}, reach


def test_no_import_cycle_between_files() -> None:
    graph = _graph()
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph[node]):
            if target in path:
                cycles.append([*path[path.index(target):], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_a_client_module_loads_neither_torch_nor_the_worker_app() -> None:
    code = ("import sys, producer.submit, producer.reconcile, producer.wait, producer.export; "
            "print(sorted(m for m in ('torch', 'worker.app', 'worker.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_a_worker_serving_imgqs_cnn_never_imports_torchvision() -> None:
    # torchvision's package import is ~2 s of a worker's start-up (issue 14's "worker ready in under 3 s"):
    # only the torchvision architectures, GPU decode and the v2 reference transform may load it, on demand.
    code = ("import sys, worker.app, worker.tasks, worker.serving, worker.pipeline, model.train, model.evaluate; "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "False"


def test_every_redis_key_is_built_by_imgq_keys() -> None:
    """No module but imgq/keys.py spells an ``imgq:`` key: the layout has one home."""
    offenders = []
    for path in [*(ROOT / p for p in PACKAGES), ROOT / "bench", ROOT / "tests"]:
        for file in path.rglob("*.py"):
            if file.name in ("keys.py", "test_architecture.py"):
                continue
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("imgq:") \
                        and not node.value.startswith("imgq: ") and node.value != "imgq:pw":
                    offenders.append(f"{file.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
