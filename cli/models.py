"""`imgq train|retrain|models|demo-data|demo`: the model lifecycle from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.options import add_common, positive_int, settings_from, train_args
from imgq.errors import ExitCode, ImgqError

# `imgq models add`'s flags: (name on the command line, attribute); each is refused with the other actions.
_ADD_ONLY = (("--classes", "classes"), ("--input-size", "input_size"), ("--mean", "mean"), ("--std", "std"),
             ("--promote", "promote"), ("--data", "data"))


class _UsageError(ImgqError):
    exit_code = ExitCode.USAGE


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
    if args.action != "add":
        given = [flag for flag, name in _ADD_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise _UsageError(f"models {args.action}: {given[0]} is for `imgq models add`; see `imgq models -h`")
    if args.action == "add":
        return _add(args, settings)
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


def _add(args: argparse.Namespace, settings: Any) -> int:
    from cli import lifecycle
    from model.preprocess import IMAGENET_MEAN, IMAGENET_STD

    if not args.version:
        raise _UsageError("models add PATH: name the TorchScript (.ts/.pt) or torch.export (.pt2) file; "
                          "see `imgq models -h`")
    if args.classes is None or args.input_size is None:
        raise _UsageError("models add: --classes a,b,c and --input-size N are required; see `imgq models -h`")
    path = Path(args.version)
    if not path.is_file():
        raise ImgqError(f"{path}: no such file; name the saved TorchScript or torch.export archive")
    outcome = lifecycle.add_model(settings, path, classes=args.classes, input_size=args.input_size,
                                  mean=args.mean or IMAGENET_MEAN, std=args.std or IMAGENET_STD,
                                  promote=args.promote, data=args.data)
    print(outcome.version)  # stdout: the version alone, for scripts
    if not args.quiet:
        measured = "" if outcome.accuracy is None else f"accuracy {outcome.accuracy:.4f} on {args.data}; "
        state = "promoted to champion" if outcome.promoted else "NOT promoted (candidate)"
        print(f"imgq: model {outcome.version}: {measured}{state}: {outcome.reason}", file=sys.stderr)
    return 0


def _class_list(raw: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in raw.split(","))
    if len(names) < 2 or not all(names):
        raise argparse.ArgumentTypeError(f"{raw!r}: give at least 2 comma-separated class names, in the order of "
                                         "the model's outputs")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{raw!r}: a class name repeats")
    return names


def _triple(raw: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{raw!r}: give 3 comma-separated numbers (R,G,B), e.g. 0.5,0.5,0.5")
    return values[0], values[1], values[2]


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

    p = sub.add_parser("models", help="the model registry: list, promote VERSION, rollback, add PATH (your own "
                       "TorchScript or torch.export network)")
    p.add_argument("action", choices=("list", "promote", "rollback", "add"))
    p.add_argument("version", nargs="?", metavar="VERSION|PATH", help="promote: the version; add: the archive")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model-dir", type=Path, help="model registry (IMGQ_MODEL_DIR)")
    add = p.add_argument_group("add PATH", "register a torch.jit.save (TorchScript) or torch.export.save (.pt2) "
                               "archive of any nn.Module that maps [N, 3, S, S] images to [N, classes] logits")
    add.add_argument("--classes", type=_class_list, help="the class names, comma-separated, in output order")
    add.add_argument("--input-size", type=positive_int, help="S: the square input the model expects, in pixels")
    add.add_argument("--mean", type=_triple, help="normalisation mean R,G,B of [0, 1] pixels (default ImageNet's)")
    add.add_argument("--std", type=_triple, help="normalisation std R,G,B (default ImageNet's)")
    add.add_argument("--data", type=Path, help="labelled images DIR/<class>/<image>: measure the model there; "
                     "with --promote, promote only if it passes the gate against the champion")
    add.add_argument("--promote", action="store_true", help="make it the champion (through the gate with --data, "
                     "by hand without)")
    add.add_argument("-q", "--quiet", action="store_true", help="stdout only: the version")
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
