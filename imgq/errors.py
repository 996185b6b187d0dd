"""The error vocabulary a user can see.

Every submitted URL ends with exactly one result: a label, or an error with one of these codes and a
human-readable message. The codes are a stable contract (README, "Error codes"); add new ones sparingly.

    invalid_url      the URL is not an absolute http(s) URL, carries credentials, or has a bad host/port
    blocked_address  the host resolves to a private/loopback/link-local/reserved address (see IMGQ_ALLOW_NETWORKS)
    unreachable      DNS failure, connection refused/reset, TLS failure
    http_status      the server answered with a non-2xx status (the message names it)
    timeout          the whole fetch (connect, redirects, body) did not finish within IMGQ_FETCH_TIMEOUT
    too_large        the body exceeds IMGQ_MAX_BYTES, or the image exceeds IMGQ_MAX_PIXELS
    not_an_image     the bytes are not one of the allowed image formats (by magic bytes, not Content-Type)
    decode_error     an allowed format, but truncated or corrupt
    too_complex      decoding would cost more CPU than one image may (IMGQ_MAX_JPEG_SCANS, IMGQ_DECODE_TIMEOUT)
    worker_lost      the batch was delivered IMGQ_MAX_DELIVERIES times and each time its worker stopped renewing its
                     lease before finishing (it died, hung or lost Redis)
    internal         an unexpected bug in imgq; the message carries the exception
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_URL = "invalid_url"
    BLOCKED_ADDRESS = "blocked_address"
    UNREACHABLE = "unreachable"
    HTTP_STATUS = "http_status"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    DECODE_ERROR = "decode_error"
    TOO_COMPLEX = "too_complex"
    WORKER_LOST = "worker_lost"
    INTERNAL = "internal"


class ExitCode(IntEnum):
    """Exit codes of every `imgq` command and worker process (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # the operation failed (one line on stderr says why); a worker that stopped on its own
    USAGE = 2  # a wrong invocation (argparse)
    REFUSED = 3  # a worker that cannot serve as configured (device, model): restarting would not help
    INTERRUPTED = 130  # Ctrl-C or SIGTERM
    # The reader of stdout went away (`imgq results JOB | head`): silent, and the status a shell reports for a
    # tool killed by SIGPIPE (128 + 13), as `cat`, `grep` or `seq` give; Python would otherwise print a
    # BrokenPipeError traceback.
    PIPE_CLOSED = 141


class ItemError(Exception):
    """One item failed; the batch goes on. Carries the user-visible code and message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message}


class ImgqError(Exception):
    """A whole-operation failure (bad settings, no model, Redis refused a write): shown to the user as one line
    (`imgq: <what failed>; <what to do>`) and exit 1."""

    exit_code: ExitCode = ExitCode.FAILED


class Interrupted(ImgqError):
    """Ctrl-C or SIGTERM stopped a command after it kept what was done; the message says what and how to go on."""

    exit_code = ExitCode.INTERRUPTED


class SettingsError(ImgqError):
    """A setting has a bad value; the message names the variable and the valid choices."""


class ModelNotFoundError(ImgqError):
    """No usable model in IMGQ_MODEL_DIR."""
