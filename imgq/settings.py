"""One typed settings object, read once from ``IMGQ_*`` environment variables.

CLI flags override fields with :meth:`Settings.replace`. A bad value fails at start-up with a
:class:`SettingsError` naming the variable and what it accepts. Every default is explained next to it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgq.errors import SettingsError

DEVICES = ("auto", "cpu", "cuda")
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# TIFF is opt-in: its tile/strip headers are a large, rarely needed attack surface.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")


def _env(name: str) -> dict[str, Any]:
    return {"env": name}


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default="redis://localhost:6379/0", metadata=_env("IMGQ_REDIS_URL"))
    model_dir: Path = field(default=Path("models"), metadata=_env("IMGQ_MODEL_DIR"))
    # auto = CUDA when torch sees a GPU, else CPU.
    device: str = field(default="auto", metadata=_env("IMGQ_DEVICE"))

    # URLs per Celery message. Small enough that a redelivered batch is cheap, large enough that
    # per-message overhead (~1 ms) is noise next to the fetches.
    batch_size: int = field(default=32, metadata=_env("IMGQ_BATCH_SIZE"))
    # Largest forward pass; the demo CNN at 64x64 is memory-trivial, resnet18 at 224 on CPU is not.
    infer_batch: int = field(default=64, metadata=_env("IMGQ_INFER_BATCH"))
    # How long the batcher waits for more items before running a partial batch.
    infer_wait_ms: float = field(default=5.0, metadata=_env("IMGQ_INFER_WAIT_MS"))
    topk: int = field(default=3, metadata=_env("IMGQ_TOPK"))
    # Celery tasks run concurrently per worker process (thread pool): they overlap fetches.
    concurrency: int = field(default=4, metadata=_env("IMGQ_CONCURRENCY"))
    # Torch intra-op threads; 0 = torch's default (all cores).
    torch_threads: int = field(default=0, metadata=_env("IMGQ_TORCH_THREADS"))

    # Fetching. A whole fetch (connect, redirects, body) must finish within fetch_timeout_s: a 1-byte
    # trickle would otherwise hold a slot forever (aiohttp's socket-read timeout is unbounded by default).
    fetch_timeout_s: float = field(default=15.0, metadata=_env("IMGQ_FETCH_TIMEOUT"))
    connect_timeout_s: float = field(default=5.0, metadata=_env("IMGQ_CONNECT_TIMEOUT"))
    # 20 MiB covers any photo a classifier needs; aiohttp has no read cap of its own.
    max_bytes: int = field(default=20 * 1024 * 1024, metadata=_env("IMGQ_MAX_BYTES"))
    # 50 MP: a 8K x 6K photo. Pillow's own bomb guard is at ~89 MP; we refuse before allocating.
    max_pixels: int = field(default=50_000_000, metadata=_env("IMGQ_MAX_PIXELS"))
    max_redirects: int = field(default=3, metadata=_env("IMGQ_MAX_REDIRECTS"))
    fetch_concurrency: int = field(default=64, metadata=_env("IMGQ_FETCH_CONCURRENCY"))
    per_host_concurrency: int = field(default=16, metadata=_env("IMGQ_PER_HOST_CONCURRENCY"))
    # Networks that are blocked by default (private, loopback, ...) but allowed here, e.g. "127.0.0.0/8".
    allow_networks: tuple[str, ...] = field(default=(), metadata=_env("IMGQ_ALLOW_NETWORKS"))
    image_formats: tuple[str, ...] = field(default=DEFAULT_IMAGE_FORMATS, metadata=_env("IMGQ_IMAGE_FORMATS"))
    user_agent: str = field(default="imgq/0.1", metadata=_env("IMGQ_USER_AGENT"))

    # Delivery. A message not acked within visibility_timeout_s is delivered again by kombu, so this
    # bounds how long a batch held by a dead worker waits (kombu's default is 1 h). It must exceed the
    # task time limit, or live tasks would be redelivered in a loop (celery#5935).
    visibility_timeout_s: float = field(default=300.0, metadata=_env("IMGQ_VISIBILITY_TIMEOUT"))
    task_time_limit_s: float = field(default=240.0, metadata=_env("IMGQ_TASK_TIME_LIMIT"))
    # After this many deliveries a batch's unfinished items get worker_lost (a poison item).
    max_deliveries: int = field(default=3, metadata=_env("IMGQ_MAX_DELIVERIES"))
    # Job keys expire: Redis memory stays bounded. 7 days is long enough to fetch results after a weekend.
    job_ttl_s: int = field(default=7 * 24 * 3600, metadata=_env("IMGQ_JOB_TTL"))
    # imgq submit pauses while the classify queue holds more messages than this.
    max_queue_depth: int = field(default=10_000, metadata=_env("IMGQ_MAX_QUEUE_DEPTH"))
    classify_queue: str = field(default="imgq.classify", metadata=_env("IMGQ_CLASSIFY_QUEUE"))
    train_queue: str = field(default="imgq.train", metadata=_env("IMGQ_TRAIN_QUEUE"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name in env and env[name] != "":
                values[f.name] = _parse(f.name, name, env[name])
        return cls(**values)

    def replace(self, **overrides: Any) -> Settings:
        """Apply CLI overrides; ``None`` means "flag not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given)

    def __post_init__(self) -> None:
        _validate(self)

    def env_name(self, field_name: str) -> str:
        return str(next(f for f in dataclasses.fields(self) if f.name == field_name).metadata["env"])

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = ",".join(value) if isinstance(value, tuple) else str(value)
        return out


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "Path": Path,
    "tuple[str, ...]": _csv,
}


def _parse(field_name: str, env_name: str, raw: str) -> Any:
    type_name = str(Settings.__dataclass_fields__[field_name].type)
    try:
        return _PARSERS[type_name](raw)
    except ValueError:
        raise SettingsError(f"{env_name}={raw!r} is not a valid {type_name}") from None


def _validate(s: Settings) -> None:
    def fail(field_name: str, why: str) -> None:
        raise SettingsError(f"{s.env_name(field_name)}={getattr(s, field_name)!r}: {why}")

    if s.device not in DEVICES:
        fail("device", f"must be one of {', '.join(DEVICES)}")
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        fail("redis_url", "must start with redis://, rediss:// or unix://")
    positive = ("batch_size", "infer_batch", "topk", "concurrency", "fetch_timeout_s", "connect_timeout_s",
                "max_bytes", "max_pixels", "fetch_concurrency", "per_host_concurrency",
                "visibility_timeout_s", "task_time_limit_s", "max_deliveries", "job_ttl_s", "max_queue_depth")
    for name in positive:
        if getattr(s, name) <= 0:
            fail(name, "must be > 0")
    for name in ("infer_wait_ms", "max_redirects", "torch_threads"):
        if getattr(s, name) < 0:
            fail(name, "must be >= 0")
    if s.task_time_limit_s >= s.visibility_timeout_s:
        fail("task_time_limit_s", f"must be below IMGQ_VISIBILITY_TIMEOUT ({s.visibility_timeout_s:g} s), "
             "or a running batch would be delivered again while it still runs")
    for net in s.allow_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            fail("allow_networks", f"{net!r} is not a CIDR network such as 127.0.0.0/8 or ::1/128")
    unknown = [f for f in s.image_formats if f not in IMAGE_FORMATS]
    if unknown or not s.image_formats:
        fail("image_formats", f"choose from {', '.join(IMAGE_FORMATS)}")
