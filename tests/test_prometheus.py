"""The operator's side of metrics, for real: a Prometheus (Debian's package) on 127.0.0.1 scrapes a real
worker through a real job, loads deploy/prometheus/alerts.yml and answers imgq's throughput query; promtool
checks and unit-tests the shipped rules; every Grafana panel and every alert names only metrics a worker
really exports. The tests that need the binaries skip, saying why, where they are not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imgq.redis_server import RedisServer, free_port
from tests.support import Cluster, ImageSite, closed_port_url, settings_for, wait_until

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "imgq.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="no prometheus/promtool on PATH (Debian's `prometheus` package; `make install` installs it as root)")
# The series each metric type exposes, after the family name the text parser reports.
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
             "unknown": ("",)}
_IMGQ_NAME = re.compile(r"\bimgq_[a-z0-9_]+")


@pytest.fixture(scope="module")
def metered(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int]]:
    """A Redis of its own and one worker serving /metrics on 127.0.0.1:port."""
    with RedisServer() as server:
        cluster = Cluster(settings_for(server.url, model_dir), tmp_path_factory.mktemp("prometheus-logs"))
        port = free_port()
        cluster.start_worker("prom@%h", IMGQ_METRICS_PORT=str(port), IMGQ_METRICS_ADDR="127.0.0.1")
        try:
            cluster.wait_ready()
            yield cluster, port
        finally:
            cluster.stop()


def exported_series(port: int) -> set[str]:
    """Every series name the worker on ``port`` exposes, samples or not yet (a counter never incremented)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in _SUFFIXES[family.type]}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' panels included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    assert panels
    out = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        out += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return out


def test_every_dashboard_panel_names_metrics_a_worker_exports(metered: tuple[Cluster, int]) -> None:
    _, port = metered
    exported = exported_series(port)
    for title, expr in dashboard_exprs():
        # Prometheus' own `up` of the imgq job counts too: it is what a scrape of a worker produces.
        names = set(_IMGQ_NAME.findall(expr)) | ({"up"} if 'up{job="imgq"}' in expr else set())
        assert names, f"panel {title!r}: {expr!r} names no imgq metric"
        assert names <= exported | {"up"}, f"panel {title!r}: {sorted(names - exported)} not exported"


@needs_prometheus
def test_promtool_accepts_the_shipped_config_and_rules_and_their_unit_tests() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        proc = subprocess.run([PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)


@needs_prometheus
def test_prometheus_scrapes_a_real_job_and_evaluates_the_alerts(metered: tuple[Cluster, int], image_site: ImageSite,
                                                               tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    cluster, metrics_port = metered
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": "imgq", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    api = Api(web_port, prometheus, log)
    try:
        wait_until(api.ready, 120, api.why("Prometheus ready"), poll_s=0.5)
        # The target is up and scraped before the job, so the job's items show as an increase.
        wait_until(lambda: api.values('up{job="imgq"}') == [1.0], 120, api.why("the worker target up"), poll_s=0.5)
        wait_until(lambda: bool(api.values("imgq_images_total")), 120, api.why("a first scrape"), poll_s=0.5)

        urls = [*list(image_site.truth)[:30], image_site.url("no/such.jpg"), closed_port_url()]
        job = cluster.submit(urls)
        status = cluster.wait(job)
        assert status.done == len(urls)
        wait_until(lambda: api.values("sum(imgq_images_total)") == [float(len(urls))], 180,
                   api.why(f"sum(imgq_images_total) == {len(urls)}"), poll_s=0.5)
        (increase,) = api.values("sum(increase(imgq_images_total[10m]))")
        assert increase > 0
        assert api.values('sum(imgq_images_total{outcome="error"})') == [2.0]

        # The shipped rules load, evaluate without error, and name only what a worker exports.
        exported = exported_series(metrics_port) | {"up"}
        wait_until(lambda: api.rules_evaluated(), 120, api.why("every rule evaluated"), poll_s=0.5)
        rules = api.rules()
        assert {r["name"] for r in rules} == set(re.findall(r"^\s+- alert: (\w+)$",
                                                            (RULES_DIR / "alerts.yml").read_text(), re.M))
        for rule in rules:
            assert rule["health"] == "ok", rule
            assert set(_IMGQ_NAME.findall(rule["query"])) <= exported, rule["query"]
        # Nothing is wrong with this deployment: no alert is firing.
        assert [r["name"] for r in rules if r["state"] == "firing"] == []
        # Every dashboard query is PromQL Prometheus accepts.
        for title, expr in dashboard_exprs():
            api.query(expr.replace("$__rate_interval", "1m"), what=f"panel {title!r}")
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=60)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()


class Api:
    """Prometheus' HTTP API on 127.0.0.1."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.proc = proc
        self.log = log

    def why(self, what: str) -> Any:
        return lambda: f"{what}; prometheus log:\n{self.log.read_text(errors='replace')[-3000:]}"

    def _get(self, path: str) -> Any:
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}"
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}"
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str, what: str = "") -> list[dict[str, Any]]:
        try:
            body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        except urllib.error.HTTPError as exc:  # 400: Prometheus refused the expression
            raise AssertionError(f"{what} {expr!r}: {exc.read().decode(errors='replace')}") from None
        assert body["status"] == "success", (what, expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> list[float]:
        return [float(series["value"][1]) for series in self.query(expr)]

    def rules(self) -> list[dict[str, Any]]:
        groups = self._get("/api/v1/rules?type=alert")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def rules_evaluated(self) -> bool:
        rules = self.rules()
        # A rule not evaluated yet reports Go's zero time.
        return bool(rules) and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules)
