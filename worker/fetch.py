"""Fetch image bytes for user-supplied URLs, safely: the first stage after a batch is unpacked.

One :class:`Fetcher` per worker process holds one ``aiohttp.ClientSession`` (keep-alive pooling, at most
``fetch_concurrency`` connections, ``per_host_concurrency`` per host). Every fetch:

* validates the URL before any I/O (:func:`worker.urlcheck.validate_url` -> ``invalid_url``);
* checks the address it connects to (:mod:`worker.netguard` -> ``blocked_address``): IP-literal hosts here,
  names in the guarded resolver, which hands aiohttp only the addresses it checked;
* follows at most ``max_redirects`` redirects by hand, validating and checking every hop. One more redirect
  than allowed is ``http_status`` ("too many redirects"): the server's final answer was a 3xx;
* runs under one deadline, ``fetch_timeout_s``, covering connect, redirects and body (``timeout``), so a
  1-byte-per-second trickle ends there. Waiting for a free connection slot happens *before* the deadline
  starts, so a long batch does not time out items that never got a turn;
* ends, in :meth:`Fetcher.fetch_many`, by the batch's deadline when one is given: a URL still waiting for a
  slot or still downloading then is cancelled (``timeout``, naming IMGQ_TASK_TIME_LIMIT and which it was);
* streams the body and stops at ``max_bytes`` (``too_large``); a ``Content-Length`` above the cap fails before
  reading. Memory stays at most ``max_bytes`` plus one chunk per fetch.

Compression: we ask for ``Accept-Encoding: identity`` (images are already compressed) and turn aiohttp's
auto-decompression off. A server that sends gzip/deflate anyway is inflated here with ``zlib``'s
``max_length`` so the *decompressed* size counts against ``max_bytes`` chunk by chunk: a gzip bomb stops at the
cap. Any other encoding (br, zstd, stacked encodings) is refused as ``decode_error`` rather than trusting a
decoder without an output bound.

Connection-level failures (DNS, refused, reset, TLS, no connection within ``connect_timeout_s``, a body cut off
mid-way, a malformed response) are ``unreachable``.

Retries (``fetch_retries`` extra attempts, ``IMGQ_FETCH_RETRIES``) are for what may go another way when asked
again: connection refused or reset, no connection within the connect timeout, a body cut off, a DNS answer of
"try again", and HTTP 408, 429, 502, 503, 504. Never other statuses (a 404 or 500 is the same next time), nor
anything refused here (``invalid_url``, ``blocked_address``, ``too_large``, ``decode_error``), nor a fetch that
timed out (its budget is spent). Each retry waits first: the server's ``Retry-After`` (seconds or an HTTP-date)
plus a little jitter when it sent one, else a full-jitter exponential back-off (uniform in 0..min(cap,
base * 2^(n-1)) before retry n). All attempts and waits of one URL share its one ``fetch_timeout_s`` budget
and the batch's deadline: a retry starts only if, after its wait, twice as long as the failed attempt took
(and at least 0.25 s) is left. Otherwise the item ends with its last error, and the message says how many
attempts were made and why no other was (a ``Retry-After`` past the budget, say). A URL keeps its connection
slots while it backs off, so retries never make one URL hold a slot longer than ``fetch_timeout_s``. An
attempt is one request sent by imgq; aiohttp itself resends a GET once, at once, when a connection closes
before any answer (RFC 9112 9.3.1), inside that attempt. A first attempt's failure that is not transient keeps
its plain message ("HTTP 404 Not Found"); every other failure says "after N attempts" and why it stopped.

``per_host_rps`` (``IMGQ_PER_HOST_RPS``, 0 = off) paces requests to each host (by name, any port) in this
process: request k goes no earlier than ``1/per_host_rps`` after request k-1, retries and redirect hops
included (a token bucket of one token: no bursts). A URL waits for its first turn before its own deadline
starts, as for a connection slot; a turn that would come after the batch's deadline is not taken.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import socket
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType

import aiohttp
import yarl

from imgq.errors import ErrorCode, ItemError
from imgq.settings import Settings
from worker import metrics
from worker.netguard import (
    BlockedAddressError,
    GuardedResolver,
    blocked_message,
    is_blocked,
    parse_allow,
    parse_ip_host,
)
from worker.urlcheck import validate_url

log = logging.getLogger(__name__)

# Read granularity: large enough for few syscalls on a fast link, small next to max_bytes.
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Answers that say "not now" rather than "no": request timeout, rate limited, and a gateway or an overloaded
# server. 500 is left out: it is usually the same bug next time.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# Full-jitter back-off: retry n waits uniform(0, min(CAP, BASE * 2^(n-1))) s. With the defaults (2 retries,
# IMGQ_FETCH_TIMEOUT 15 s) a URL waits 0.75 s on average in all: enough for a restart or a connection blip,
# and the jitter spreads a batch's retries to one host instead of sending them back together.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
# A retry starts only with this much of the budget left after its wait: twice what the failed attempt took (a
# loaded host or server answers slower the second time), and never less than MIN_ATTEMPT_S.
ATTEMPT_ALLOWANCE = 2.0
MIN_ATTEMPT_S = 0.25
# Idle keep-alive connections are kept this long (aiohttp's default, named): a worker fetches in bursts of a
# batch, and most servers keep an idle connection open 5-60 s.
KEEPALIVE_S = 15.0
# Checked resolver answers are reused this long (aiohttp's default, named); the guard ran on each of them.
DNS_CACHE_S = 10
# Hosts whose IP-literal check passed, remembered at most (a batch names a few hosts; parsing costs ~5 us).
_PASSED_HOSTS = 4096
# Paced hosts remembered at most; when full, entries whose next turn has passed (they carry nothing) are dropped.
_PACER_HOSTS = 4096
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?", re.ASCII)


class _Retryable(ItemError):
    """An attempt failed in a way the next attempt may not: the error the item ends with if none follows."""

    def __init__(self, code: ErrorCode, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(code, message)
        self.reason = reason  # the metric label: http_503, connect, reset, ...
        self.retry_after = retry_after


def _renamed(exc: ItemError, message: str) -> ItemError:
    """``exc`` with a new message, still retryable if it was."""
    if isinstance(exc, _Retryable):
        return _Retryable(exc.code, message, reason=exc.reason, retry_after=exc.retry_after)
    return ItemError(exc.code, message)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 10.2.3: delta-seconds or an HTTP-date), or None
    when there is none or it cannot be read (the back-off is used then). A date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):  # a fraction is not in the RFC, but harmless to honour
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_bound_s(retry: int) -> float:
    """The longest full-jitter wait before retry ``retry`` (1 for the first) when the server gave no Retry-After."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (retry - 1))


class HostPacer:
    """At most ``rps`` requests a second to each host: turn k of a host comes ``1/rps`` after turn k-1.

    Turns are reserved in order (a reservation cannot be overtaken), on the event loop's clock.
    """

    def __init__(self, rps: float) -> None:
        self._interval = 1.0 / rps
        self._next: dict[str, float] = {}

    def reserve(self, host: str, earliest: float, latest: float) -> float | None:
        """The time of the next turn for ``host`` no earlier than ``earliest``, now reserved; None (and nothing
        reserved) when that turn would come after ``latest``."""
        turn = max(earliest, self._next.get(host, earliest))
        if turn > latest:
            return None
        return self.take(host, turn)

    def take(self, host: str, earliest: float) -> float:
        """Reserve the next turn for ``host`` no earlier than ``earliest``, however late it is; its time."""
        turn = max(earliest, self._next.get(host, earliest))
        if host not in self._next and len(self._next) >= _PACER_HOSTS:
            self._next = {h: t for h, t in self._next.items() if t > earliest}
        self._next[host] = turn + self._interval
        return turn


class _Progress:
    """Where one URL's fetch is, for the message it ends with if the batch's deadline stops it."""

    __slots__ = ("attempts", "last", "phase")

    def __init__(self) -> None:
        self.phase = "slot"  # slot (waiting for a connection slot), turn (IMGQ_PER_HOST_RPS), fetch, backoff
        self.attempts = 0
        self.last: ItemError | None = None  # the error of the attempt before this one


class _Inflater:
    """gzip/deflate decoding whose output per call is bounded, so a bomb cannot inflate past the cap."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._z: zlib._Decompress | None = None

    def feed(self, data: bytes, max_out: int) -> bytes:
        if not data:
            return b""
        if self._z is None:
            if self._encoding == "deflate" and data[0] & 0x0F != 8:
                wbits = -zlib.MAX_WBITS  # raw deflate without the zlib header, as some servers send it
            else:
                wbits = zlib.MAX_WBITS | (16 if self._encoding == "gzip" else 0)
            self._z = zlib.decompressobj(wbits)
        # Output stops at max_out; unconsumed input stays in unconsumed_tail and the caller gives up.
        return self._z.decompress(data, max_out)

    @property
    def complete(self) -> bool:
        return self._z is not None and self._z.eof


def _inflater_for(content_encoding: str, url: yarl.URL) -> _Inflater | None:
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflater("deflate" if codings[0] == "deflate" else "gzip")
    raise ItemError(
        ErrorCode.DECODE_ERROR,
        f"{url} was sent with Content-Encoding: {content_encoding}; imgq asks for identity and only inflates "
        "gzip or deflate",
    )


def _accept(formats: Sequence[str]) -> str:
    # Name what we decode: image CDNs negotiate on Accept and would otherwise pick AVIF/JXL for "image/*".
    return ", ".join([f"image/{f.lower()}" for f in formats] + ["*/*;q=0.1"])


def _too_large(url: yarl.URL, cap: int, what: str) -> ItemError:
    return ItemError(
        ErrorCode.TOO_LARGE, f"{url}: {what} exceeds the {cap}-byte limit (IMGQ_MAX_BYTES={cap})"
    )


class Fetcher:
    """Fetches URLs with the settings' limits. Use as ``async with Fetcher(settings) as f``.

    Nothing is bound to an event loop until ``__aenter__``, so a worker can create it inside a long-lived loop
    running in a background thread and submit ``fetch``/``fetch_many`` with ``run_coroutine_threadsafe``.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._allow = parse_allow(settings.allow_networks)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[tuple[str, str | None, int | None], tuple[asyncio.Semaphore, int]] = {}
        self._pacer = HostPacer(settings.per_host_rps) if settings.per_host_rps > 0 else None
        self._passed_hosts: set[str] = set()  # hosts whose IP-literal check passed (names pass: DNS is checked)

    async def __aenter__(self) -> Fetcher:
        s = self._settings
        connector = aiohttp.TCPConnector(
            # Our own semaphores admit at most these many (waited for outside the deadline): the connector's
            # limits only back them up.
            limit=s.fetch_concurrency,
            limit_per_host=s.per_host_concurrency,
            keepalive_timeout=KEEPALIVE_S,
            ttl_dns_cache=DNS_CACHE_S,
            resolver=GuardedResolver(self._allow),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The whole-fetch deadline is ours (asyncio.timeout); aiohttp only bounds the TCP/TLS connect.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
            # Built once, sent as-is: these replace aiohttp's own Accept and Accept-Encoding, and with nothing to
            # skip aiohttp takes its fast path (a skip list would cost a header copy per request).
            headers={"User-Agent": s.user_agent, "Accept": _accept(s.image_formats), "Accept-Encoding": "identity"},
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # one user's URLs must not see another's cookies
            trust_env=False,  # an env proxy would connect on our behalf, past the address guard
        )
        self._slots = asyncio.Semaphore(s.fetch_concurrency)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str, *, on_slot: Callable[[], None] | None = None) -> bytes:
        """The body of ``url`` (a 2xx answer, at most ``max_bytes``), or ItemError saying why not.

        ``on_slot()`` is called once the fetch has its connection slots, when its own deadline starts.
        """
        progress = _Progress()
        return await self._fetch_url(url, progress, None, on_slot)

    async def fetch_many(self, urls: Sequence[str], *,
                         on_result: Callable[[int, bytes | ItemError], None] | None = None,
                         deadline: float | None = None) -> list[bytes | ItemError]:
        """Fetch concurrently; one entry per URL in the same order, each the body or its ItemError.

        ``on_result(i, body_or_error)`` is called on the event loop as each URL finishes, so a caller can
        start on early bodies while the rest download; it must not block. ``deadline``: a ``time.monotonic()``
        instant (the batch's budget, less the time kept for decoding) when fetches still running are
        cancelled and end as ``timeout``; this returns by then. No retry starts that could not finish by then.
        """
        loop = asyncio.get_running_loop()
        # The loop's clock is monotonic too, but not promised to be time.monotonic itself: convert.
        when = None if deadline is None else loop.time() + (deadline - time.monotonic())

        async def one(i: int, url: str) -> bytes | ItemError:
            result: bytes | ItemError
            progress = _Progress()
            try:
                async with asyncio.timeout_at(when):
                    result = await self._fetch_url(url, progress, when, None)
            except TimeoutError:  # the batch's deadline; the fetch's own one is an ItemError already
                result = self._out_of_budget(url, progress)
            except ItemError as exc:
                result = exc
            except Exception as exc:  # a bug must cost one item, not the batch
                log.exception("unexpected error fetching %s", url)
                result = ItemError(ErrorCode.INTERNAL, f"{url}: {type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(i, result)
            return result

        return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(urls))))

    async def _fetch_url(self, url: str, progress: _Progress, until: float | None,
                         on_slot: Callable[[], None] | None) -> bytes:
        """One URL, attempts and retries included; ``until`` is the batch's deadline on the loop's clock."""
        if self._session is None or self._slots is None:
            raise RuntimeError("Fetcher is not open: use `async with Fetcher(settings) as fetcher`")
        session, slots = self._session, self._slots
        target = validate_url(url)
        loop = asyncio.get_running_loop()
        # Mirrors the connector's per-host limit, but waited for outside the deadline.
        key = (target.scheme, target.host, target.port)
        sem, users = self._host_slots.get(key) or (asyncio.Semaphore(self._settings.per_host_concurrency), 0)
        self._host_slots[key] = (sem, users + 1)
        try:
            async with sem:
                if self._pacer is not None:
                    progress.phase = "turn"
                    now = loop.time()
                    turn = (self._pacer.take(target.host or "", now) if until is None
                            else self._pacer.reserve(target.host or "", now, until - MIN_ATTEMPT_S))
                    if turn is None:  # it would come after the batch's deadline: leave it to a URL that can use it
                        raise self._out_of_budget(url, progress)
                    await asyncio.sleep(turn - now)
                    progress.phase = "slot"
                async with slots:
                    progress.phase = "fetch"
                    if on_slot is not None:
                        on_slot()
                    budget_end = loop.time() + self._settings.fetch_timeout_s
                    end = budget_end if until is None else min(until, budget_end)
                    try:
                        async with asyncio.timeout_at(budget_end):
                            return await self._attempts(session, target, progress, end, end < budget_end)
                    except TimeoutError:
                        raise ItemError(
                            ErrorCode.TIMEOUT,
                            f"{url}: not finished within {self._settings.fetch_timeout_s:g} s (IMGQ_FETCH_TIMEOUT"
                            f"{', retries included' if progress.attempts > 1 else ''}){_attempt_note(progress)}",
                        ) from None
        finally:
            sem, users = self._host_slots[key]
            if users == 1:
                del self._host_slots[key]
            else:
                self._host_slots[key] = (sem, users - 1)

    async def _attempts(self, session: aiohttp.ClientSession, target: yarl.URL, progress: _Progress,
                        end: float, batch_bound: bool) -> bytes:
        """Attempt, and retry what is worth it while the budget allows: ``end`` on the loop's clock, the batch's
        deadline when ``batch_bound`` else the URL's own."""
        loop = asyncio.get_running_loop()
        retries = self._settings.fetch_retries
        while True:
            progress.attempts += 1
            started = loop.time()
            try:
                return await self._fetch(session, target)
            except _Retryable as exc:
                failure = exc
            except ItemError as exc:
                if progress.attempts == 1:
                    raise
                raise ItemError(exc.code, f"{exc.message} (after {_attempt_count(progress.attempts)})") from None
            now = loop.time()
            n = progress.attempts
            if n > retries:
                raise ItemError(failure.code, f"{failure.message} (after {_attempt_count(n)}; IMGQ_FETCH_RETRIES="
                                f"{retries})") from None
            need = max(ATTEMPT_ALLOWANCE * (now - started), MIN_ATTEMPT_S)
            room = end - now - need
            if room < 0:
                raise ItemError(failure.code, f"{failure.message} (after {_attempt_count(n)}; no time left for "
                                f"another within {self._budget_name(batch_bound)})") from None
            if failure.retry_after is not None:
                if failure.retry_after > room:
                    raise ItemError(failure.code, f"{failure.message} (after {_attempt_count(n)}; not retried: the "
                                    f"server's Retry-After of {failure.retry_after:g} s is past the "
                                    f"{end - now:.1f} s left of {self._budget_name(batch_bound)})") from None
                # A little jitter, so a batch told "1 s" by one host does not come back all at once.
                delay = failure.retry_after + random.uniform(0.0, min(BACKOFF_BASE_S, room - failure.retry_after))
            else:
                # Full jitter, cut at the room left: still a draw from 0..bound, only never past the budget.
                delay = min(random.uniform(0.0, backoff_bound_s(n)), room)
            if self._pacer is not None:
                turn = self._pacer.reserve(target.host or "", now + delay, end - need)
                if turn is None:
                    raise ItemError(failure.code, f"{failure.message} (after {_attempt_count(n)}; no turn under "
                                    f"IMGQ_PER_HOST_RPS={self._settings.per_host_rps:g} before the end of "
                                    f"{self._budget_name(batch_bound)})") from None
                delay = turn - now
            metrics.count_fetch_retries(failure.reason)
            log.debug("retrying %s in %.2f s after: %s", target, delay, failure.message)
            progress.last = failure
            progress.phase = "backoff"
            await asyncio.sleep(delay)
            progress.phase = "fetch"

    def _budget_name(self, batch_bound: bool) -> str:
        s = self._settings
        if batch_bound:
            return (f"the batch's time budget (IMGQ_TASK_TIME_LIMIT={s.task_time_limit_s:g}s less "
                    f"IMGQ_DECODE_TIMEOUT={s.decode_timeout_s:g}s)")
        return f"this URL's budget (IMGQ_FETCH_TIMEOUT={s.fetch_timeout_s:g}s)"

    def _out_of_budget(self, url: str, progress: _Progress) -> ItemError:
        s = self._settings
        where = {
            "slot": "it was still waiting for a connection slot (IMGQ_PER_HOST_CONCURRENCY="
                    f"{s.per_host_concurrency}, IMGQ_FETCH_CONCURRENCY={s.fetch_concurrency})",
            "turn": f"its turn to send a request to a host paced at IMGQ_PER_HOST_RPS={s.per_host_rps:g} came too "
                    "late",
            "fetch": "it was still downloading",
            "backoff": "it was waiting to be retried",
        }[progress.phase]
        return ItemError(
            ErrorCode.TIMEOUT,
            f"{url}: the batch's time budget (IMGQ_TASK_TIME_LIMIT={s.task_time_limit_s:g}s, of which the last "
            f"IMGQ_DECODE_TIMEOUT={s.decode_timeout_s:g}s are kept for decoding) ran out before this URL was "
            f"fetched: {where}{_attempt_note(progress)}",
        )

    def _check_ip_literal(self, url: yarl.URL) -> None:
        # aiohttp skips the resolver for IP-literal hosts, so they are checked here.
        host = url.raw_host or ""
        if host in self._passed_hosts:  # the answer depends on the spelling and the allow-list alone
            return
        ip = parse_ip_host((url.host or "") if ":" in host else host)  # .host has the IPv6 %zone decoded
        if ip is not None and is_blocked(ip, self._allow):
            raise ItemError(ErrorCode.BLOCKED_ADDRESS, f"{url}: {blocked_message(host, ip)}")
        if len(self._passed_hosts) >= _PASSED_HOSTS:
            self._passed_hosts.clear()
        self._passed_hosts.add(host)

    async def _fetch(self, session: aiohttp.ClientSession, start: yarl.URL) -> bytes:
        visited: list[yarl.URL] = []
        try:
            return await self._follow(session, start, visited)
        except ItemError as exc:
            if len(visited) <= 1:
                raise
            # The failing hop's URL is in the message; name the URL the user submitted too.
            raise _renamed(exc, f"{exc.message} (redirected from {start})") from None

    async def _follow(self, session: aiohttp.ClientSession, url: yarl.URL, visited: list[yarl.URL]) -> bytes:
        max_redirects = self._settings.max_redirects
        loop = asyncio.get_running_loop()
        for hop in range(max_redirects + 1):
            visited.append(url)
            self._check_ip_literal(url)
            if hop and self._pacer is not None:  # the first hop had its turn before this attempt began
                now = loop.time()
                await asyncio.sleep(self._pacer.take(url.host or "", now) - now)
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUSES:
                        url = self._next_hop(url, resp, hop, max_redirects)
                        continue  # leaving the block drops the unread redirect body and its connection
                    if not 200 <= resp.status < 300:
                        reason = f" {resp.reason[:100]}" if resp.reason else ""
                        message = f"{url}: HTTP {resp.status}{reason}"
                        if resp.status in RETRY_STATUSES:
                            raise _Retryable(ErrorCode.HTTP_STATUS, message, reason=f"http_{resp.status}",
                                             retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                        raise ItemError(ErrorCode.HTTP_STATUS, message)
                    return await self._read_body(resp, url)
            except BlockedAddressError as exc:
                message = blocked_message(exc.host, exc.address)
                raise ItemError(ErrorCode.BLOCKED_ADDRESS, f"{url}: {message}") from None
            except aiohttp.InvalidURL as exc:
                raise ItemError(ErrorCode.INVALID_URL, f"{url}: {exc}") from None
            except (aiohttp.ClientError, OSError) as exc:
                why = _retry_reason(exc)
                if why is None:
                    raise ItemError(ErrorCode.UNREACHABLE, f"{url}: {_describe(exc)}") from None
                raise _Retryable(ErrorCode.UNREACHABLE, f"{url}: {_describe(exc)}", reason=why) from None
        raise AssertionError("not reached: the loop returns or raises")  # pragma: no cover

    def _next_hop(self, url: yarl.URL, resp: aiohttp.ClientResponse, hop: int, max_redirects: int) -> yarl.URL:
        location = resp.headers.get("Location")
        if not location:
            raise ItemError(ErrorCode.HTTP_STATUS, f"{url}: HTTP {resp.status} redirect without a Location")
        if hop == max_redirects:
            raise ItemError(
                ErrorCode.HTTP_STATUS,
                f"{url}: too many redirects (another HTTP {resp.status} after {max_redirects}; "
                f"IMGQ_MAX_REDIRECTS={max_redirects})",
            )
        try:
            target = str(url.join(yarl.URL(location)))
        except (ValueError, UnicodeError):
            target = location  # validate_url explains what is wrong with it
        try:
            return validate_url(target)
        except ItemError as exc:
            raise ItemError(exc.code, f"{url} redirects to {exc.message}") from None

    async def _read_body(self, resp: aiohttp.ClientResponse, url: yarl.URL) -> bytes:
        cap = self._settings.max_bytes
        if resp.content_length is not None and resp.content_length > cap:
            raise _too_large(url, cap, f"Content-Length {resp.content_length}")
        inflater = _inflater_for(resp.headers.get("Content-Encoding", ""), url)
        if inflater is None and resp.content_length is not None:
            # Length known and within the cap (checked above; aiohttp reads no further than it): read it in one
            # go. A quarter less fetch CPU than the chunk loop, which only bounded-length bodies need.
            return await resp.read()
        body = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            if inflater is not None:
                try:
                    chunk = inflater.feed(chunk, cap - len(body) + 1)
                except zlib.error as exc:
                    raise ItemError(ErrorCode.DECODE_ERROR, f"{url}: corrupt compressed body: {exc}") from None
            body += chunk
            if len(body) > cap:
                raise _too_large(url, cap, "body" if inflater is None else "decompressed body")
        if inflater is not None and not inflater.complete:
            raise ItemError(ErrorCode.DECODE_ERROR, f"{url}: compressed body ends before the stream does")
        return bytes(body)


def _retry_reason(exc: BaseException) -> str | None:
    """The metric label of a connection-level failure worth another attempt, or None when it is not."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        # "Try again" (a resolver that timed out or failed) may not be next time; "no such name" is.
        return "dns" if getattr(exc.os_error, "errno", None) == socket.EAI_AGAIN else None
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return None  # a certificate or TLS failure is the same next time
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "connect_timeout"  # the only socket timeout set: IMGQ_CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"  # refused, unreachable network: a server restarting, a full backlog
    if isinstance(exc, aiohttp.ClientResponseError):
        return None  # a malformed answer: the server's bug
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError | OSError):
        return "reset"  # the connection was reset or closed mid-answer
    return None


def _attempt_count(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def _attempt_note(progress: _Progress) -> str:
    if progress.attempts <= 1 or progress.last is None:
        return ""
    return f"; attempt {progress.attempts}, the one before ended: {progress.last.message}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return f"no connection within the connect timeout (IMGQ_CONNECT_TIMEOUT): {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"connection lost while reading the body: {exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection without a complete response"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"malformed HTTP response: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def fetch_all(urls: Sequence[str], settings: Settings) -> list[bytes | ItemError]:
    """Synchronous convenience: fetch ``urls`` in a fresh event loop (not from inside a running loop)."""

    async def run() -> list[bytes | ItemError]:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch_many(urls)

    return asyncio.run(run())
