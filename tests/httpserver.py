"""A real HTTP server on 127.0.0.1 for tests: aiohttp.web on its own event loop in a background thread.

Routes can be added at any time, before or after start; an unknown path answers 404.

    with HTTPTestServer() as server:
        server.add("/cat.jpg", body=jpeg_bytes, content_type="image/jpeg")
        server.add("/gone", status=410)
        server.add_redirect("/old", "/cat.jpg")                       # relative or absolute Location
        server.add_handler("/slow", trickle(interval_s=1.0))          # canned hostile handlers below
        server.add_handler("/custom", lambda request: web.Response(text="hi"))  # sync or async
        fetch(server.url("/cat.jpg"))
        assert server.connections == 1          # TCP connections accepted so far
        assert server.hits["/cat.jpg"] == 1     # requests per path

As a pytest fixture::

    @pytest.fixture(scope="module")
    def server():
        with HTTPTestServer() as s:
            yield s

Canned handlers (each returns a handler for :meth:`HTTPTestServer.add_handler`):

* :func:`chunked_body` -- a chunked body of ``total`` bytes (or endless), generated lazily, never materialised;
* :func:`trickle` -- one byte every ``interval_s`` seconds, forever;
* :func:`drop_mid_body` -- declares a ``Content-Length``, sends part of it, then drops the connection;
* :func:`raw_response` -- writes raw bytes on the socket (e.g. a Content-Length that lies low) and closes;
* :func:`answer` -- a fixed status, headers and body (``answer(429, headers={"Retry-After": "1"})``);
* :func:`reset_mid_body` -- declares a ``Content-Length``, sends part of it, then resets the connection (RST);
* :func:`flaky` -- the first requests get the given failing handlers, one each in order, later ones ``then``;
* :func:`stamped` -- records when each request arrived (``time.monotonic()``), then answers with a handler.

Handlers are cancelled when the client disconnects, so endless bodies stop when the fetcher gives up.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

from aiohttp import web

Handler = Callable[[web.BaseRequest], "web.StreamResponse | Awaitable[web.StreamResponse]"]


class HTTPTestServer:
    """See the module docstring. ``host`` must be a loopback address for the tests' allow-lists to match."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.hits: Counter[str] = Counter()
        self._routes: dict[str, Handler] = {}
        self._connections = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> HTTPTestServer:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), name="HTTPTestServer", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test HTTP server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> HTTPTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        asyncio.run(self._serve(sock, ready))

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        web_server = web.Server(self._dispatch, handler_cancellation=True, access_log=None)

        def protocol() -> Any:
            with self._lock:
                self._connections += 1
            return web_server()

        server = await self._loop.create_server(protocol, sock=sock)
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            await web_server.shutdown(0.5)
            await server.wait_closed()

    # -- routes -----------------------------------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def add(
        self,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/octet-stream",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Serve fixed bytes; returns the full URL."""

        def handler(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=body, status=status, content_type=content_type, headers=headers)

        return self.add_handler(path, handler)

    def add_redirect(self, path: str, location: str, status: int = 302) -> str:
        """Redirect to ``location`` (sent verbatim: file:, other hosts and loops are all fine)."""
        return self.add(path, status=status, headers={"Location": location})

    def add_handler(self, path: str, handler: Handler) -> str:
        """Serve with ``handler(request)``, sync or async, returning an aiohttp response."""
        self._routes[path] = handler
        return self.url(path)

    @property
    def connections(self) -> int:
        """TCP connections accepted since start (or the last :meth:`reset_counts`)."""
        with self._lock:
            return self._connections

    def reset_counts(self) -> None:
        with self._lock:
            self._connections = 0
        self.hits.clear()

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        self.hits[request.path] += 1
        handler = self._routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text=f"no route {request.path}")
        result = handler(request)
        if inspect.isawaitable(result):
            result = await result
        assert isinstance(result, web.StreamResponse)
        return result


# -- canned hostile handlers ---------------------------------------------------------------------------


def chunked_body(total: int | None = None, chunk: int = 64 * 1024, content_type: str = "image/jpeg") -> Handler:
    """A chunked (no Content-Length) body of ``total`` bytes, or endless when None; made on the fly."""
    block = b"\0" * chunk

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        while total is None or sent < total:
            part = block if total is None else block[: total - sent]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    return handler


def trickle(interval_s: float = 1.0, content_type: str = "image/jpeg") -> Handler:
    """One byte every ``interval_s`` seconds, forever, with a plausible Content-Length."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": "1000"})
        await resp.prepare(request)
        while True:
            await resp.write(b"\xff")
            await asyncio.sleep(interval_s)

    return handler


def drop_mid_body(declared: int = 100_000, sent: int = 1000, content_type: str = "image/jpeg") -> Handler:
    """Declare ``declared`` bytes, send ``sent`` of them, then drop the connection."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(declared)})
        await resp.prepare(request)
        await resp.write(b"\xff" * sent)
        await resp.drain()
        _abort(request)

    return handler


def raw_response(data: bytes) -> Handler:
    """Write ``data`` as-is on the socket (status line, headers and body), then close the connection."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        transport.write(data)
        await asyncio.sleep(0.05)  # let it flush before the close
        _abort(request)

    return handler


def _abort(request: web.BaseRequest) -> NoReturn:
    # Close the socket under aiohttp's feet; handler_cancellation then ends the handler quietly.
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


def answer(status: int, body: bytes = b"", *, headers: Mapping[str, str] | None = None,
           content_type: str = "application/octet-stream") -> Handler:
    """A fixed answer: ``status``, ``headers`` and ``body``."""

    def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type=content_type, headers=headers)

    return handler


def reset_mid_body(declared: int = 100_000, sent: int = 1000, content_type: str = "image/jpeg") -> Handler:
    """Declare ``declared`` bytes, send ``sent`` of them, then reset the connection: a TCP RST, not a close."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(declared)})
        await resp.prepare(request)
        await resp.write(b"\xff" * sent)
        await resp.drain()
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        # Linger on with a zero timeout: closing the socket sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        raise asyncio.CancelledError

    return handler


def flaky(failures: Sequence[Handler], then: Handler) -> Handler:
    """Request k (from 0) of this path gets ``failures[k]`` while there are failures left; later ones ``then``."""
    served = 0
    lock = threading.Lock()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal served
        with lock:
            k, served = served, served + 1
        chosen = failures[k] if k < len(failures) else then
        result = chosen(request)
        if inspect.isawaitable(result):
            result = await result
        assert isinstance(result, web.StreamResponse)
        return result

    return handler


def stamped(then: Handler, arrivals: list[float]) -> Handler:
    """Append each request's arrival (``time.monotonic()``, this process's clock) to ``arrivals``, then ``then``."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        result = then(request)
        if inspect.isawaitable(result):
            result = await result
        assert isinstance(result, web.StreamResponse)
        return result

    return handler
