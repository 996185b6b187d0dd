"""The benchmark's image server: ``bench/data`` over HTTP/1.1 keep-alive on 127.0.0.1, in its own process.

It runs on the same cores as what is measured, so it is as cheap as an HTTP server gets: its own process
(it never takes the GIL of the process doing the measuring), every file in memory with its response
header prebuilt, and a bare asyncio protocol that answers ``GET`` (aiohttp's server cost ~4x the CPU per
image). Keep-alive unless the client asks to close; the listen backlog is large, as a worker opens dozens of
connections at once.

    python -m bench.server DIR PORT
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgq.errors import ImgqError
from imgq.redis_server import free_port

BACKLOG = 1024
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def load_responses(root: Path) -> dict[bytes, bytes]:
    """Request path -> the whole response (header and body) for every ``*.jpg`` in ``root``."""
    out = {}
    for path in root.iterdir():
        if path.suffix == ".jpg":
            body = path.read_bytes()
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
            out[f"/{path.name}".encode()] = head.encode() + body
    return out


class _Http(asyncio.Protocol):
    def __init__(self, responses: dict[bytes, bytes]) -> None:
        self.responses = responses
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:  # GET only: a request ends with its headers
            request, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            line, _, headers = request.partition(b"\r\n")
            parts = line.split(b" ")
            path = parts[1].split(b"?", 1)[0] if len(parts) == 3 and parts[0] == b"GET" else b""
            self.transport.write(self.responses.get(path, _NOT_FOUND))
            if b"connection: close" in headers.lower() or parts[-1] == b"HTTP/1.0":
                self.transport.close()
                return


async def serve(root: Path, port: int) -> None:
    responses = load_responses(root)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(responses), "127.0.0.1", port, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


@dataclass(frozen=True)
class ImageServer:
    base: str  # http://127.0.0.1:<port>
    pid: int


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, timeout_s: float = 30) -> None:
    """Until ``proc`` accepts connections on 127.0.0.1:``port``; ImgqError if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ImgqError(f"{what} did not start on port {port}") from None
            time.sleep(0.05)


@contextmanager
def serve_images(root: Path, *, module: str = "bench.server", what: str = "bench image server"
                 ) -> Iterator[ImageServer]:
    """Serve ``root``'s ``*.jpg`` from a child process: ``python -m module ROOT PORT`` (this module's
    keep-alive server, or bench.peers.httpserver)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, str(root), str(port)])
    try:
        wait_listening(proc, port, what)
        yield ImageServer(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), int(sys.argv[2])))
