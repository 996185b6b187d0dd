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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType

import aiohttp
import yarl

from imgq.errors import ErrorCode, ItemError
from imgq.settings import Settings
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

    async def __aenter__(self) -> Fetcher:
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=s.fetch_concurrency,
            limit_per_host=s.per_host_concurrency,
            resolver=GuardedResolver(self._allow),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The whole-fetch deadline is ours (asyncio.timeout); aiohttp only bounds the TCP/TLS connect.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
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
        if self._session is None or self._slots is None:
            raise RuntimeError("Fetcher is not open: use `async with Fetcher(settings) as fetcher`")
        target = validate_url(url)
        async with self._host_slot(target), self._slots:
            if on_slot is not None:
                on_slot()
            try:
                async with asyncio.timeout(self._settings.fetch_timeout_s):
                    return await self._fetch(self._session, target)
            except TimeoutError:
                raise ItemError(
                    ErrorCode.TIMEOUT,
                    f"{url}: not finished within {self._settings.fetch_timeout_s:g} s (IMGQ_FETCH_TIMEOUT)",
                ) from None

    async def fetch_many(self, urls: Sequence[str], *,
                         on_result: Callable[[int, bytes | ItemError], None] | None = None,
                         deadline: float | None = None) -> list[bytes | ItemError]:
        """Fetch concurrently; one entry per URL in the same order, each the body or its ItemError.

        ``on_result(i, body_or_error)`` is called on the event loop as each URL finishes, so a caller can
        start on early bodies while the rest download; it must not block. ``deadline``: a ``time.monotonic()``
        instant (the batch's budget, less the time kept for decoding) when fetches still running are
        cancelled and end as ``timeout``; this returns by then.
        """
        loop = asyncio.get_running_loop()
        # The loop's clock is monotonic too, but not promised to be time.monotonic itself: convert.
        when = None if deadline is None else loop.time() + (deadline - time.monotonic())

        async def one(i: int, url: str) -> bytes | ItemError:
            result: bytes | ItemError
            had_slot = False

            def slot_taken() -> None:
                nonlocal had_slot
                had_slot = True

            try:
                async with asyncio.timeout_at(when):
                    result = await self.fetch(url, on_slot=slot_taken)
            except TimeoutError:  # the batch's deadline; the fetch's own one is an ItemError already
                result = self._out_of_budget(url, had_slot)
            except ItemError as exc:
                result = exc
            except Exception as exc:  # a bug must cost one item, not the batch
                log.exception("unexpected error fetching %s", url)
                result = ItemError(ErrorCode.INTERNAL, f"{url}: {type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(i, result)
            return result

        return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(urls))))

    def _out_of_budget(self, url: str, had_slot: bool) -> ItemError:
        s = self._settings
        where = ("it was still downloading" if had_slot else
                 "it was still waiting for a connection slot (IMGQ_PER_HOST_CONCURRENCY="
                 f"{s.per_host_concurrency}, IMGQ_FETCH_CONCURRENCY={s.fetch_concurrency})")
        return ItemError(
            ErrorCode.TIMEOUT,
            f"{url}: the batch's time budget (IMGQ_TASK_TIME_LIMIT={s.task_time_limit_s:g}s, of which the last "
            f"IMGQ_DECODE_TIMEOUT={s.decode_timeout_s:g}s are kept for decoding) ran out before this URL was "
            f"fetched: {where}",
        )

    @contextlib.asynccontextmanager
    async def _host_slot(self, url: yarl.URL) -> AsyncIterator[None]:
        # Mirrors the connector's per-host limit, but waited for outside the deadline.
        key = (url.scheme, url.host, url.port)
        if key in self._host_slots:
            sem, users = self._host_slots[key]
        else:
            sem, users = asyncio.Semaphore(self._settings.per_host_concurrency), 0
        self._host_slots[key] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._host_slots[key]
            if users == 1:
                del self._host_slots[key]
            else:
                self._host_slots[key] = (sem, users - 1)

    def _check_ip_literal(self, url: yarl.URL) -> None:
        # aiohttp skips the resolver for IP-literal hosts, so they are checked here.
        host = url.raw_host or ""
        ip = parse_ip_host((url.host or "") if ":" in host else host)  # .host has the IPv6 %zone decoded
        if ip is not None and is_blocked(ip, self._allow):
            raise ItemError(ErrorCode.BLOCKED_ADDRESS, f"{url}: {blocked_message(host, ip)}")

    async def _fetch(self, session: aiohttp.ClientSession, start: yarl.URL) -> bytes:
        visited: list[yarl.URL] = []
        try:
            return await self._follow(session, start, visited)
        except ItemError as exc:
            if len(visited) <= 1:
                raise
            # The failing hop's URL is in the message; name the URL the user submitted too.
            raise ItemError(exc.code, f"{exc.message} (redirected from {start})") from None

    async def _follow(self, session: aiohttp.ClientSession, url: yarl.URL, visited: list[yarl.URL]) -> bytes:
        max_redirects = self._settings.max_redirects
        for hop in range(max_redirects + 1):
            visited.append(url)
            self._check_ip_literal(url)
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUSES:
                        url = self._next_hop(url, resp, hop, max_redirects)
                        continue  # leaving the block drops the unread redirect body and its connection
                    if not 200 <= resp.status < 300:
                        reason = f" {resp.reason[:100]}" if resp.reason else ""
                        raise ItemError(ErrorCode.HTTP_STATUS, f"{url}: HTTP {resp.status}{reason}")
                    return await self._read_body(resp, url)
            except BlockedAddressError as exc:
                message = blocked_message(exc.host, exc.address)
                raise ItemError(ErrorCode.BLOCKED_ADDRESS, f"{url}: {message}") from None
            except aiohttp.InvalidURL as exc:
                raise ItemError(ErrorCode.INVALID_URL, f"{url}: {exc}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise ItemError(ErrorCode.UNREACHABLE, f"{url}: {_describe(exc)}") from None
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
