"""The worker's Celery app: `celery -A worker.app ...` and `imgq worker` both use it.

The app itself (delivery settings, task names, routes) is :func:`imgq.celery_app.create_app`, which producers
use too; this module builds it from the environment at import and connects the worker-side signals.

Start-up (issue 12, class 2): a classify worker builds its serving engine (device, model, fetcher) in
``worker_init``, before the consumer starts, so a worker that cannot serve exits before it takes a batch:
one stderr line that says why and what to run, and exit code :data:`EXIT_REFUSED` (configuration:
restarting would not help; the ``--gpus``/``--processes`` supervisor does not restart it). A Redis that
cannot be reached or refuses a write at start-up is not configuration: exit :data:`EXIT_RETRY`, to be
restarted.

Stopping (class 9): a worker exits 0 only when asked to stop (SIGTERM/SIGINT/SIGQUIT, recorded by
``worker_shutting_down``). When Celery stops on its own, e.g. kombu's acknowledgement refused by a Redis
at maxmemory ("Unrecoverable error: OutOfMemoryError"), `imgq worker` exits non-zero
(:func:`stop_was_requested`) so a restart policy or the supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from typing import Any, NoReturn

import redis
from celery import Celery, signals
from celery.exceptions import CPendingDeprecationWarning

from imgq.celery_app import CLASSIFY_TASK, RETRAIN_TASK, create_app
from imgq.celery_app import app_settings as _app_settings
from imgq.errors import ExitCode, ModelNotFoundError
from imgq.settings import Settings
from worker import metrics

__all__ = ["CLASSIFY_TASK", "EXIT_REFUSED", "EXIT_RETRY", "RETRAIN_TASK", "app", "app_settings", "create_app"]

# Exit codes of a worker that stops on its own. EXIT_REFUSED: it cannot serve as configured (no model, bad
# model, device missing); restarting would not help. EXIT_RETRY: a transient failure; restart it.
EXIT_REFUSED = ExitCode.REFUSED
EXIT_RETRY = ExitCode.FAILED

log = logging.getLogger(__name__)


app = create_app(Settings.from_env())


def app_settings(celery_app: Celery = app) -> Settings:
    return _app_settings(celery_app)


def _serves_classify(sender: Any) -> bool:
    """False for a trainer (`-Q imgq.train`): it needs no model to start and loads none."""
    amqp = getattr(getattr(sender, "app", None), "amqp", None)
    if amqp is None:
        return True
    names = set(amqp.queues.consume_from or amqp.queues)
    return not names or app_settings().classify_queue in names


def _pool_name(sender: Any) -> str:
    """The pool this worker runs ("threads", "solo", "prefork", ...): the CLI's -P, else the app's setting."""
    pool = getattr(sender, "pool_cls", None) or app.conf.worker_pool
    if isinstance(pool, str):
        return pool
    module = str(getattr(pool, "__module__", ""))  # celery.concurrency.thread / .solo / .prefork
    return "threads" if module.endswith(".thread") else module.rsplit(".", 1)[-1]


def refuse(why: str, *, code: int = EXIT_REFUSED) -> NoReturn:
    """Stop a worker at start-up with one stderr line. Celery swallows exceptions from signal handlers, so
    this is the only way a worker_init handler can keep the worker from consuming."""
    print(f"imgq worker: {why}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(code)


@signals.worker_init.connect
def _refuse_without_model(sender: Any = None, **_: Any) -> None:
    # Checked on disk only: worker_init runs in the parent of a prefork pool, where CUDA must stay untouched.
    from model.pointer import require_champion

    settings = app_settings()
    if _serves_classify(sender):
        try:
            require_champion(settings.model_dir, settings.env_name("model_dir"))
        except ModelNotFoundError as exc:
            refuse(str(exc))


@signals.worker_init.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    metrics.start_server(app_settings(), node=str(getattr(sender, "hostname", "")))


@signals.worker_init.connect
def _build_engine(sender: Any = None, **_: Any) -> None:
    # In the threads/solo pool this process serves tasks: build the engine (device, model) now, before the
    # consumer starts, so a worker that cannot serve never takes a batch. A prefork pool builds one per child.
    if _pool_name(sender) not in ("threads", "solo") or not _serves_classify(sender):
        return
    from worker.serving import get_serving

    settings = app_settings()
    # Warnings raised while probing the device (torch's "CUDA initialization: ..." on a host without a GPU)
    # are kept back: if the engine fails, the one line below says it all; if it works, they are logged.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            engine = get_serving(settings)
        except redis.RedisError as exc:
            refuse(f"Redis failed at start-up ({type(exc).__name__}: {exc}); exiting {EXIT_RETRY} to be "
                   "restarted", code=EXIT_RETRY)
        except Exception as exc:  # anything the engine raises means this worker cannot serve
            hint = _what_to_run(settings.device, exc)
            refuse(f"cannot serve: {_why(exc)}" + (f"; {hint}" if hint else ""))
    for w in caught:
        log.warning("%s: %s", w.category.__name__, w.message)
    metrics.set_model(engine.model.version, engine.device)
    _serving[:] = [engine.model.version, str(engine.device)]


# What _build_engine loaded (model version, device), for the log once Celery has set logging up.
_serving: list[str] = []


@signals.worker_ready.connect
def _quiet_the_cancel_warning(**_: Any) -> None:
    # Celery warns on every connection loss that worker_cancel_long_running_tasks_on_connection_loss will default
    # to True in 6.0; imgq sets it to False on purpose (imgq.celery_app says why). Added once Celery's logging
    # set-up has put its own 'always' filter for the category in front.
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced an optional breaking change",
                            category=CPendingDeprecationWarning)


@signals.worker_ready.connect
def _say_serving(sender: Any = None, **_: Any) -> None:
    # The engine was built before Celery set up its logging: say once, in the worker's log, what it serves.
    if _serving:
        log.info("serving model %s on %s", *_serving)
    if metrics.address():
        log.info("metrics on %s", metrics.address())
    metrics.set_ready(True)


def _why(exc: BaseException) -> str:
    from imgq.errors import ImgqError

    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message looked like
    return text if isinstance(exc, ImgqError) else f"{type(exc).__name__}: {text}"


def _what_to_run(device: str, exc: BaseException) -> str:
    from imgq.errors import SettingsError

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and device == "cuda":  # a --gpus child, or a GPU container
        return (f"this is a GPU worker (CUDA_VISIBLE_DEVICES={visible}, e.g. from --gpus): on a host without a "
                "usable GPU run CPU workers instead: imgq worker --processes N")
    if isinstance(exc, SettingsError):
        return "" if "; " in str(exc) else "fix the setting it names"  # the engine's message says what to use
    if device != "cpu" and "cuda" in str(exc).lower():
        return "run with --device cpu or auto (IMGQ_DEVICE)"
    return (f"fix or replace the champion model in {app_settings().model_dir} (imgq models list, then "
            "imgq models rollback or promote another version, or imgq train --data demo)")


# Set when the worker is asked to stop (SIGTERM, SIGINT, SIGQUIT): any other stop is a failure.
_stop_requested = threading.Event()


@signals.worker_shutting_down.connect
def _record_stop_request(**_: Any) -> None:
    _stop_requested.set()
    metrics.set_ready(False)


def stop_was_requested() -> bool:
    """Whether this process's worker was asked to stop, rather than stopping on its own."""
    from celery.worker import state

    # Identity, as Celery tests them: a warm shutdown sets should_stop to its exit code, 0.
    return _stop_requested.is_set() or any(flag is not None and flag is not False
                                           for flag in (state.should_stop, state.should_terminate))


@signals.task_prerun.connect
def _observe_queue_wait(task: Any = None, **_: Any) -> None:
    metrics.observe_queue_wait(task.name, task.request)


@signals.worker_process_init.connect
def _warm_up_child(**_: Any) -> None:
    from worker.serving import get_serving

    get_serving(app_settings())


@signals.worker_shutdown.connect
def _close_serving(**_: Any) -> None:
    from worker.serving import close_serving

    close_serving()
