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
from urllib.parse import urlsplit, urlunsplit

from imgq.errors import SettingsError

DEVICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# TIFF is opt-in: its tile/strip headers are a large, rarely needed attack surface.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")


@dataclass(frozen=True)
class TrainDefaults:
    """What a training run uses when nothing says otherwise: `imgq train`/`retrain` flags, the schedule, the
    retrain task and ``RetrainRequest`` all read these (the demo set and the small CNN, at 64x64: CPU
    training in seconds, and torchvision architectures adapt their pooling to it)."""

    source: str = "demo"
    arch: str = "cnn"
    # None: chosen from the data (model.recipe: the images' median short side, 32-64 px).
    input_size: int | None = None
    # model.augment: light never mirrors (digits, text keep their meaning); standard adds flips; none.
    augment: str = "light"


TRAIN_DEFAULTS = TrainDefaults()


def _env(name: str) -> dict[str, Any]:
    return {"env": name}


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default="redis://localhost:6379/0", metadata=_env("IMGQ_REDIS_URL"))
    # Client commands (status, submit, results, ...) give up on a Redis that does not answer within this
    # many seconds, with one line naming it; workers keep riding out a restart for longer (imgq.jobs).
    redis_timeout_s: float = field(default=5.0, metadata=_env("IMGQ_REDIS_TIMEOUT"))
    model_dir: Path = field(default=Path("models"), metadata=_env("IMGQ_MODEL_DIR"))
    # auto = CUDA when torch sees a GPU, else CPU.
    device: str = field(default="auto", metadata=_env("IMGQ_DEVICE"))

    # URLs per Celery message. Small enough that a redelivered batch is cheap, large enough that
    # per-message overhead is noise: each message costs the producer two Redis round trips (1M URLs in half
    # the time of 32) and the worker ~3 ms of Celery and Redis CPU (1.5% of a CNN batch's CPU at 64, 3% at 32).
    batch_size: int = field(default=64, metadata=_env("IMGQ_BATCH_SIZE"))
    # Largest forward pass; the demo CNN at 64x64 is memory-trivial, resnet18 at 224 on CPU is not.
    infer_batch: int = field(default=64, metadata=_env("IMGQ_INFER_BATCH"))
    # How long the batcher waits for more items before running a partial batch.
    infer_wait_ms: float = field(default=5.0, metadata=_env("IMGQ_INFER_WAIT_MS"))
    topk: int = field(default=3, metadata=_env("IMGQ_TOPK"))
    # Celery tasks run concurrently per worker process (thread pool): they overlap fetches.
    concurrency: int = field(default=4, metadata=_env("IMGQ_CONCURRENCY"))
    # Torch intra-op threads. 0 = auto: on CPU half the cores this process may run on (at least 1), so torch
    # and the decode pool don't fight over cores: torch's threads wait for each other at every op, and one
    # preempted thread stalls them all (2 threads on 2 busy cores ran the CNN 2-40x slower than 1).
    # On CUDA, auto is torch's default.
    torch_threads: int = field(default=0, metadata=_env("IMGQ_TORCH_THREADS"))
    # Forward passes run at once per worker process, each with IMGQ_TORCH_THREADS threads. 0 = auto: on CPU
    # enough to cover the cores (2 on 2 cores: a forward-bound resnet18 uses both without the barrier
    # stalls of 2 torch threads); on CUDA 1.
    infer_threads: int = field(default=0, metadata=_env("IMGQ_INFER_THREADS"))
    # glibc malloc arenas per worker process, with freed batch buffers kept for reuse (worker/malloc.py);
    # 0 = glibc's defaults (8 arenas per core, no tuning). 2 kept the worker's RSS flat over 20,000 images
    # (within 1%; +5-6% with the default, up to +5% with 4).
    malloc_arenas: int = field(default=2, metadata=_env("IMGQ_MALLOC_ARENAS"))
    # Decode/preprocess threads per worker process; 0 = auto: one per core this process may run on
    # (Pillow releases the GIL while decoding).
    decode_threads: int = field(default=0, metadata=_env("IMGQ_DECODE_THREADS"))
    # CUDA only (CPU runs ignore these). Mixed precision: auto = bf16 where the GPU has it, else fp16; off.
    amp: str = field(default="auto", metadata=_env("IMGQ_AMP"))
    # torch.compile the model: faster forwards after a compile of seconds per batch shape; off by default.
    compile: bool = field(default=False, metadata=_env("IMGQ_COMPILE"))
    # CPU: serve the model as a frozen TorchScript graph (BatchNorm folded, oneDNN-prepacked weights), checked
    # against the module on a probe batch at load; 0 serves the module as it is.
    optimize: bool = field(default=True, metadata=_env("IMGQ_OPTIMIZE"))
    # Decode JPEGs on the GPU (nvJPEG via torchvision); other formats, and JPEGs it refuses, use Pillow.
    # Off by default: GPU resizing differs from Pillow's by rounding, so labels can differ at the margin.
    gpu_decode: bool = field(default=False, metadata=_env("IMGQ_GPU_DECODE"))
    # Prometheus metrics endpoint of each worker process; 0 = off. `imgq worker --gpus/--processes` gives
    # child i port + i. 9108: next to the exporters' usual 91xx range, unused by common ones.
    metrics_port: int = field(default=9108, metadata=_env("IMGQ_METRICS_PORT"))
    # The address /metrics listens on: all interfaces by default, the exporters' convention (a Prometheus on
    # another host scrapes it); 127.0.0.1 keeps it on the host. An IP address (IPv4 or IPv6).
    metrics_addr: str = field(default="0.0.0.0", metadata=_env("IMGQ_METRICS_ADDR"))

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
    # Extra attempts after a transient failure (connection refused/reset, connect timeout, 408, 429, 502, 503,
    # 504), with jittered back-off or the server's Retry-After, all inside IMGQ_FETCH_TIMEOUT (worker/fetch.py).
    # 2: a blip or a brief overload costs a second or two, not the item; more rarely helps within 15 s.
    fetch_retries: int = field(default=2, metadata=_env("IMGQ_FETCH_RETRIES"))
    # Requests a second to one host from one worker process (retries and redirects included); 0 = no limit.
    # Per process: a deployment sends at most this times its worker processes.
    per_host_rps: float = field(default=0.0, metadata=_env("IMGQ_PER_HOST_RPS"))

    # Delivery. A message not acked within visibility_timeout_s is delivered again by kombu, so this
    # bounds how long a batch held by a dead worker waits (kombu's default is 1 h). It must exceed the
    # task time limit, or live tasks would be redelivered in a loop (celery#5935).
    visibility_timeout_s: float = field(default=300.0, metadata=_env("IMGQ_VISIBILITY_TIMEOUT"))
    # The time bound of one batch, enforced by the pipeline itself (Celery's threads pool enforces no time
    # limit): fetches still running at the batch's fetch deadline end as `timeout`, decodes as `too_complex`.
    task_time_limit_s: float = field(default=240.0, metadata=_env("IMGQ_TASK_TIME_LIMIT"))
    # A live worker holds a lease on each batch it works on and renews it every lease/3 s; a redelivered copy
    # of a leased batch waits for the holder instead of counting as a lost delivery. A dead worker's lease
    # expires after this long. Also the retrain lock's lease (a killed trainer frees it this soon).
    lease_s: float = field(default=30.0, metadata=_env("IMGQ_LEASE"))
    # How often one classify worker (a Redis lock picks it) looks for batches that are nowhere: not queued,
    # not unacked, not leased, yet unfinished (a batch lost between kombu's BRPOP and its unacked record).
    # Such a batch seen in two sweeps in a row is enqueued again from the payload kept in Redis.
    sweep_interval_s: float = field(default=30.0, metadata=_env("IMGQ_SWEEP_INTERVAL"))
    # CPU one image may cost: decoding longer than this ends the item as `too_complex` (its thread runs on).
    decode_timeout_s: float = field(default=10.0, metadata=_env("IMGQ_DECODE_TIMEOUT"))
    # Progressive JPEGs with more scans than this are refused before decoding (`too_complex`): each scan is
    # a pass over the whole image, and a crafted file of a few KB can carry thousands. Cameras and encoders
    # write 1 (baseline) to ~12; libjpeg-turbo's own tools suggest a limit of 500 against this attack.
    max_jpeg_scans: int = field(default=100, metadata=_env("IMGQ_MAX_JPEG_SCANS"))
    # After this many deliveries a batch's unfinished items get worker_lost (a poison item).
    max_deliveries: int = field(default=3, metadata=_env("IMGQ_MAX_DELIVERIES"))
    # Job keys expire: Redis memory stays bounded. 7 days is long enough to fetch results after a weekend.
    job_ttl_s: int = field(default=7 * 24 * 3600, metadata=_env("IMGQ_JOB_TTL"))
    # imgq submit pauses while the classify queue holds this many batches or more.
    max_queue_depth: int = field(default=10_000, metadata=_env("IMGQ_MAX_QUEUE_DEPTH"))
    # Model lifecycle. Workers look for a new champion at most this often, between batches.
    reload_check_s: float = field(default=2.0, metadata=_env("IMGQ_RELOAD_CHECK"))
    # A candidate is promoted if its accuracy + tolerance >= the champion's on the same held-out set.
    promote_tolerance: float = field(default=0.0, metadata=_env("IMGQ_PROMOTE_TOLERANCE"))
    # Scheduled retrain (imgq beat): a 5-field cron expression, or an interval in seconds; "" / 0 = off.
    retrain_cron: str = field(default="", metadata=_env("IMGQ_RETRAIN_CRON"))
    retrain_interval_s: float = field(default=0.0, metadata=_env("IMGQ_RETRAIN_INTERVAL"))
    retrain_data: str = field(default=TRAIN_DEFAULTS.source, metadata=_env("IMGQ_RETRAIN_DATA"))
    retrain_arch: str = field(default=TRAIN_DEFAULTS.arch, metadata=_env("IMGQ_RETRAIN_ARCH"))
    # 0: chosen from the data set's size (model.recipe), with early stopping on the validation split.
    retrain_epochs: int = field(default=0, metadata=_env("IMGQ_RETRAIN_EPOCHS"))
    # Images fetched for manifest training data are cached here (default: MODEL_DIR/cache).
    cache_dir: str = field(default="", metadata=_env("IMGQ_CACHE_DIR"))
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


def redacted_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: what messages and logs may show of IMGQ_REDIS_URL."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _bool(raw: str) -> bool:
    try:
        return _BOOLS[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": _bool,
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
        hint = " (1/0, true/false, yes/no or on/off)" if type_name == "bool" else ""
        raise SettingsError(f"{env_name}={raw!r} is not a valid {type_name}{hint}") from None


def _validate(s: Settings) -> None:
    def fail(field_name: str, why: str) -> None:
        raise SettingsError(f"{s.env_name(field_name)}={getattr(s, field_name)!r}: {why}")

    if s.device not in DEVICES:
        fail("device", f"must be one of {', '.join(DEVICES)}")
    if s.amp not in AMP_CHOICES:
        fail("amp", f"must be one of {', '.join(AMP_CHOICES)}")
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
        fail("redis_url", "must start with redis://, rediss://, unix:// or sentinel:// "
             "(sentinel://host:26379,host2:26379/master_name/db)")
    if s.redis_url.startswith("sentinel://"):
        from imgq.redis_conn import parse_sentinel

        try:
            parse_sentinel(s.redis_url)
        except ValueError as exc:
            fail("redis_url", str(exc))
    positive = ("batch_size", "infer_batch", "topk", "concurrency", "fetch_timeout_s",
                "connect_timeout_s", "max_bytes", "max_pixels", "fetch_concurrency", "per_host_concurrency",
                "visibility_timeout_s", "task_time_limit_s", "max_deliveries", "job_ttl_s", "max_queue_depth",
                "lease_s", "sweep_interval_s", "decode_timeout_s", "max_jpeg_scans", "redis_timeout_s")
    for name in positive:
        if getattr(s, name) <= 0:
            fail(name, "must be > 0")
    if s.retrain_cron and len(s.retrain_cron.split()) != 5:
        fail("retrain_cron", "must be a 5-field cron expression such as '0 3 * * *' (minute hour day month weekday)")
    for name in ("infer_wait_ms", "retrain_epochs",
                 "max_redirects", "torch_threads", "infer_threads", "decode_threads",
                 "malloc_arenas", "reload_check_s", "promote_tolerance", "retrain_interval_s",
                 "fetch_retries", "per_host_rps"):
        if getattr(s, name) < 0:
            fail(name, "must be >= 0")
    if s.max_deliveries > 254:  # imgq.jobs counts deliveries in one saturating byte per batch
        fail("max_deliveries", "must be at most 254")
    if not 0 <= s.metrics_port <= 65535:
        fail("metrics_port", "must be a TCP port (1-65535), or 0 for no metrics endpoint")
    try:
        ipaddress.ip_address(s.metrics_addr)
    except ValueError:
        fail("metrics_addr", "must be an IP address: 0.0.0.0 (all interfaces), 127.0.0.1, :: or ::1")
    if s.task_time_limit_s >= s.visibility_timeout_s:
        fail("task_time_limit_s", f"must be below IMGQ_VISIBILITY_TIMEOUT ({s.visibility_timeout_s:g} s), "
             "or a running batch would be delivered again while it still runs")
    # Every setting that bounds one batch must fit inside the batch bound, which must fit inside the
    # visibility timeout: then a live worker's batch is done before kombu would deliver it again.
    for name in ("fetch_timeout_s", "decode_timeout_s"):
        if getattr(s, name) >= s.task_time_limit_s:
            fail(name, f"must be below IMGQ_TASK_TIME_LIMIT ({s.task_time_limit_s:g} s), the time bound of a batch")
    if s.lease_s >= s.visibility_timeout_s:
        fail("lease_s", f"must be below IMGQ_VISIBILITY_TIMEOUT ({s.visibility_timeout_s:g} s)")
    for net in s.allow_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            fail("allow_networks", f"{net!r} is not a CIDR network such as 127.0.0.0/8 or ::1/128")
    unknown = [f for f in s.image_formats if f not in IMAGE_FORMATS]
    if unknown or not s.image_formats:
        fail("image_formats", f"choose from {', '.join(IMAGE_FORMATS)}")
