"""The compose deployment: `docker-compose config` accepts it, and its services run the same commands the
integration tests start as real processes. Each service's command and healthcheck are then run here, for real,
against a test Redis (no Docker engine is needed for that): the imgq services, Redis's own command (with the
local redis-server), and the worker wrapper of `make deploy-test`'s override. The images themselves are built
and the stack run by `make deploy-test` (deploy/deploy_test.py), which needs a Docker engine and root.
"""

from __future__ import annotations

import base64
import fnmatch
import importlib.util
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
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.main import build_parser
from cli.models import cmd_train
from cli.serve import cmd_beat, cmd_worker
from imgq.local import worker_command
from imgq.redis_conn import parse_sentinel
from imgq.redis_server import RedisServer, find_redis_server, free_port
from imgq.settings import Settings
from worker.supervisor import gpu_children

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")
PASSWORD = "s3cret-for-tests"
IMGQ_SERVICES = ("init-model", "worker", "trainer", "beat", "flower")
TEST_OVERRIDE = "deploy/docker-compose.test.yml"
# What deploy/deploy_test.py hands the override (free ports there).
TEST_OVERRIDE_ENV = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": "16379", "FLOWER_PORT": "15555",
                     "REDIS_IMAGE": "imgq-redis:bookworm", "FLOWER_BASIC_AUTH": "imgq:pw"}

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


def config(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved compose model, as `docker-compose config` prints it."""
    env = {"REDIS_PASSWORD": PASSWORD, **(env or {})}
    as_json = compose(*files, env=env, args=("config", "--format", "json"))
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):  # Compose v2 (v1 prints its usage)
        return dict(json.loads(as_json.stdout))
    proc = compose(*files, env=env)
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
    # A variable without a value is passed through from compose's environment, and absent when unset there.
    return {k: str(v) for k, v in env.items() if v is not None}


def unescape(text: str) -> str:
    return text.replace("$$", "$")  # compose's escape for a literal $ (`config` prints it escaped)


def healthcheck_shell(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    kind, rest = test[0], test[1:]
    script = rest[0] if kind == "CMD-SHELL" else shlex.join(rest)
    return unescape(script)


def shell_script(cmd: list[str]) -> str:
    """The script of an `sh -c SCRIPT [NAME ARGS...]` command."""
    assert cmd[:2] == ["sh", "-c"], cmd
    return unescape(cmd[2])


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

    # The worker and the trainer are imgq.local.worker_command(): what WorkerProcess starts in the tests.
    worker, trainer = services["worker"], services["trainer"]
    assert argv(worker) == ["imgq", *worker_command(name="worker@%h")[3:]]
    assert worker_command()[1:4] == ["-m", "cli", "worker"]  # `python -m cli` is `imgq`
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


def test_redis_is_password_protected_and_local_only_with_the_password_off_every_command_line() -> None:
    redis = config()["services"]["redis"]
    assert PASSWORD not in json.dumps(redis["command"]) and PASSWORD not in json.dumps(redis["healthcheck"])
    env = env_of(redis)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == PASSWORD
    assert redis["user"] == "redis"  # redis:7's entrypoint drops root only for a `redis-server` command
    (port,) = redis["ports"]
    host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
    assert host_ip == "127.0.0.1"


def test_redis_port_is_one_setting_for_the_url_the_server_and_the_published_port() -> None:
    services = config(env={"REDIS_PORT": "6390"})["services"]
    redis = services["redis"]
    assert env_of(redis)["REDIS_PORT"] == "6390" and '"$REDIS_PORT"' in healthcheck_shell(redis)
    assert '--port "$REDIS_PORT"' in shell_script(redis["command"])
    (port,) = redis["ports"]
    if isinstance(port, dict):
        assert (str(port["published"]), str(port["target"])) == ("6390", "6390")
    else:
        assert port.split("/")[0] == "127.0.0.1:6390:6390"
    for name in IMGQ_SERVICES:
        assert Settings.from_env(env_of(services[name])).redis_url == f"redis://:{PASSWORD}@redis:6390/0"
    # Workers on another host: REDIS_HOST names this one, at the same port.
    worker = config(env={"REDIS_PORT": "6390", "REDIS_HOST": "10.0.0.5"})["services"]["worker"]
    assert Settings.from_env(env_of(worker)).redis_url == f"redis://:{PASSWORD}@10.0.0.5:6390/0"


def test_redis_command_runs_durable_and_password_protected(tmp_path: Path) -> None:
    """docker-compose.yml's Redis command and healthcheck, run with the local redis-server (redis:7 and
    deploy/redis.Dockerfile run the same `sh -c`)."""
    import redis as redis_py

    service = config()["services"]["redis"]
    port = free_port()
    bin_dir = Path(find_redis_server()).parent
    env = {**os.environ, **env_of(service), "REDIS_PORT": str(port), "REDIS_ARGS": "--bind 127.0.0.1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", shell_script(service["command"])], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis_py.Redis(port=port, password=PASSWORD, socket_timeout=5)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.ping()
                break
            except redis_py.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, socket_timeout=5).ping()
        conf = {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync", "maxmemory-policy", "bind")}
        assert conf == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction",
                        "bind": "127.0.0.1"}
        # `exec`: redis-server is the process itself (it gets docker stop's SIGTERM), and its arguments
        # (what `ps` shows every user of the host) do not hold the password.
        assert Path(f"/proc/{proc.pid}/exe").resolve() == Path(find_redis_server()).resolve()
        assert PASSWORD.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        check = subprocess.run(["sh", "-c", healthcheck_shell(service)], env=env, capture_output=True, timeout=30)
        assert check.returncode == 0, check
        wrong = subprocess.run(["sh", "-c", healthcheck_shell(service)], env={**env, "REDISCLI_AUTH": "wrong"},
                               capture_output=True, timeout=30)
        assert wrong.returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


def test_flower_basic_auth_is_passed_through_only_when_set() -> None:
    flower = config()["services"]["flower"]
    # Unset: no FLOWER_BASIC_AUTH in the container (an empty one would be one empty credential).
    assert (flower.get("environment") or {}).get("FLOWER_BASIC_AUTH") is None
    flower = config(env={"FLOWER_BASIC_AUTH": "admin:pw", "FLOWER_PORT": "5600"})["services"]["flower"]
    assert env_of(flower)["FLOWER_BASIC_AUTH"] == "admin:pw"
    assert "--port=5600" in argv(flower) and ":5600/healthcheck" in healthcheck_shell(flower)
    assert Settings.from_env(env_of(flower)).redis_url  # the imgq environment is still all there


def test_dockerfiles_take_their_base_image_as_a_build_argument() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    # The ARG before FROM: the base is a build argument, python:3.11-slim unless the build says otherwise.
    assert lines[:2] == ["ARG BASE_IMAGE=python:3.11-slim", "FROM ${BASE_IMAGE}"]
    assert sum(ln.startswith("FROM ") for ln in lines) == 1
    # pip's settings are build arguments (the build's own), not ENV (they would stay in the image).
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        assert f"ARG {name}" in lines and not any(ln.startswith("ENV") and name in ln for ln in lines)
    assert any("python3 -m venv" in ln for ln in lines)  # a base with python3 but no pip serves
    # One image runs every role: the extras of Flower and the training report are pyproject.toml's.
    (extras,) = [ln.removeprefix("ARG IMGQ_EXTRAS=") for ln in lines if ln.startswith("ARG IMGQ_EXTRAS=")]
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    assert extras and all(e in optional for e in extras.split(","))
    redis_lines = (ROOT / "deploy" / "redis.Dockerfile").read_text().splitlines()
    assert "FROM ${BASE_IMAGE}" in redis_lines and any(ln.startswith("ARG BASE_IMAGE=") for ln in redis_lines)
    assert "USER redis" in redis_lines and "VOLUME /data" in redis_lines
    for script in ("base-image.sh",):
        assert subprocess.run(["sh", "-n", str(ROOT / "deploy" / script)], timeout=30).returncode == 0


def _dockerignored(name: str) -> bool:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    return any(fnmatch.fnmatch(name, pattern.removeprefix("**/")) for pattern in patterns)


def test_the_build_context_holds_every_package_the_image_installs_and_not_the_rest() -> None:
    # The Dockerfile copies the context (`COPY . ./`): a package moved or added stays in the image as long as
    # pyproject.toml's packages.find includes it and .dockerignore does not drop it.
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()
                and any(fnmatch.fnmatch(d.name, pattern) for pattern in includes)]
    assert packages and not [p for p in packages if _dockerignored(p)]
    assert not _dockerignored("pyproject.toml")
    for name in (".git", ".venv", "tests", "bench", "deploy", "build", "models", ".env", "README.md"):
        assert _dockerignored(name), name
    assert "COPY . ./" in (ROOT / "Dockerfile").read_text()


def test_the_deploy_test_override_puts_every_service_on_the_host_network_and_loopback() -> None:
    services = config("docker-compose.yml", TEST_OVERRIDE, env=TEST_OVERRIDE_ENV)["services"]
    assert set(services) == {"redis", *IMGQ_SERVICES}
    assert {s.get("network_mode") for s in services.values()} == {"host"}
    assert env_of(services["redis"])["REDIS_ARGS"] == "--bind 127.0.0.1"
    assert env_of(services["flower"])["FLOWER_ADDRESS"] == "127.0.0.1"
    assert env_of(services["flower"])["FLOWER_BASIC_AUTH"] == "imgq:pw"
    assert services["redis"]["image"] == "imgq-redis:bookworm"
    for name in IMGQ_SERVICES:
        settings = Settings.from_env(env_of(services[name]))  # validated: the short timeouts fit together
        assert settings.redis_url == f"redis://:{PASSWORD}@127.0.0.1:16379/0"
        assert settings.allow_networks == ("127.0.0.0/8",)
        assert settings.visibility_timeout_s < Settings().visibility_timeout_s
    # docker-compose.yml's commands and healthchecks stay, but the worker's (see the next test).
    base = config(env=TEST_OVERRIDE_ENV)["services"]
    for name in ("trainer", "beat", "flower", "init-model"):
        assert argv(services[name]) == argv(base[name]), name
        assert services[name]["healthcheck"]["test"] == base[name]["healthcheck"]["test"], name
    assert services["redis"]["command"] == base["redis"]["command"]


def test_the_deploy_test_runs_the_files_less_the_ports_dockerd_refuses_under_host_networking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("deploy_test", ROOT / "deploy" / "deploy_test.py")
    assert spec is not None and spec.loader is not None
    deploy_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "deploy_test", deploy_test)  # its dataclasses look their module up
    spec.loader.exec_module(deploy_test)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "IMGQ_", "FLOWER_"))}
    env = {**base, "REDIS_PASSWORD": PASSWORD, **TEST_OVERRIDE_ENV}
    rendered = deploy_test.render_compose(deploy_test.COMPOSE_FILES, env, tmp_path / "compose.yml")
    assert rendered.stat().st_mode & 0o077 == 0  # it holds the password
    services = config(str(rendered))["services"]
    merged = config("docker-compose.yml", TEST_OVERRIDE, env=TEST_OVERRIDE_ENV)["services"]
    assert not any("ports" in s for s in services.values())
    for name, service in merged.items():
        service.pop("ports", None)
        assert services[name] == service, name


def test_the_deploy_test_worker_wrapper_names_each_replica_apart(tmp_path: Path) -> None:
    """The override's worker entrypoint, run here on a fake mountinfo: it runs docker-compose.yml's worker
    command with a name from the container id and a free metrics port, and the healthcheck pings that name."""
    services = config("docker-compose.yml", TEST_OVERRIDE, env=TEST_OVERRIDE_ENV)["services"]
    worker = services["worker"]
    assert worker["command"] == config()["services"]["worker"]["command"]
    entrypoint = worker["entrypoint"]
    script = shell_script(entrypoint)
    cid = "0123456789ab" + "c" * 52
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"90 74 254:0 /var/lib/docker/containers/{cid}/resolv.conf /etc/resolv.conf rw - ext4\n"
                         f"92 74 254:0 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4\n")
    fake_imgq = tmp_path / "bin" / "imgq"
    fake_imgq.parent.mkdir()
    fake_imgq.write_text('#!/bin/sh\nprintf "%s\\n" "$IMGQ_METRICS_PORT" "$@"\n')
    fake_imgq.chmod(0o755)
    script = script.replace("/proc/self/mountinfo", str(mountinfo)).replace("/tmp/imgq-", f"{tmp_path}/imgq-")
    env = {**os.environ, "PATH": f"{fake_imgq.parent}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}"}
    out = subprocess.run(["sh", "-c", script, *entrypoint[3:], *worker["command"]], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    port, *args = out.stdout.split()
    assert 0 < int(port) < 65536 and (tmp_path / "imgq-metrics-port").read_text().strip() == port
    parsed = build_parser().parse_args(args)
    assert parsed.func is cmd_worker and parsed.name == "worker@%h-0123456789ab"  # the last --name wins
    node = (tmp_path / "imgq-node").read_text().strip()
    assert node == f"worker@{socket.gethostname()}-0123456789ab"  # what %h expands to
    assert '-d "$(cat /tmp/imgq-node)"' in healthcheck_shell(worker)


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
                env.update(FLOWER_BASIC_AUTH="imgq:pw", FLOWER_ADDRESS="127.0.0.1")  # as compose passes them
                service = {**service, "healthcheck": {"test": [
                    c.replace(":5555/", f":{flower_port}/") for c in service["healthcheck"]["test"]]}}
                services[name] = service
            # `imgq` and `celery` are this venv's console scripts: run them as modules of this interpreter.
            cmd = [sys.executable, "-m", "cli" if cmd[0] == "imgq" else cmd[0], *cmd[1:]]
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                procs.append((name, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                     cwd=tmp_path), env, log))
        for name, proc, env, log in procs:
            _healthy(services[name], env, proc, log)
        # Flower's API answers with the basic auth FLOWER_BASIC_AUTH set, and only with it.
        api = f"http://127.0.0.1:{flower_port}/api/workers"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(api, timeout=10)
        assert refused.value.code == 401
        auth = "Basic " + base64.b64encode(b"imgq:pw").decode()
        request = urllib.request.Request(api, headers={"Authorization": auth})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200 and isinstance(json.loads(response.read()), dict)
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


def test_the_sentinel_override_points_every_imgq_service_at_three_sentinels() -> None:
    services = config("docker-compose.yml", "docker-compose.sentinel.yml")["services"]
    assert {"redis-replica-1", "redis-replica-2", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    for name in IMGQ_SERVICES:
        url = env_of(services[name])["IMGQ_REDIS_URL"]
        target = parse_sentinel(url)
        assert target.master == "mymaster" and len(target.sentinels) == 3, (name, url)
        assert Settings.from_env({"IMGQ_REDIS_URL": url}).redis_url == url
    for name in ("redis-replica-1", "sentinel-1"):
        assert PASSWORD not in json.dumps(services[name]["command"]), name  # config on stdin or in a file
