"""Every Redis client imgq opens comes from :func:`connect`, so one URL works for a single Redis and for a
Sentinel-managed one alike.

    redis://[:password@]host:port/db            one Redis (also rediss://, unix://)
    sentinel://[:password@]host:port[,host:port...]/master/db
                                                Redis Sentinel: the sentinels to ask, the master's name,
                                                the database; the password is the master's (and replicas')

With Sentinel, redis-py's client asks the sentinels for the current master on every new connection, so after
a failover the next reconnect (the workers' and the producer's retries) reaches the new master; kombu does
the same for the broker (:func:`broker_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SCHEME = "sentinel://"


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None


def parse_sentinel(url: str) -> SentinelURL:
    """``ValueError`` saying what is wrong for a malformed sentinel:// URL."""
    if not url.startswith(SCHEME):
        raise ValueError(f"not a {SCHEME} URL")
    rest = url[len(SCHEME):]
    password: str | None = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[1]) if ":" in auth else unquote(auth)
        password = password or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError("use sentinel://host:port[,host:port...]/master_name[/db]")
    sentinels = []
    for host in hosts.split(","):
        split = urlsplit(f"//{host}")
        if not split.hostname:
            raise ValueError(f"{host!r} is not host:port")
        sentinels.append((split.hostname, split.port or 26379))
    db = int(parts[1]) if len(parts) > 1 else 0
    return SentinelURL(tuple(sentinels), parts[0], db, password)


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for ``url``; ``options`` are redis-py connection options (timeouts, retries)."""
    if not url.startswith(SCHEME):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel(url)
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=timeouts, **options)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.master, db=target.db, password=target.password, **options)
    return client


def broker_options(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options kombu needs for ``url``: kombu names each sentinel in a
    ``;``-separated list and takes the master's name as the ``master_name`` transport option."""
    if not url.startswith(SCHEME):
        return url, {}
    target = parse_sentinel(url)
    auth = f":{target.password}@" if target.password else ""
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels)
    return broker, {"master_name": target.master}
