"""The peers' image server: Python's own http.server, HTTP/1.0 (a connection per request), a large backlog.

    python -m bench.peers.httpserver DIR PORT

Threads per connection, as http.server does; every system measured meets the same server.
"""

from __future__ import annotations

import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BACKLOG = 1024  # a fetcher opens dozens of connections at once; the default of 5 would refuse them


class _Server(ThreadingHTTPServer):
    request_queue_size = BACKLOG
    daemon_threads = True


class _Quiet(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(root: Path, port: int) -> None:
    handler = functools.partial(_Quiet, directory=str(root))
    with _Server(("127.0.0.1", port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
