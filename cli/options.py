"""Options and helpers every `imgq` command shares: settings from IMGQ_* plus flags, the job store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from imgq.errors import ExitCode, ImgqError
from imgq.jobs import RECORD_FIELDS, JobStore
from imgq.settings import DEVICES, TRAIN_DEFAULTS, Settings

if TYPE_CHECKING:
    from producer.sources import Columns


def settings_from(args: argparse.Namespace) -> Settings:
    allow = tuple(getattr(args, "allow_network", None) or ())
    base = Settings.from_env()
    return base.replace(
        model_dir=getattr(args, "model_dir", None),
        device=getattr(args, "device", None),
        batch_size=getattr(args, "batch_size", None),
        concurrency=getattr(args, "concurrency", None),
        allow_networks=tuple(sorted({*base.allow_networks, *allow})) if allow else None,
    )


def store_for(settings: Settings) -> JobStore:
    """A client's job store: it gives up within IMGQ_REDIS_TIMEOUT on a Redis that does not answer."""
    return JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s, timeout_s=settings.redis_timeout_s)


def positive_int(raw: str) -> int:
    """An argparse type: a usage error (exit 2) names the flag, rather than a setting it overrides."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return value


def quiet_args(p: argparse.ArgumentParser, *, progress: bool = False) -> None:
    """-q everywhere; --progress where there is a wait to show (drawn by default on a terminal only)."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no notes on stderr (errors still)")
    if progress:
        p.add_argument("--progress", action="store_true",
                       help="show progress on stderr even when it is not a terminal (a line every 2 s)")


def progress_from(args: argparse.Namespace) -> bool | None:
    """None: on a terminal only; True: asked for; False: -q."""
    if args.quiet:
        return False
    return True if getattr(args, "progress", False) else None


def add_common(p: argparse.ArgumentParser, *, model: bool = False, fetch: bool = False) -> None:
    if model:
        p.add_argument("--model-dir", type=Path, help="model registry (IMGQ_MODEL_DIR)")
        p.add_argument("--device", choices=DEVICES, help="inference device (IMGQ_DEVICE)")
    if fetch:
        p.add_argument("--allow-network", action="append", metavar="CIDR",
                       help="allow fetching from this blocked network, e.g. 127.0.0.0/8 (IMGQ_ALLOW_NETWORKS)")


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=TRAIN_DEFAULTS.source,
                   help="`demo`, an ImageFolder directory (root/<class>/<image>) or a url,label manifest (.csv/.jsonl)")
    p.add_argument("--arch", default=TRAIN_DEFAULTS.arch,
                   help="cnn (default), resnet18, mobilenet_v3_small, efficientnet_b0")
    p.add_argument("--epochs", type=positive_int, help="at most this many epochs (early stopping may end sooner)")
    p.add_argument("--init", type=Path, help="start from this local safetensors weights file")
    p.add_argument("--input-size", type=positive_int, default=TRAIN_DEFAULTS.input_size,
                   help="training and serving image size (default: from the images: median short side, 32-64 px)")
    # The choices spelled here, not imported from model.augment: the CLI's parser must not import torch.
    p.add_argument("--augment", choices=("none", "light", "standard"), default=TRAIN_DEFAULTS.augment,
                   help="light (default) never mirrors: digits, text; standard adds flips: photos, textures, faces, "
                        "objects; none")
    p.add_argument("--seed", type=int, default=0)


class UsageError(ImgqError):
    """A wrong invocation found past argparse (a flag that does not fit the input): one line, exit 2."""

    exit_code = ExitCode.USAGE


def keep_columns(raw: str) -> tuple[str, ...]:
    """An argparse type for --keep COL[,COL...]: a column named like one of the record's own fields would
    overwrite it, so it is refused (exit 2), listing those names."""
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("name at least one column, e.g. --keep id or --keep id,source")
    clash = [n for n in names if n in RECORD_FIELDS]
    if clash:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, clash))} is a field of the result record itself ({', '.join(RECORD_FIELDS)}); "
            "rename that column in the table to keep it")
    return names


def table_args(p: argparse.ArgumentParser) -> None:
    """--url-column and --keep, for commands that read a job's input."""
    p.add_argument("--url-column", metavar="NAME", help="a table's URL column (default: url)")
    p.add_argument("--keep", type=keep_columns, metavar="COL[,COL...]",
                   help="a table's columns to copy into each result record (e.g. an id to join the results on)")


def columns_from(args: argparse.Namespace) -> Columns | None:
    """The table columns the flags name; None for a URL list, where the flags have no meaning (exit 2)."""
    from producer.sources import TABLE_SUFFIXES, Columns, is_table

    url_column, keep = getattr(args, "url_column", None), getattr(args, "keep", None)
    if not is_table(args.urls):
        if url_column is not None or keep:
            flag = "--url-column" if url_column is not None else "--keep"
            raise UsageError(f"{flag} needs a table ({', '.join(TABLE_SUFFIXES)}), and {args.urls} is read as a URL "
                             "list (one URL a line); see `imgq -h`")
        return None
    return Columns(url=url_column or "url", keep=keep or ())


def output_args(p: argparse.ArgumentParser, *, formats: tuple[str, ...] = ("jsonl", "csv"),
                default: str | None = "jsonl") -> None:
    """``default`` None: the format comes from -o's extension (producer.export.format_for)."""
    p.add_argument("-o", "--output", type=Path, help="results file (default: stdout)")
    p.add_argument("--format", choices=formats, default=default,
                   help=None if default else "default: from -o's extension (.csv, .parquet), else jsonl")
