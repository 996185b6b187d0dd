"""`make deploy-test`: build the images with no registry and run the real docker-compose.yml, scaled, with faults.

    .venv/bin/python deploy/deploy_test.py            # all of it (root: it may start dockerd and debootstrap)
    .venv/bin/python deploy/deploy_test.py --images   # only the base image, the wheel directory and the builds
    .venv/bin/python deploy/deploy_test.py --keep     # leave the stack up afterwards (prints how to remove it)

Steps, each timed: dockerd (started with --bridge=none --iptables=false when none runs, stopped at the end);
the base image (deploy/base-image.sh); a wheel directory the host's own pip fills (the versions of this venv);
the builds (`docker build --network host`, pip reading that directory from a loopback HTTP server and nothing
else); then docker-compose.yml with deploy/docker-compose.test.yml (host networking, everything on 127.0.0.1):
init-model trains the first model, three workers, trainer, beat and flower come up healthy, and

  1. a 2,000-URL job from the host (`imgq submit --wait`) ends with every index exactly once, spread over the
     three workers (each worker's /metrics counts its images);
  2. a worker container is killed (`docker kill`) while it runs a batch: the job still ends exactly once;
  3. `docker-compose stop worker` (warm shutdown) mid-job, then `start`: the job ends exactly once, no errors;
  4. `imgq retrain --wait` in the trainer container: a new champion, which every worker serves for a new job;
  5. Flower's API (basic auth, passed through FLOWER_BASIC_AUTH) lists the workers; every /metrics answers.

Jobs 2 and 3 are submitted without --wait, so only the workers and Redis recover them (no producer repair).
Whatever it started (containers, volumes, the HTTP servers, dockerd) is removed at the end, also on failure.
The last line printed is one summary; build/deploy/report.json holds the same figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from imgq import keys  # the project venv runs this script: imgq is installed there

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "deploy"
WHEELS = WORK / "wheelhouse"
REDIS_CONTEXT = WORK / "redis"
LOGS = WORK / "logs"
PROJECT = "imgqdeploytest"
COMPOSE_FILES = ("docker-compose.yml", "deploy/docker-compose.test.yml")
SUITE = "bookworm"
BASE_IMAGE = f"imgq-base:{SUITE}"
REDIS_IMAGE = f"imgq-redis:{SUITE}"
IMGQ_IMAGE = "imgq:latest"
# A fixed port keeps the build arguments, and so Docker's layer cache, the same from one run to the next.
PIP_PORT = 3141
JOB_URLS = 2000
SERVICES = ("redis", "init-model", "worker", "trainer", "beat", "flower")
IMGQ = Path(sys.executable).parent / "imgq"

T = TypeVar("T")


class DeployTestError(Exception):
    pass


@dataclass
class Report:
    timings_s: dict[str, float] = field(default_factory=dict)
    image_mb: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"deploy-test: --- {name}", flush=True)
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings_s[name] = round(time.monotonic() - start, 1)
            print(f"deploy-test: --- {name}: {self.timings_s[name]:.1f} s", flush=True)

    def summary(self, ok: bool) -> str:
        t = " ".join(f"{k}={v:.0f}s" for k, v in self.timings_s.items())
        sizes = " ".join(f"{k}={v / 1000:.2f}GB" if v >= 1000 else f"{k}={v:.0f}MB" for k, v in self.image_mb.items())
        figs = " ".join(f"{k}={v}" for k, v in self.figures.items() if not isinstance(v, dict | list))
        return f"deploy-test: {'PASS' if ok else 'FAIL'} | {t} | images {sizes} | {figs}"


# -- processes ---------------------------------------------------------------------------------------------

def run(cmd: Sequence[str | Path], *, timeout: float, env: dict[str, str] | None = None, check: bool = True,
        log: Path | None = None, cwd: Path = ROOT, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; with ``log``, its output goes there (and its tail into the error)."""
    argv = [str(c) for c in cmd]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            proc = subprocess.run(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, input=input_text)
        output = log.read_text(errors="replace")
        proc = subprocess.CompletedProcess(argv, proc.returncode, output, "")
    else:
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              input=input_text)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise DeployTestError(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return proc


def wait_for(what: str, probe: Callable[[], T | None], *, timeout_s: float, every_s: float = 1.0) -> T:
    """Poll ``probe`` until it returns something other than None or False, within a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise DeployTestError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    from imgq.redis_server import free_port as _free_port

    return _free_port()


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http_get(url: str, *, auth: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


class Background:
    """A child process (an HTTP server, dockerd) that is stopped, by its own pid, at the end."""

    def __init__(self, name: str, cmd: Sequence[str | Path], log: Path, *, cwd: Path = ROOT) -> None:
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def http_server(name: str, directory: Path, port: int) -> Background:
    server = Background(name, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                               directory, str(port)], LOGS / f"{name}.log")
    try:
        wait_for(f"{name} on 127.0.0.1:{port}", lambda: server.proc.poll() is None and not port_free(port)
                 and http_get(f"http://127.0.0.1:{port}/")[0] == 200, timeout_s=30, every_s=0.2)
    except DeployTestError:
        server.stop()
        raise
    return server


# -- docker --------------------------------------------------------------------------------------------------

def docker_ok() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def start_dockerd() -> Background | None:
    """None when a dockerd already answers; else the one started here (as the issue asks: no bridge)."""
    if docker_ok():
        return None
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise DeployTestError("no dockerd answers, and starting one needs root and dockerd (apt-get install docker.io)")
    daemon = Background("dockerd", ["dockerd", "--bridge=none", "--iptables=false"], LOGS / "dockerd.log")
    try:
        wait_for("dockerd's socket", lambda: daemon.proc.poll() is None and docker_ok(), timeout_s=90)
    except DeployTestError:
        daemon.stop()
        raise
    return daemon


def image_mb(image: str) -> float:
    out = run(["docker", "image", "inspect", "-f", "{{.Size}}", image], timeout=60).stdout
    return round(int(out.strip()) / 1e6, 1)


def build_env() -> dict[str, str]:
    # The classic builder: what dockerd 20.10 runs by default, no buildx plugin needed.
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


# -- images --------------------------------------------------------------------------------------------------

def ensure_tools() -> None:
    missing = [tool for tool in ("docker", "docker-compose", "debootstrap") if shutil.which(tool) is None]
    if "debootstrap" in missing and os.geteuid() == 0 and shutil.which("apt-get"):
        run(["sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap"],
            timeout=900, log=LOGS / "apt-debootstrap.log")
        missing.remove("debootstrap")
    if missing:
        raise DeployTestError(f"missing {', '.join(missing)}: apt-get install docker.io docker-compose debootstrap")


def image_extras() -> list[str]:
    """The extras the Dockerfile installs (its IMGQ_EXTRAS default)."""
    match = re.search(r"^ARG IMGQ_EXTRAS=(\S*)$", (ROOT / "Dockerfile").read_text(), re.M)
    return [e for e in (match.group(1) if match else "").split(",") if e]


def image_python(image: str) -> str:
    out = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
               "import platform; print(platform.python_version())"], timeout=120).stdout
    return out.strip()


def host_python_like(version: str) -> str:
    """A host interpreter of the image's exact Python version: environment markers such as redis's
    `async-timeout; python_full_version < "3.11.3"` then pick the wheels the image's Python needs."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and run([candidate, "-c", "import platform, pip; print(platform.python_version())"],
                             timeout=60, check=False).stdout.strip() == version:
            return candidate
    print(f"deploy-test: no host Python {version} with pip: fetching wheels for {sys.version.split()[0]}",
          file=sys.stderr)
    return sys.executable


def gather_wheels(python: str) -> int:
    """Every wheel the image installs, fetched by the host's pip (its index, its local sources) at the versions
    this venv runs, into build/deploy/wheelhouse. Files already there are not fetched again."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build_requires = list(project["build-system"]["requires"])
    extras = project["project"].get("optional-dependencies", {})
    requirements = [*project["project"]["dependencies"], *build_requires, "wheel"]
    for extra in image_extras():
        requirements += extras[extra]
    freeze = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], timeout=120).stdout
    pins = [line for line in freeze.splitlines() if "==" in line and " @ " not in line]
    WHEELS.mkdir(parents=True, exist_ok=True)
    constraints = WORK / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    run([python, "-m", "pip", "download", "--only-binary", ":all:", "--dest", WHEELS,
         "--constraint", constraints, *requirements], timeout=3600, log=LOGS / "pip-download.log")
    return len(list(WHEELS.glob("*.whl")))


def build_images(report: Report, *, clean: bool) -> None:
    if clean:
        for image in (IMGQ_IMAGE, REDIS_IMAGE, BASE_IMAGE):
            run(["docker", "image", "rm", "-f", image], timeout=300, check=False)
        shutil.rmtree(WHEELS, ignore_errors=True)
    with report.step("base_image"):
        run(["sh", ROOT / "deploy" / "base-image.sh"], timeout=1800, log=LOGS / "base-image.log",
            env={**os.environ, "BASE_IMAGE": BASE_IMAGE, "SUITE": SUITE, "DEBS_DIR": str(REDIS_CONTEXT / "debs")})
    with report.step("wheels"):
        report.figures["wheels"] = gather_wheels(host_python_like(image_python(BASE_IMAGE)))
    with report.step("build_redis"):
        run(["docker", "build", "--network", "host", "-f", ROOT / "deploy" / "redis.Dockerfile",
             "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", REDIS_IMAGE, REDIS_CONTEXT],
            timeout=900, env=build_env(), log=LOGS / "build-redis.log")
    port = PIP_PORT if port_free(PIP_PORT) else free_port()
    server = http_server("pip-wheels", WHEELS, port)
    try:
        with report.step("build_imgq"):
            run(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                 "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS=http://127.0.0.1:{port}/",
                 "-t", IMGQ_IMAGE, ROOT], timeout=7200, env=build_env(), log=LOGS / "build-imgq.log")
    finally:
        server.stop()
    for image in (BASE_IMAGE, REDIS_IMAGE, IMGQ_IMAGE):
        report.image_mb[image] = image_mb(image)


# -- the compose stack ---------------------------------------------------------------------------------------

# Run by the interpreter docker-compose v1 itself runs on (it has PyYAML; this venv need not).
_DROP_PORTS = """
import sys, yaml
model = yaml.safe_load(sys.stdin)
for service in model["services"].values():
    if service.get("network_mode") == "host":
        service.pop("ports", None)
yaml.safe_dump(model, sys.stdout, default_flow_style=False, sort_keys=False)
"""


def compose_python() -> list[str]:
    compose = shutil.which("docker-compose")
    if compose is None:
        raise DeployTestError("no docker-compose")
    with open(compose, "rb") as f:
        shebang = f.readline().decode(errors="replace")
    if not shebang.startswith("#!") or "python" not in shebang:
        raise DeployTestError(f"{compose} is not compose v1's Python script: cannot render the model")
    return shebang[2:].split()


def render_compose(files: Sequence[str], env: dict[str, str], out: Path) -> Path:
    """docker-compose.yml + the override, as `docker-compose config` resolves them, less the published ports of
    host-networked services: dockerd refuses a container with both ("host" network_mode is incompatible with
    port_bindings), and an override cannot remove a list compose v1 merges (v2 has `ports: !reset []`).
    Everything else (commands, healthchecks, environments) is the files' own."""
    cmd = ["docker-compose", "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    resolved = run([*cmd, "config"], timeout=120, env=env).stdout
    rendered = run([*compose_python(), "-c", _DROP_PORTS], timeout=120, input_text=resolved).stdout
    out.touch(mode=0o600)  # it holds the Redis password
    out.write_text(rendered)
    return out

@dataclass
class Worker:
    container: str
    node: str
    metrics_port: int

    def metrics(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        if status != 200:
            raise DeployTestError(f"{self.node}: /metrics answered {status}")
        return body.decode()

    def images(self) -> int:
        """Items this worker process finished (labelled or error), from its own /metrics."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("imgq_images_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def model_version(self) -> str | None:
        match = re.search(r'^imgq_model_info\{[^}]*version="([^"]+)"', self.metrics(), re.M)
        return match.group(1) if match else None


class Stack:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.password = secrets.token_hex(16)
        self.redis_port = free_port()
        self.flower_port = free_port()
        self.flower_auth = f"imgq:{secrets.token_hex(8)}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "IMGQ_", "FLOWER_"))}
        self.env = {**base, "REDIS_PASSWORD": self.password, "REDIS_HOST": "127.0.0.1",
                    "REDIS_PORT": str(self.redis_port), "REDIS_IMAGE": REDIS_IMAGE, "IMGQ_IMAGE": IMGQ_IMAGE,
                    "FLOWER_PORT": str(self.flower_port), "FLOWER_BASIC_AUTH": self.flower_auth,
                    # The trainer's metrics (the workers pick their own): a free port of the host's.
                    "IMGQ_METRICS_PORT": str(free_port()),
                    # compose v1 waits this long for one API call; a warm stop may take the 60 s grace period.
                    "COMPOSE_HTTP_TIMEOUT": "300"}
        self.redis_url = f"redis://:{self.password}@127.0.0.1:{self.redis_port}/0"
        self._producer_env: dict[str, str] | None = None
        self.model = render_compose(COMPOSE_FILES, self.env, work / "compose.rendered.yml")

    def compose(self, *args: str, timeout: float = 600, check: bool = True,
                log: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "--project-name", PROJECT, "--project-directory", str(ROOT), "-f", str(self.model)]
        return run([*cmd, *args], timeout=timeout, env=self.env, check=check, log=log)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, timeout=60).stdout.split()

    def state(self, container: str) -> dict[str, Any]:
        out = run(["docker", "inspect", "-f", "{{json .State}}", container], timeout=60).stdout
        return dict(json.loads(out))

    def unhealthy(self, scale: dict[str, int]) -> list[str]:
        """What is not yet as it should be: init-model exited 0, every other container running and healthy."""
        problems = []
        for service in SERVICES:
            ids = self.containers(service)
            if len(ids) != scale.get(service, 1):
                problems.append(f"{service}: {len(ids)} containers")
            for cid in ids:
                state = self.state(cid)
                if service == "init-model":
                    if state["Status"] != "exited" or state["ExitCode"] != 0:
                        problems.append(f"init-model: {state['Status']} (exit {state['ExitCode']})")
                    continue
                health = (state.get("Health") or {}).get("Status")
                if state["Status"] != "running" or health != "healthy":
                    problems.append(f"{service} {cid[:12]}: {state['Status']}, {health}")
                    if state["Status"] == "exited":
                        logs = run(["docker", "logs", "--tail", "30", cid], timeout=60, check=False)
                        raise DeployTestError(f"{service} {cid[:12]} exited {state['ExitCode']}:\n"
                                              f"{logs.stdout}{logs.stderr}")
        return problems

    def wait_healthy(self, *, workers: int = 3, timeout_s: float = 600) -> str:
        last: list[list[str]] = [[]]

        def probe() -> bool:
            last[0] = self.unhealthy({"worker": workers})
            return not last[0]

        try:
            wait_for("every service healthy", probe, timeout_s=timeout_s, every_s=2)
        except DeployTestError as exc:
            raise DeployTestError(f"{exc}: {'; '.join(last[0])}") from None
        return self.compose("ps", timeout=60).stdout

    def workers(self) -> list[Worker]:
        found = []
        for cid in self.containers("worker"):
            out = run(["docker", "exec", cid, "cat", "/tmp/imgq-node", "/tmp/imgq-metrics-port"], timeout=60).stdout
            node, port = out.split()
            found.append(Worker(cid, node, int(port)))
        return found

    def producer_env(self) -> dict[str, str]:
        """The host's `imgq` sees what the workers see: their IMGQ_* settings (read off a running worker)."""
        if self._producer_env is None:
            cid = self.containers("worker")[0]
            env_list = json.loads(run(["docker", "inspect", "-f", "{{json .Config.Env}}", cid], timeout=60).stdout)
            theirs = dict(item.split("=", 1) for item in env_list if item.startswith("IMGQ_"))
            for k in ("IMGQ_MODEL_DIR", "IMGQ_METRICS_PORT"):
                theirs.pop(k, None)
            base = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
            self._producer_env = {**base, **theirs, "IMGQ_REDIS_URL": self.redis_url}
        return self._producer_env

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=10, decode_responses=True)

    def champion(self) -> str | None:
        value = self.redis().get(keys.CHAMPION)
        return None if value is None else str(value)


# -- jobs ----------------------------------------------------------------------------------------------------

def write_urls(path: Path, base_url: str, images: Sequence[str], n: int, tag: str) -> Path:
    # Distinct URLs over a small set of files: the server ignores the query string.
    path.write_text("".join(f"{base_url}/{images[i % len(images)]}?{tag}={i}\n" for i in range(n)))
    return path


def submit(stack: Stack, urls: Path) -> str:
    out = run([IMGQ, "submit", urls], timeout=600, env=stack.producer_env()).stdout
    return out.strip().splitlines()[-1]


def job_status(stack: Stack, job_id: str) -> dict[str, Any]:
    out = run([IMGQ, "status", job_id, "--json"], timeout=120, env=stack.producer_env()).stdout
    return dict(json.loads(out))


def wait_job(stack: Stack, job_id: str, *, timeout_s: float = 900) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = job_status(stack, job_id)
        return status if status["state"] == "done" else None

    return wait_for(f"job {job_id} to finish", done, timeout_s=timeout_s, every_s=2)


def check_results(path: Path, n: int) -> dict[str, Any]:
    """Every index exactly once, each with a label: the central promise, read off the exported records."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    indices = Counter(r["index"] for r in records)
    dupes = sorted(i for i, c in indices.items() if c > 1)
    missing = sorted(set(range(n)) - set(indices))
    errors = Counter(r["error"]["code"] for r in records if r["error"])
    if len(records) != n or dupes or missing:
        raise DeployTestError(f"{path.name}: {len(records)} records for {n} URLs, duplicated {dupes[:10]}, "
                              f"missing {missing[:10]}")
    if errors:
        raise DeployTestError(f"{path.name}: items ended in errors {dict(errors)}")
    return {"records": len(records), "versions": sorted({r["model_version"] for r in records})}


def export(stack: Stack, job_id: str, path: Path) -> None:
    run([IMGQ, "results", job_id, "-o", path], timeout=300, env=stack.producer_env())


def redelivered(stack: Stack, job_id: str) -> int:
    """Batches of the job that a worker started more than once (the killed worker's, delivered again)."""
    deliveries = stack.redis().hgetall(keys.deliveries(job_id))
    return sum(1 for v in deliveries.values() if int(v) > 1)


def active_on(stack: Stack, node: str) -> int:
    """How many tasks the node is running now (Celery's inspect, from the host)."""
    out = run([Path(sys.executable).parent / "celery", "-A", "worker.app", "inspect", "active", "-d", node,
               "-t", "5", "--json"], timeout=60, env=stack.producer_env(), check=False).stdout
    try:
        replies = json.loads(out)
    except json.JSONDecodeError:
        return 0
    return len(replies.get(node) or [])


def progress(stack: Stack, job_id: str) -> int:
    return int(job_status(stack, job_id)["done"])


# -- the scenario --------------------------------------------------------------------------------------------

def scenario(stack: Stack, report: Report, work: Path) -> None:
    figures = report.figures
    with report.step("stack_up"):
        stack.compose("up", "-d", "--no-build", "--scale", "worker=3", timeout=1800, log=LOGS / "compose-up.log")
        ps = stack.wait_healthy()
    print(ps, flush=True)
    (LOGS / "compose-ps.txt").write_text(ps)
    first = stack.champion()
    if not first:
        raise DeployTestError("init-model exited 0 but Redis names no champion")
    figures["champion"] = first

    images_dir = work / "images"
    run([IMGQ, "demo-data", images_dir, "--split", "test", "--per-class", "20"], timeout=300)
    images = sorted(str(p.relative_to(images_dir)) for p in images_dir.rglob("*.jpg"))
    image_port = free_port()
    image_server = http_server("image-server", images_dir, image_port)
    base_url = f"http://127.0.0.1:{image_port}"
    try:
        workers = stack.workers()
        if len({w.node for w in workers}) != 3:
            raise DeployTestError(f"worker names are not unique: {[w.node for w in workers]}")

        # 1. A plain job, the way the README submits one.
        with report.step("job"):
            urls = write_urls(work / "job1.txt", base_url, images, JOB_URLS, "job1")
            out = work / "job1.jsonl"
            run([IMGQ, "submit", urls, "--wait", "-o", out], timeout=1200, env=stack.producer_env(),
                log=LOGS / "job1-submit.log")
        check_results(out, JOB_URLS)
        spread = {w.node: w.images() for w in workers}
        figures["spread"] = "/".join(str(n) for n in spread.values())
        if len(spread) != 3 or min(spread.values()) == 0:
            raise DeployTestError(f"job 1 was not spread over three workers: {spread}")
        flower_tasks = flower_task_workers(stack)
        figures["flower_task_workers"] = len(flower_tasks)

        # 2. Kill a worker container while it runs a batch.
        victim = workers[0]
        urls = write_urls(work / "job2.txt", base_url, images, JOB_URLS, "job2")
        job2 = submit(stack, urls)
        wait_for(f"{victim.node} busy with job 2", lambda: active_on(stack, victim.node) > 0 and
                 progress(stack, job2) < JOB_URLS // 2, timeout_s=300, every_s=0.5)
        with report.step("kill"):
            run(["docker", "kill", victim.container], timeout=60)
            figures["done_at_kill"] = progress(stack, job2)
            wait_job(stack, job2)
        export(stack, job2, work / "job2.jsonl")
        check_results(work / "job2.jsonl", JOB_URLS)
        figures["redelivered"] = redelivered(stack, job2)
        figures["docker_restarted_killed"] = stack.state(victim.container)["Status"] == "running"
        stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=3", timeout=600)
        stack.wait_healthy()

        # 3. Warm shutdown of every worker mid-job, then start them again.
        urls = write_urls(work / "job3.txt", base_url, images, JOB_URLS, "job3")
        job3 = submit(stack, urls)
        wait_for("job 3 under way", lambda: 200 <= progress(stack, job3) < JOB_URLS // 2, timeout_s=300, every_s=0.5)
        with report.step("warm_stop"):
            stack.compose("stop", "worker", timeout=600)
        codes = [stack.state(c)["ExitCode"] for c in stack.containers("worker")]
        figures["done_at_stop"] = progress(stack, job3)
        figures["stop_exit_codes"] = ",".join(map(str, codes))
        if any(codes):
            raise DeployTestError(f"warm shutdown: the workers exited {codes} (0 expected)")
        with report.step("restart"):
            stack.compose("start", "worker", timeout=600)
            stack.wait_healthy()
            wait_job(stack, job3)
        export(stack, job3, work / "job3.jsonl")
        check_results(work / "job3.jsonl", JOB_URLS)
        status3 = job_status(stack, job3)
        if status3["dead_batches"] or status3["failed"]:
            raise DeployTestError(f"job 3 after the warm stop: {status3}")

        # 4. Retrain in the trainer container; the workers follow the new champion.
        with report.step("retrain"):
            stack.compose("exec", "-T", "trainer", "imgq", "retrain", "--wait", timeout=1800,
                          log=LOGS / "retrain.log")
        second = stack.champion()
        figures["new_champion"] = second
        if not second or second == first:
            raise DeployTestError(f"the retrain promoted nothing: champion {first} -> {second}")
        workers = stack.workers()
        before = {w.node: w.images() for w in workers}
        urls = write_urls(work / "job4.txt", base_url, images, 1000, "job4")
        out = work / "job4.jsonl"
        run([IMGQ, "submit", urls, "--wait", "-o", out], timeout=1200, env=stack.producer_env(),
            log=LOGS / "job4-submit.log")
        check_results(out, 1000)
        # A worker's first batches after the switch may still run on the model they hold (one thread loads the
        # new one meanwhile, worker/model_watch.py); every later batch is the new champion's.
        versions = Counter(json.loads(line)["model_version"] for line in out.read_text().splitlines())
        figures["job4_old_model_items"] = versions.get(first, 0)
        if set(versions) - {first, second} or versions[second] < sum(versions.values()) // 2:
            raise DeployTestError(f"job 4 was served by {dict(versions)}, not mostly by the new champion {second}")
        served = {w.node: (w.images() - before[w.node], w.model_version()) for w in workers}
        stale = {node: v for node, (n, v) in served.items() if n and v != second}
        if stale or not all(n for n, _ in served.values()):
            raise DeployTestError(f"workers after the retrain (images, model): {served}")

        # 5. Flower's API and every worker's /metrics.
        flower_workers = flower_api_workers(stack)
        missing = {w.node for w in workers} - set(flower_workers)
        if missing:
            raise DeployTestError(f"Flower's /api/workers lacks {missing}: {sorted(flower_workers)}")
        figures["flower_workers"] = len(flower_workers)
        figures["metrics_ok"] = sum(1 for w in workers if "imgq_worker_info" in w.metrics())
        if figures["metrics_ok"] != 3:
            raise DeployTestError("not every worker's /metrics answered with imgq's metrics")
        final = stack.wait_healthy(timeout_s=120)
        (LOGS / "compose-ps-final.txt").write_text(final)
    finally:
        image_server.stop()


def flower_api_workers(stack: Stack) -> dict[str, Any]:
    url = f"http://127.0.0.1:{stack.flower_port}/api/workers?refresh=1"
    status, _ = http_get(url, timeout=30)
    if status != 401:
        raise DeployTestError(f"Flower's API answered {status} without credentials (401 expected)")
    status, body = http_get(url, auth=stack.flower_auth, timeout=60)
    if status != 200:
        raise DeployTestError(f"Flower's /api/workers answered {status}: {body[:200]!r}")
    return dict(json.loads(body))


def flower_task_workers(stack: Stack) -> dict[str, int]:
    """Classify tasks Flower saw per worker (its task events)."""
    status, body = http_get(f"http://127.0.0.1:{stack.flower_port}/api/tasks?limit=10000", auth=stack.flower_auth,
                            timeout=60)
    if status != 200:
        raise DeployTestError(f"Flower's /api/tasks answered {status}")
    return dict(Counter(str(t.get("worker")) for t in json.loads(body).values()))


def teardown(stack: Stack | None, report: Report) -> None:
    if stack is None:
        return
    with report.step("teardown"):
        stack.compose("logs", "--no-color", "--timestamps", timeout=300, check=False, log=LOGS / "compose.log")
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=600, check=False)
        stack.model.unlink(missing_ok=True)  # it holds the (now useless) Redis password
        left = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                   timeout=60).stdout.split()
        volumes = run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                      timeout=60).stdout.split()
        if left or volumes:
            raise DeployTestError(f"teardown left containers {left} and volumes {volumes}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", action="store_true", help="only build the images")
    parser.add_argument("--clean", action="store_true", help="remove the images and wheels first (a clean run)")
    parser.add_argument("--keep", action="store_true", help="leave the stack up (and dockerd) for a look")
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    LOGS.mkdir(parents=True, exist_ok=True)
    report = Report()
    ok = False
    daemon: Background | None = None
    stack: Stack | None = None
    work = WORK / "run"
    try:
        ensure_tools()
        with report.step("dockerd"):
            daemon = start_dockerd()
        report.figures["started_dockerd"] = daemon is not None
        build_images(report, clean=args.clean)
        if not args.images:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            stack = Stack(work)
            stack.compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)  # a previous run's
            scenario(stack, report, work)
        ok = True
    except (DeployTestError, subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        print(f"deploy-test: FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        try:
            if args.keep and stack is not None:
                print(f"deploy-test: left running; remove with: docker-compose -p {PROJECT} "
                      f"-f {stack.model} down -v", flush=True)
                if daemon is not None:
                    print(f"deploy-test: and the dockerd started here: kill {daemon.proc.pid}", flush=True)
            else:
                teardown(stack, report)
                if daemon is not None:
                    with report.step("stop_dockerd"):
                        daemon.stop(timeout_s=60)
        except (DeployTestError, subprocess.TimeoutExpired) as exc:
            ok = False
            print(f"deploy-test: teardown FAILED: {exc}", file=sys.stderr, flush=True)
        (WORK / "report.json").write_text(json.dumps({"ok": ok, "timings_s": report.timings_s,
                                                      "image_mb": report.image_mb, "figures": report.figures},
                                                     indent=2, default=str) + "\n")
        print(report.summary(ok), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
