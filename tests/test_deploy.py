"""The compose deployment: `docker-compose config` accepts it, and its services run the same commands the
integration tests start as real processes. Each imgq service's command and healthcheck are then run here, for
real, against a test Redis (no Docker engine is needed for that).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgq.redis_server import RedisServer, free_port
from imgq.settings import Settings
from producer.cli import build_parser, cmd_beat, cmd_train, cmd_worker
from producer.local import worker_command
from producer.supervisor import gpu_children

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")
PASSWORD = "s3cret-for-tests"
IMGQ_SERVICES = ("init-model", "worker", "trainer", "beat", "flower")

pytestmark = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is not installed (`make install` apt-gets Debian's docker-compose "
    "when run as root; CI runs this file)")


def compose(*files: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ("config",)
            ) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    cmd = [COMPOSE, "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "IMGQ_", "FLOWER_"))}
    return subprocess.run([*cmd, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def _yaml_to_json(text: str) -> Any:
    # docker-compose v1 prints YAML only and this venv has no YAML library: load it with the one compose itself
    # runs on, through the interpreter on its shebang line.
    assert COMPOSE is not None
    with open(COMPOSE, "rb") as f:
        shebang = f.readline().decode(errors="replace")
    if not shebang.startswith("#!") or "python" not in shebang:
        pytest.fail(f"cannot read {COMPOSE}'s YAML output: not a Python script and `config --format json` failed")
    interpreter = shebang[2:].split()
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    out = subprocess.run([*interpreter, "-c", code], input=text, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def config(*files: str) -> dict[str, Any]:
    """The resolved compose model, as `docker-compose config` prints it."""
    as_json = compose(*files, env={"REDIS_PASSWORD": PASSWORD}, args=("config", "--format", "json"))
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):  # Compose v2 (v1 prints its usage)
        return dict(json.loads(as_json.stdout))
    proc = compose(*files, env={"REDIS_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    return dict(_yaml_to_json(proc.stdout))


def image_entrypoint() -> list[str]:
    (line,) = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    return list(json.loads(line.removeprefix("ENTRYPOINT")))


def argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: its entrypoint (or the image's) followed by its command."""
    return [*(service.get("entrypoint") or image_entrypoint()), *(service.get("command") or [])]


def imgq_args(service: dict[str, Any]) -> list[str]:
    """The `imgq ...` arguments of a service, also when a shell script wraps it (`... || exec imgq ...`)."""
    cmd = argv(service)
    if cmd[0] == "imgq":
        return cmd[1:]
    assert cmd[:2] == ["sh", "-c"], cmd
    (tail,) = re.findall(r"exec imgq (.*)$", cmd[2])
    return shlex.split(tail)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # some compose versions print KEY=VALUE lists
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def healthcheck_shell(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    kind, rest = test[0], test[1:]
    script = rest[0] if kind == "CMD-SHELL" else shlex.join(rest)
    return script.replace("$$", "$")  # compose's escape for a literal $


# -- the compose model -----------------------------------------------------------------------------------------

def test_config_validates_and_refuses_to_start_without_a_redis_password() -> None:
    assert compose(env={"REDIS_PASSWORD": PASSWORD}, args=("config", "-q")).returncode == 0
    missing = compose(args=("config", "-q"))
    assert missing.returncode != 0 and "set REDIS_PASSWORD" in missing.stderr


def test_services_run_the_commands_the_integration_tests_start() -> None:
    services = config()["services"]
    assert set(services) == {"redis", *IMGQ_SERVICES}
    assert all(s.get("healthcheck", {}).get("test") for s in services.values()), "every service has a healthcheck"
    parser = build_parser()

    # The worker and the trainer are producer.local.worker_command(): what WorkerProcess starts in the tests.
    worker, trainer = services["worker"], services["trainer"]
    assert argv(worker) == ["imgq", *worker_command(name="worker@%h")[3:]]
    assert worker_command()[1:4] == ["-m", "producer", "worker"]  # `python -m producer` is `imgq`
    train_queue = Settings().train_queue
    assert argv(trainer) == ["imgq", *worker_command(concurrency=1, name="trainer@%h", queues=train_queue)[3:]]
    for service in (worker, trainer):
        args = parser.parse_args(imgq_args(service))
        assert args.func is cmd_worker
        # The healthcheck pings exactly the node the command names.
        assert f"-d {args.name.replace('%h', '$HOSTNAME')} " in healthcheck_shell(service)
    assert worker["stop_signal"] == "SIGTERM" and worker["stop_grace_period"]
    assert parser.parse_args(imgq_args(services["beat"])).func is cmd_beat
    init = parser.parse_args(imgq_args(services["init-model"]))
    assert init.func is cmd_train and init.data == "demo"
    # Flower is Celery's own CLI on the app the tests' `celery -A worker.app inspect ping` uses.
    assert argv(services["flower"])[:4] == ["celery", "-A", "worker.app", "flower"]
    assert "--port=5555" in argv(services["flower"]) and "5555/healthcheck" in healthcheck_shell(services["flower"])

    for name in IMGQ_SERVICES:
        env = env_of(services[name])
        settings = Settings.from_env(env)  # every service's environment passes imgq's validation
        assert settings.redis_url == f"redis://:{PASSWORD}@redis:6379/0"
        assert settings.model_dir == Path("/models")
        assert any(str(v).startswith("models:/models") or (isinstance(v, dict) and v.get("target") == "/models")
                   for v in services[name]["volumes"]), name
    assert Settings.from_env(env_of(services["beat"])).retrain_cron  # `imgq beat` refuses to run without one


def test_redis_is_durable_password_protected_and_local_only() -> None:
    redis = config()["services"]["redis"]
    cmd = redis["command"]
    pairs = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("--")}
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction" and pairs["--requirepass"] == PASSWORD
    (port,) = redis["ports"]
    host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
    assert host_ip == "127.0.0.1"


def test_gpu_override_reserves_gpus_and_runs_one_worker_per_gpu() -> None:
    worker = config("docker-compose.yml", "docker-compose.gpu.yml")["services"]["worker"]
    args = build_parser().parse_args(imgq_args(worker))
    assert args.func is cmd_worker and args.gpus == "all"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    first = gpu_children(["0"], Settings())[0].name
    assert f"-d {first.replace('%h', '$HOSTNAME')} " in healthcheck_shell(worker)


# -- the services' commands and healthchecks, run for real ---------------------------------------------------------

@pytest.fixture
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def _run_env(service: dict[str, Any], redis_url: str, model_dir: Path) -> dict[str, str]:
    env = {**os.environ, **env_of(service)}
    env.update(IMGQ_REDIS_URL=redis_url, IMGQ_MODEL_DIR=str(model_dir), IMGQ_METRICS_PORT="0",
               IMGQ_TORCH_THREADS="1", HOSTNAME=socket.gethostname(),
               # Healthchecks call `celery` and `python`: in the image they are on PATH, here they are the venv's.
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _healthy(service: dict[str, Any], env: dict[str, str], proc: subprocess.Popen[bytes], log: Path,
             timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        check = subprocess.run(["sh", "-c", healthcheck_shell(service)], env=env, capture_output=True, timeout=60)
        if check.returncode == 0:
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{check.stderr!r}\n{log.read_text()[-3000:]}"
        time.sleep(1)


def test_worker_beat_and_flower_commands_run_and_pass_their_healthchecks(
        redis_url: str, model_dir: Path, tmp_path: Path) -> None:
    services = config()["services"]
    flower_port = free_port()
    procs: list[tuple[str, subprocess.Popen[bytes], dict[str, str], Path]] = []
    try:
        # The trainer is the worker's command with other flags (checked above): not started again here.
        for name in ("worker", "beat", "flower"):
            service = services[name]
            env = _run_env(service, redis_url, model_dir)
            cmd = argv(service)
            if name == "flower":  # a free port here; the compose file pairs 5555 with its healthcheck
                cmd = [c.replace("--port=5555", f"--port={flower_port}") for c in cmd]
                service = {**service, "healthcheck": {"test": [
                    c.replace(":5555/", f":{flower_port}/") for c in service["healthcheck"]["test"]]}}
                services[name] = service
            # `imgq` and `celery` are this venv's console scripts: run them as modules of this interpreter.
            cmd = [sys.executable, "-m", "producer" if cmd[0] == "imgq" else cmd[0], *cmd[1:]]
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                procs.append((name, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                     cwd=tmp_path), env, log))
        for name, proc, env, log in procs:
            _healthy(services[name], env, proc, log)
    finally:
        for _, proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, _, log in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"{name} ignored SIGTERM:\n{log.read_text()[-2000:]}")
