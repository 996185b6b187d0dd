"""Model lifecycle under faults and races, on real processes: a killed trainer, concurrent promotions.

- A trainer SIGKILLed mid-retrain holds the retrain lock for one lease at most; the next trigger runs, and
  `imgq retrain --wait` says the previous run died. A follower of the dead run ends with `failed`.
- Promotions, rollbacks and the gate's promotion racing from several processes leave the disk pointer,
  the Redis pointer, both histories and `imgq models list` naming one version, with and without Redis.
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.lifecycle import follow_retrain, trigger_retrain
from imgq.redis_server import RedisServer, free_port
from imgq.settings import Settings
from model.champion import CHAMPION_KEY, HISTORY_KEY, Champion
from model.pointer import CHAMPION_FILE, HISTORY_FILE, champion_version
from model.promotion import Decision, decide
from model.registry import version_dir
from model.retrain import LOCK_KEY, RetrainRequest, events_key, train_and_gate
from tests.support import Cluster, settings_for
from worker.manifest import load_training_data

# A long-lived process that runs the real CLI (`cli.main.main`) once per JSON argv line on stdin and
# answers one JSON line: promotions from several of them, released together, really overlap (a fresh
# `python -m cli` per call spends seconds importing torch, so calls would rarely meet).
CLI_DRIVER = r"""
import json, os, sys, tempfile
from cli.main import main
answers = os.fdopen(os.dup(1), "w")  # fd 1 itself is pointed at a file per call: the CLI prints to it
for line in sys.stdin:
    with tempfile.TemporaryFile("w+") as out:
        os.dup2(out.fileno(), 1)
        rc = main(json.loads(line))
        sys.stdout.flush()
        out.seek(0)
        answers.write(json.dumps({"rc": rc, "out": out.read()}) + "\n")
        answers.flush()
"""


class CliProcess:
    def __init__(self, settings: Settings, log: Path) -> None:
        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", CLI_DRIVER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)

    def send(self, *argv: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, f"CLI process gave no answer in {timeout_s:g} s"
        line = self.proc.stdout.readline()
        assert line, f"CLI process exited with {self.proc.wait(timeout=10)}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, *argv: str) -> dict[str, Any]:
        self.send(*argv)
        return self.reply()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def make_versions(models: Path, n: int) -> list[str]:
    """``n`` published versions (copies of the champion under new ids); the first is the champion."""
    good = champion_version(models)
    assert good is not None
    versions = [good]
    for i in range(1, n):
        version = good[:-8] + f"{i:08x}"
        shutil.copytree(version_dir(models, good), version_dir(models, version))
        meta_path = version_dir(models, version) / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["version"] = version
        meta_path.write_text(json.dumps(meta))
        versions.append(version)
    return versions


def disk_state(models: Path) -> tuple[str | None, list[str]]:
    history = (models / HISTORY_FILE).read_text().split() if (models / HISTORY_FILE).exists() else []
    return champion_version(models), history


def listed_champion(cli: CliProcess) -> list[str]:
    answer = cli.call("models", "list", "--json")
    assert answer["rc"] == 0, answer
    return [m["version"] for m in json.loads(answer["out"]) if m["champion"]]


def race(promoters: list[CliProcess], lister: CliProcess, versions: list[str], models: Path,
         client: redis.Redis | None, rounds: int) -> list[str]:
    """``rounds`` rounds of concurrent promotions (and a rollback every third round); the disagreements."""
    disagreements = []
    for r in range(rounds):
        ops: list[tuple[str, ...]] = [("models", "promote", versions[(r + i) % len(versions)])
                                      for i in range(len(promoters))]
        if r % 3 == 2:
            ops[0] = ("models", "rollback")
        for cli, op in zip(promoters, ops, strict=True):
            cli.send(*op)
        answers = [cli.reply() for cli in promoters]
        assert all(a["rc"] == 0 for a in answers), answers
        pointer, history = disk_state(models)
        seen: dict[str, Any] = {"disk": pointer, "disk history": history[-1:], "models list": listed_champion(lister)}
        if client is not None:
            raw = client.get(CHAMPION_KEY)
            redis_history = [v.decode() for v in client.lrange(HISTORY_KEY, 0, -1) if isinstance(v, bytes)]
            seen["redis"] = raw.decode() if isinstance(raw, bytes) else None
            seen["redis history"] = redis_history[-1:]
            if redis_history != history:  # the whole history too: a rollback after this round must agree
                disagreements.append(f"round {r}: histories differ, disk {history} redis {redis_history}")
        names = {",".join(v) if isinstance(v, list) else str(v) for v in seen.values()}
        if len(names) != 1:
            disagreements.append(f"round {r}: {seen}")
    return disagreements


@pytest.fixture
def models(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the registry: these tests change the champion."""
    copy = tmp_path / "models"
    shutil.copytree(model_dir, copy)
    return copy


@pytest.fixture
def lifecycle(models: Path, tmp_path: Path) -> Iterator[Cluster]:
    with RedisServer() as server:
        c = Cluster(settings_for(server.url, models), tmp_path)
        yield c
        c.stop()


def imgq(*args: str, settings: Settings, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def events_of(client: redis.Redis, run: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(events_key(run), 0, -1)]


def wait_for_event(cluster: Cluster, run: str, kind: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in events_of(cluster.store.r, run) if e["event"] == kind]
        if found:
            return found[0]
        for w in cluster.workers:
            if w.proc.poll() is None:
                break
        else:
            raise AssertionError("no live trainer:\n" + "\n".join(w.log_tail() for w in cluster.workers))
        assert time.monotonic() < deadline, f"no {kind!r} event from run {run}: {events_of(cluster.store.r, run)}"
        time.sleep(0.1)


def kill(cluster: Cluster, worker_index: int) -> None:
    worker = cluster.workers.pop(worker_index)  # a dead worker is expected: wait_ready() must not trip on it
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=30)


def assert_lease_renewed(cluster: Cluster, run: str) -> None:
    """Over two leases after the run started, the lock names the run and never has more than one lease left."""
    r, lease_s = cluster.store.r, cluster.settings.lease_s
    started = time.monotonic()
    while time.monotonic() - started < 2 * lease_s:  # a window to observe renewal, not a synchronisation
        assert r.get(LOCK_KEY) == run.encode(), events_of(r, run)
        assert 0 < r.pttl(LOCK_KEY) <= lease_s * 1000  # never the old six hours
        time.sleep(0.1)


def test_a_killed_trainer_frees_the_lock_within_a_lease_and_the_next_retrain_says_it_died(
        lifecycle: Cluster) -> None:
    settings = lifecycle.settings
    lifecycle.start_worker("trainer1@%h", queues=settings.train_queue)
    lifecycle.wait_ready()
    dead = trigger_retrain(lifecycle.app, settings, RetrainRequest(epochs=30))
    wait_for_event(lifecycle, dead, "started")
    assert_lease_renewed(lifecycle, dead)  # mid-run: loading data, then training
    kill(lifecycle, 0)
    killed_at = time.monotonic()

    # Nothing renews it now: the lock is gone within one lease, without anyone deleting it.
    deadline = time.monotonic() + 10 * settings.lease_s
    while lifecycle.store.r.exists(LOCK_KEY):
        assert time.monotonic() < deadline, f"lock still held, TTL {lifecycle.store.r.pttl(LOCK_KEY)} ms"
        time.sleep(0.05)
    freed_s = time.monotonic() - killed_at

    lifecycle.start_worker("trainer2@%h", queues=settings.train_queue)
    lifecycle.wait_ready()
    # 32 px: one short epoch on a busy CI machine.
    proc = imgq("retrain", "--data", "demo", "--epochs", "1", "--input-size", "32", "--wait", settings=settings,
                timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"previous run {dead} died (its trainer stopped renewing the retrain lease)" in proc.stdout
    assert "skipped" not in proc.stdout and "val accuracy" in proc.stdout
    run = proc.stdout.split()[-1]
    assert [e["event"] for e in events_of(lifecycle.store.r, run)] == ["started", "previous_died", "epoch", "done"]
    assert not lifecycle.store.r.exists(LOCK_KEY)  # released at the end

    # The dead run's list now ends, once, so its follower stops.
    old = events_of(lifecycle.store.r, dead)
    assert [e["event"] for e in old if e["event"] in ("done", "skipped", "failed")] == ["failed"]
    outcome = follow_retrain(settings, dead, out=io.StringIO(), timeout_s=30)
    assert outcome["event"] == "failed" and "trainer died" in outcome["reason"]
    print(f"lock freed {freed_s:.1f} s after SIGKILL (lease {settings.lease_s:g} s)")


def test_following_a_run_whose_trainer_was_killed_ends_failed_not_forever(lifecycle: Cluster) -> None:
    settings = lifecycle.settings
    lifecycle.start_worker("trainer@%h", queues=settings.train_queue)
    lifecycle.wait_ready()
    run = trigger_retrain(lifecycle.app, settings, RetrainRequest(epochs=30))
    wait_for_event(lifecycle, run, "started")
    assert_lease_renewed(lifecycle, run)
    kill(lifecycle, 0)
    out = io.StringIO()
    outcome = follow_retrain(settings, run, out=out, timeout_s=10 * settings.lease_s)
    assert outcome["event"] == "failed" and outcome.get("died") is True, outcome
    assert f"trainer died: run {run} stopped renewing the retrain lease" in out.getvalue()
    assert [e["event"] for e in events_of(lifecycle.store.r, run)][-1] == "failed"


def test_the_gate_holds_back_a_candidate_if_the_champion_changed_while_it_was_measured(
        models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = make_versions(models, 2)
    with RedisServer() as server:
        settings = settings_for(server.url, models).replace(promote_tolerance=1.0)  # any candidate would win
        def decide_while_someone_promotes(*args: Any, **kwargs: Any) -> Decision:
            decision = decide(*args, **kwargs)
            proc = imgq("models", "promote", versions[1], settings=settings)  # another process, mid-gate
            assert proc.returncode == 0, proc.stderr
            return decision

        monkeypatch.setattr("model.retrain.decide", decide_while_someone_promotes)
        client = redis.Redis.from_url(server.url)
        try:
            outcome = train_and_gate(settings, Champion(models, client), RetrainRequest(epochs=1),
                                     load_data=load_training_data)
            assert not outcome["promoted"], outcome
            assert f"the champion changed during gating ({versions[0]} -> {versions[1]})" in outcome["reason"]
            assert client.get(CHAMPION_KEY) == versions[1].encode() == (models / CHAMPION_FILE).read_bytes().strip()
            assert client.lindex(HISTORY_KEY, -1) == versions[1].encode()
        finally:
            client.close()


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "no-redis"])
def test_concurrent_promotions_and_rollbacks_leave_one_champion(models: Path, tmp_path: Path,
                                                                with_redis: bool) -> None:
    versions = make_versions(models, 4)
    with RedisServer() as server:
        url = server.url if with_redis else f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        settings = settings_for(url, models)
        client = redis.Redis.from_url(server.url) if with_redis else None
        n = 3 if with_redis else 2
        clis = [CliProcess(settings, tmp_path / f"cli{i}.log") for i in range(n + 1)]
        try:
            for cli in clis:  # warm up: imports done before the first round
                assert cli.call("models", "list")["rc"] == 0
            disagreements = race(clis[:n], clis[n], versions, models, client, rounds=30)
        finally:
            for cli in clis:
                cli.close()
        print(f"{len(disagreements)} of 30 rounds disagreed", *disagreements, sep="\n")
        assert disagreements == []
        # And a fresh CLI process (no warm state) gives the same answer.
        env = {**os.environ, **settings.to_env()}
        proc = subprocess.run([sys.executable, "-m", "cli", "models", "list", "--json"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert [m["version"] for m in json.loads(proc.stdout) if m["champion"]] == [champion_version(models)]
        if client is not None:
            assert client.lrange(HISTORY_KEY, 0, -1) == [
                v.encode() for v in (models / HISTORY_FILE).read_text().split()]
            client.close()
