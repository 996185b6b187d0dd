"""Model lifecycle on real parts: retrain task on a trainer worker, gate, promote, rollback, hot reload, beat."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cli.lifecycle import follow_retrain, trigger_retrain
from imgq import keys
from model.champion import CHAMPION_KEY, Champion
from model.checkpoint import WEIGHTS_FILE
from model.pointer import champion_version
from model.registry import list_versions, version_dir
from model.report import CONFUSION_FILE, CURVES_FILE, METRICS_FILE
from model.retrain import RetrainRequest, events_key
from tests.support import Cluster, ImageSite, closed_port_url, copy_of_champion
from worker.manifest import read_manifest


def imgq(*args: str, cluster: Cluster, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.settings.to_env()}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _host() -> str:
    import socket
    return socket.gethostname()


def versions_of(cluster: Cluster, job: str) -> list[str]:
    return [str(r["model_version"]) for r in cluster.results(job)]


def test_retrain_while_a_job_runs_switches_versions_between_batches_and_one_trigger_wins(
        lifecycle: Cluster, image_site: ImageSite) -> None:
    settings = lifecycle.settings = lifecycle.settings.replace(promote_tolerance=1.0)  # any candidate wins
    old = champion_version(settings.model_dir)
    lifecycle.start_worker("classify@%h", IMGQ_CONCURRENCY="1", IMGQ_PROMOTE_TOLERANCE="1.0")
    lifecycle.start_worker("trainer@%h", queues=settings.train_queue, IMGQ_CONCURRENCY="2",
                           IMGQ_PROMOTE_TOLERANCE="1.0")
    lifecycle.wait_ready(2)

    urls = [f"{url}?i={i}" for i, url in enumerate(list(image_site.truth) * 20)]  # 1200 URLs
    job = lifecycle.submit(urls)
    deadline = time.monotonic() + 120
    while lifecycle.store.status(job).done < 100:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Pause the classify worker mid-job with Celery's own remote control, so the job is still running
    # when the new model lands (training takes far longer than the job on an idle machine).
    lifecycle.app.control.cancel_consumer(settings.classify_queue, destination=["classify@" + _host()], reply=True)

    # Two triggers at once: one trains, the other is skipped with a reason.
    runs = [trigger_retrain(lifecycle.app, settings, RetrainRequest(epochs=1)) for _ in range(2)]
    outcomes = [follow_retrain(settings, run, out=io.StringIO(), timeout_s=400) for run in runs]
    assert sorted(o["event"] for o in outcomes) == ["done", "skipped"], outcomes
    done = next(o for o in outcomes if o["event"] == "done")
    skipped = next(o for o in outcomes if o["event"] == "skipped")
    assert "another retrain is running" in skipped["reason"]
    assert done["promoted"] and done["version"] != old
    assert lifecycle.store.r.get(CHAMPION_KEY) == done["version"].encode()
    assert lifecycle.store.status(job).state == "running"
    time.sleep(1.0)  # > IMGQ_RELOAD_CHECK: the next batch looks at the pointer again
    lifecycle.app.control.add_consumer(settings.classify_queue, destination=["classify@" + _host()], reply=True)
    status = lifecycle.wait(job, timeout_s=300)

    assert (status.done, status.failed) == (len(urls), 0)
    versions = versions_of(lifecycle, job)
    assert versions[0] == old and versions[-1] == done["version"]
    switch = versions.index(done["version"])
    assert set(versions[:switch]) == {old} and set(versions[switch:]) == {done["version"]}  # old, then new
    batch = settings.batch_size
    assert all(len(set(versions[i:i + batch])) == 1 for i in range(0, len(versions), batch))  # never mixed
    epochs = [json.loads(e) for e in lifecycle.store.r.lrange(events_key(next(
        r for r, o in zip(runs, outcomes, strict=True) if o["event"] == "done")), 0, -1)]
    assert [e["event"] for e in epochs] == ["started", "epoch", "done"]


def test_gate_holds_back_a_worse_model_promote_overrides_and_rollback_restores(
        lifecycle: Cluster, image_site: ImageSite) -> None:
    champion = champion_version(lifecycle.settings.model_dir)
    worker = lifecycle.start_worker()
    lifecycle.wait_ready()
    urls = list(image_site.truth)[:16]

    # One epoch is worse than the champion (six): held back as a candidate, with the reason printed.
    proc = imgq("train", "--data", "demo", "--epochs", "1", cluster=lifecycle)
    assert proc.returncode == 0, proc.stderr
    assert "NOT promoted (candidate)" in proc.stdout and "on the same held-out set" in proc.stdout
    candidate = list_versions(lifecycle.settings.model_dir)[-1].version
    assert candidate != champion and champion_version(lifecycle.settings.model_dir) == champion
    job = lifecycle.submit(urls)
    lifecycle.wait(job)
    assert set(versions_of(lifecycle, job)) == {champion}

    listing = json.loads(imgq("models", "list", "--json", cluster=lifecycle).stdout)
    assert [m["version"] for m in listing if m["champion"]] == [champion]
    assert {m["version"] for m in listing} == {champion, candidate}

    assert imgq("models", "promote", candidate, cluster=lifecycle).returncode == 0
    time.sleep(0.5)
    job = lifecycle.submit(urls)
    lifecycle.wait(job)
    assert set(versions_of(lifecycle, job)) == {candidate}  # the worker followed, no restart

    assert imgq("models", "rollback", cluster=lifecycle).returncode == 0
    assert champion_version(lifecycle.settings.model_dir) == champion
    time.sleep(0.5)
    job = lifecycle.submit(urls)
    lifecycle.wait(job)
    assert set(versions_of(lifecycle, job)) == {champion}
    assert worker.proc.poll() is None  # same process throughout

    bad = imgq("models", "promote", "20990101T000000Z-deadbeef", cluster=lifecycle)
    assert bad.returncode == 1 and "no model version" in bad.stderr


@pytest.mark.parametrize("damage", ["truncated", "pickle", "nan"])
def test_a_corrupt_champion_is_refused_and_the_old_model_keeps_serving(
        lifecycle: Cluster, image_site: ImageSite, damage: str) -> None:
    models = lifecycle.settings.model_dir
    good, copy = copy_of_champion(models)
    bad = copy.name
    weights = copy / WEIGHTS_FILE
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "pickle":
        import pickle  # the attack: a pickle where safetensors belongs; it must never be unpickled
        weights.write_bytes(pickle.dumps({"x": 1}))
    else:
        import torch
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(weights))
        first = next(name for name, t in tensors.items() if t.is_floating_point())
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, str(weights))

    worker = lifecycle.start_worker()
    lifecycle.wait_ready()
    Champion(models, lifecycle.store.r).set(bad)
    time.sleep(0.6)
    job = lifecycle.submit(list(image_site.truth)[:32])
    status = lifecycle.wait(job)
    assert (status.done, status.failed) == (32, 0)
    assert set(versions_of(lifecycle, job)) == {good}
    assert f"refused model {bad}" in worker.log_tail(200)


def test_beat_fires_retrains_on_schedule_once_per_tick_even_with_two_beats(lifecycle: Cluster,
                                                                            tmp_path: Path) -> None:
    env = {**os.environ, **lifecycle.settings.to_env(), "IMGQ_RETRAIN_INTERVAL": "1", "IMGQ_RETRAIN_EPOCHS": "1"}
    beats = [subprocess.Popen([sys.executable, "-m", "cli", "beat", "--schedule-file", str(tmp_path / f"s{i}"),
                               "--loglevel", "INFO"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        queue = lifecycle.settings.train_queue
        while lifecycle.store.r.llen(queue) < 3:
            assert time.monotonic() < deadline, "beat sent nothing"
            time.sleep(0.2)
    finally:
        for b in beats:
            b.terminate()
        logs = [b.communicate(timeout=30)[0] for b in beats]
    messages = [json.loads(raw) for raw in lifecycle.store.r.lrange(queue, 0, -1)]
    assert {m["headers"]["task"] for m in messages} == {"imgq.retrain"}
    ticks = lifecycle.store.r.keys(keys.beat_tick("imgq-retrain", 0).removesuffix("0") + "*")
    assert len(messages) == len(ticks)  # one message per tick, not one per beat
    assert any("already fired by another beat" in log for log in logs), logs


def test_a_manifest_with_dead_urls_trains_on_the_rest_and_reports_them(
        lifecycle: Cluster, image_site: ImageSite, tmp_path: Path) -> None:
    rows = [(url, label) for url, label in image_site.truth.items()]
    dead = [image_site.url("gone/nowhere.jpg"), closed_port_url(), image_site.url("bad/page.jpg")]
    manifest = tmp_path / "review.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "label", "confidence"])
        w.writerows([*rows[:30], (dead[0], "circle"), *rows[30:], (dead[1], "star"), (dead[2], "cross")])
    proc = imgq("train", "--data", str(manifest), "--epochs", "2", cluster=lifecycle)
    assert proc.returncode == 0, proc.stderr
    assert "3 training items could not be used" in proc.stdout
    for url, code in zip(dead, ["http_status", "unreachable", "not_an_image"], strict=True):
        assert f"{url}: {code}" in proc.stdout
    newest = list_versions(lifecycle.settings.model_dir)[-1]
    assert newest.metrics["train_size"] + newest.metrics["val_size"] == len(rows)
    assert len(newest.metrics["skipped_files"]) == 3
    # Cached: a second read fetches nothing new (the dead ones are tried again, the rest come from disk).
    assert len(list((lifecycle.settings.model_dir / "cache").glob("*.img"))) == len(rows)


def test_every_version_keeps_a_report_a_person_can_open(lifecycle: Cluster) -> None:
    version = champion_version(lifecycle.settings.model_dir)
    assert version is not None
    directory = version_dir(lifecycle.settings.model_dir, version)
    metrics = json.loads((directory / METRICS_FILE).read_text())
    assert set(metrics["per_class"]) == set(metrics["classes"])
    assert all(0 <= v["precision"] <= 1 and 0 <= v["recall"] <= 1 for v in metrics["per_class"].values())
    n = len(metrics["classes"])
    assert len(metrics["confusion"]) == n and sum(map(sum, metrics["confusion"])) == metrics["val_size"]
    for name in (CURVES_FILE, CONFUSION_FILE):
        with Image.open(directory / name) as img:
            assert img.format == "PNG" and img.width > 300


def test_low_confidence_results_export_as_a_review_manifest(cluster: Cluster, image_site: ImageSite,
                                                            tmp_path: Path) -> None:
    job = cluster.submit(list(image_site.truth))
    cluster.wait(job)
    confidences = sorted(float(str(r["confidence"])) for r in cluster.results(job))
    cut = confidences[len(confidences) // 2]  # about half the items fall below
    out = tmp_path / "review.csv"
    env = {**os.environ, **cluster.settings.to_env()}
    proc = subprocess.run([sys.executable, "-m", "cli", "results", job, "--below", str(cut), "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == sum(c < cut for c in confidences) > 0
    assert all(float(r["confidence"]) < cut for r in rows)
    assert read_manifest(out) == [(r["url"], r["label"]) for r in rows]  # feeds `imgq retrain --data`
