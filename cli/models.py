"""`imgq train|retrain|models|demo-data|demo`: the model lifecycle from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.options import add_common, positive_int, settings_from, train_args
from imgq.errors import ImgqError


def _retrain_request(args: argparse.Namespace) -> Any:
    from model.net import ARCHITECTURES
    from model.retrain import RetrainRequest

    if args.arch not in ARCHITECTURES:
        raise ImgqError(f"--arch {args.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return RetrainRequest(source=args.data, arch=args.arch, epochs=args.epochs,
                          init=str(args.init) if args.init else None, seed=args.seed, input_size=args.input_size,
                          augment=args.augment)


def cmd_train(args: argparse.Namespace) -> int:
    from cli.lifecycle import train_locally

    settings = settings_from(args)
    if args.out:
        settings = settings.replace(model_dir=args.out)
    outcome = train_locally(settings, _retrain_request(args))
    return 0 if outcome["event"] == "done" else 1


def cmd_retrain(args: argparse.Namespace) -> int:
    from cli.lifecycle import follow_retrain, no_trainer, trainer_consuming, trigger_retrain
    from imgq.celery_app import create_app

    settings = settings_from(args)
    request = _retrain_request(args)
    app = create_app(settings)
    try:
        run_id = trigger_retrain(app, settings, request)
        if args.wait:
            outcome = follow_retrain(settings, run_id, app=app)
            print(run_id)
            return 0 if outcome["event"] == "done" else 1
        if not args.quiet and not trainer_consuming(app, settings.train_queue):
            print(f"imgq: warning: {no_trainer(settings.train_queue, run_id)}", file=sys.stderr)
    finally:
        app.close()
    print(run_id)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cli import lifecycle

    settings = settings_from(args)
    if args.action == "list":
        lifecycle.print_models(lifecycle.list_models(settings), args.json)
    elif args.action == "promote":
        if not args.version:
            raise ImgqError("imgq models promote VERSION: name the version (see `imgq models list`)")
        lifecycle.promote(settings, args.version)
        print(f"champion is now {args.version}")
    else:
        print(f"rolled back: champion is now {lifecycle.rollback(settings)}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from model.demo_data import write_imagefolder

    files = write_imagefolder(args.out_dir, split=args.split, n_per_class=args.per_class)
    print(f"wrote {len(files)} images to {args.out_dir} (ImageFolder: <class>/<image>)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    accuracy = run_demo(settings_from(args), sys.stdout, per_class=args.per_class)
    return 0 if accuracy >= args.min_accuracy else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.evaluate import HTML_FILE, evaluate

    settings = settings_from(args)
    result = evaluate(args.data, settings.model_dir, args.model, out=args.out, device=settings.device)
    print(result.describe())
    print(f"report: {args.out / HTML_FILE} (and evaluation.json)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train here; promote the model if it passes the gate")
    train_args(p)
    p.add_argument("--out", type=Path, help="model dir (default IMGQ_MODEL_DIR)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("retrain", help="send a retrain to the trainer worker (train queue)")
    train_args(p)
    p.add_argument("--wait", action="store_true", help="show per-epoch progress and the outcome")
    p.add_argument("-q", "--quiet", action="store_true", help="no warning when no trainer is up")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("models", help="the model registry: list, promote VERSION, rollback")
    p.add_argument("action", choices=("list", "promote", "rollback"))
    p.add_argument("version", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model-dir", type=Path, help="model registry (IMGQ_MODEL_DIR)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo-data", help="write the built-in demo data set as an ImageFolder")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--split", choices=("train", "val", "test"), default="train")
    p.add_argument("--per-class", type=positive_int, default=100)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="train if needed, serve held-out demo images, classify them, score")
    p.add_argument("--per-class", type=positive_int, default=20)
    p.add_argument("--min-accuracy", type=float, default=0.9, help="exit 1 below this accuracy")
    add_common(p, model=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="score a model on a labelled ImageFolder: accuracy, per-class precision "
                       "and recall, confusion matrix, the misclassified images (HTML)")
    p.add_argument("--data", type=Path, required=True, help="labelled images: DIR/<class>/<image>")
    p.add_argument("--model", metavar="VERSION", help="version to score (default: the champion; imgq models list)")
    p.add_argument("-o", "--out", type=Path, default=Path("evaluation"),
                   help="report directory: evaluation.html and evaluation.json (default ./evaluation)")
    add_common(p, model=True)
    p.set_defaults(func=cmd_evaluate)
