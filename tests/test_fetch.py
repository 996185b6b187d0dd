"""worker.urlcheck, worker.netguard and worker.fetch against a real HTTP server on 127.0.0.1.

Loopback is blocked by default, so cases that need the test server use LOOPBACK settings, which allow
127.0.0.0/8 exactly as an operator would with IMGQ_ALLOW_NETWORKS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web

from imgq.errors import ErrorCode, ItemError
from imgq.settings import Settings
from tests import images
from tests.httpserver import HTTPTestServer, chunked_body, drop_mid_body, raw_response, trickle
from worker.fetch import Fetcher, fetch_all
from worker.netguard import is_blocked, parse_allow, parse_ipv4_host
from worker.urlcheck import validate_url

CAP = 1_000_000
LOOPBACK = Settings(allow_networks=("127.0.0.0/8",), max_bytes=CAP, fetch_timeout_s=1.5, connect_timeout_s=1.0)
DEFAULT = Settings()
JPEG = images.jpeg((320, 240))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[HTTPTestServer]:
    with HTTPTestServer() as s:
        s.add("/cat.jpg", JPEG, content_type="image/jpeg")
        s.add("/page.jpg", images.html_page(), content_type="image/jpeg")
        s.add("/404", status=404)
        s.add("/500", status=500)
        s.add_redirect("/to-private", "http://10.0.0.1/cat.jpg")
        s.add_redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
        s.add_redirect("/to-loopback-v6", f"http://[::1]:{s.port}/cat.jpg", status=307)
        s.add_redirect("/to-file", "file:///etc/passwd", status=301)
        s.add_redirect("/to-gopher", "gopher://127.0.0.1:6379/_INFO", status=308)
        s.add_redirect("/to-creds", f"http://user:pass@127.0.0.1:{s.port}/cat.jpg")
        s.add_redirect("/loop", "/loop")
        s.add("/no-location", status=302)
        for hop in range(1, 5):  # /hop<n> reaches /cat.jpg after n redirects
            s.add_redirect(f"/hop{hop}", "/cat.jpg" if hop == 1 else f"/hop{hop - 1}", status=303)
        s.add_handler("/1gb-chunked", chunked_body(total=1 << 30))
        s.add("/claims-huge", b"tiny", headers={"Content-Length": str(10 * CAP)})
        s.add_handler("/claims-small", raw_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100\r\n\r\n" + b"\xff" * (2 * CAP)))
        s.add_handler("/no-length-close", raw_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n" + b"\xff" * (2 * CAP)))
        s.add("/gzip-bomb", images.gzip_bomb(), content_type="image/jpeg", headers={"Content-Encoding": "gzip"})
        s.add("/gzip-ok", images.gzip_body(JPEG), content_type="image/jpeg", headers={"Content-Encoding": "gzip"})
        s.add("/gzip-corrupt", b"\x1f\x8b\x08\x00garbage-not-deflate", headers={"Content-Encoding": "gzip"})
        s.add("/brotli", b"\x0b\x02\x80hello\x03", headers={"Content-Encoding": "br"})
        s.add_handler("/trickle", trickle(interval_s=1.0))
        s.add_handler("/drop", drop_mid_body(declared=100_000, sent=1000))
        yield s


def fetch_one(url: str, settings: Settings) -> bytes | ItemError:
    return fetch_all([url], settings)[0]


def code_of(result: bytes | ItemError) -> ErrorCode | None:
    return result.code if isinstance(result, ItemError) else None


# -- before any I/O ---------------------------------------------------------------------------------------

INVALID_URLS = [
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_hello",
    "redis://127.0.0.1:6379/0",
    "ftp://example.com/cat.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "http://user:pass@example.com/cat.jpg",
    "http://user@example.com/cat.jpg",
    "http://@example.com/cat.jpg",
    "http://example.com:99999/cat.jpg",
    "http://example.com:0/cat.jpg",
    "http://example.com:-1/cat.jpg",
    "not a url",
    "",
    "/relative/cat.jpg",
    "//example.com/cat.jpg",
    "http://",
    "http:///cat.jpg",
    "http://exa mple.com/cat.jpg",
    "http://example.com/cat.jpg\r\nX-Injected: 1",
    "http://example.com/\x00.jpg",
    "http://%31%32%37.0.0.1/",
    "http://4294967296/",
    "http://256.1.1.1/",
    "http://[::1/",
    "http://a..b/cat.jpg",
    "http://example.com/" + "a" * 2100,
]


@pytest.mark.parametrize("url", INVALID_URLS)
def test_invalid_urls_rejected_before_io(url: str) -> None:
    with pytest.raises(ItemError) as info:
        validate_url(url)
    assert info.value.code is ErrorCode.INVALID_URL
    assert code_of(fetch_one(url, LOOPBACK)) is ErrorCode.INVALID_URL


@pytest.mark.parametrize(("url", "expected"), [
    ("http://0x7f000001:8080/a.jpg?x=1#frag", "http://127.0.0.1:8080/a.jpg?x=1"),
    ("http://2130706433/", "http://127.0.0.1/"),
    ("http://0177.0.0.1/", "http://127.0.0.1/"),
    ("http://127.1/", "http://127.0.0.1/"),
    ("HTTPS://Example.COM/cat.jpg", "https://example.com/cat.jpg"),
    ("https://bücher.example/ü.jpg", "https://xn--bcher-kva.example/%C3%BC.jpg"),
])
def test_validate_url_normalises(url: str, expected: str) -> None:
    assert str(validate_url(url)) == expected


@pytest.mark.parametrize(("host", "address"), [
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("10.0.0.010", "10.0.0.8"),
    ("example.com", None),
    ("08.1.1.1", None),  # not octal: a (bad) name, as for inet_aton
    ("1.2.3.4.5", None),
])
def test_parse_ipv4_host_matches_inet_aton(host: str, address: str | None) -> None:
    parsed = parse_ipv4_host(host)
    assert (str(parsed) if parsed else None) == address


@pytest.mark.parametrize(("address", "blocked"), [
    ("8.8.8.8", False),
    ("1.1.1.1", False),
    ("2606:4700:4700::1111", False),
    ("::ffff:8.8.8.8", False),  # mapped public v4 is judged by its v4
    ("2002:808:808::1", False),  # 6to4 of a public v4
    ("64:ff9b::808:808", False),  # NAT64 of a public v4
    ("192.0.0.170", True),
    ("198.18.0.1", True),
    ("192.0.2.1", True),
    ("203.0.113.7", True),
    ("255.255.255.255", True),
    ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
    ("::127.0.0.1", True),  # IPv4-compatible
    ("2001:db8::1", True),
    ("fe80::1%eth0", True),
])
def test_is_blocked(address: str, blocked: bool) -> None:
    assert is_blocked(ipaddress.ip_address(address), ()) is blocked


def test_allow_list_opens_only_its_network() -> None:
    allow = parse_allow(["127.0.0.0/8", "fd00::/8"])
    assert not is_blocked(ipaddress.ip_address("127.0.0.1"), allow)
    assert not is_blocked(ipaddress.ip_address("::ffff:127.0.0.1"), allow)  # the same host
    assert not is_blocked(ipaddress.ip_address("fd12::1"), allow)
    assert is_blocked(ipaddress.ip_address("10.0.0.1"), allow)
    assert is_blocked(ipaddress.ip_address("::1"), allow)


# -- blocked addresses ------------------------------------------------------------------------------------

# Hosts that are blocked by default; {port} is the test server's, so loopback spellings point at a live listener.
BLOCKED_HOSTS = [
    "127.0.0.1", "localhost", "LOCALHOST", "127.0.0.1.", "127.0.0.2", "0.0.0.0", "0",
    "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1",
    "[::1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::ffff:0:7f00:1]", "[::127.0.0.1]",
    "[2002:7f00:1::]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[64:ff9b::7f00:1]",
    "[fe80::1]", "[fc00::1]", "[fd00::1]", "[fec0::1]", "[ff02::1]",
    "10.0.0.1", "172.16.0.1", "172.31.255.254", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "224.0.0.1", "240.0.0.1", "198.18.0.1",
]
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "localhost", "LOCALHOST", "127.0.0.1.", "0.0.0.0", "0", "2130706433", "0x7f000001",
    "0177.0.0.1", "127.1", "0x7f.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "[::]",
]


@pytest.mark.parametrize("host", BLOCKED_HOSTS)
def test_blocked_hosts(host: str, server: HTTPTestServer) -> None:
    result = fetch_one(f"http://{host}:{server.port}/cat.jpg", DEFAULT)
    assert code_of(result) is ErrorCode.BLOCKED_ADDRESS, result
    assert isinstance(result, ItemError) and "IMGQ_ALLOW_NETWORKS" in result.message


def test_blocked_spellings_never_connect() -> None:
    with HTTPTestServer() as listener:
        listener.add("/cat.jpg", JPEG, content_type="image/jpeg")
        urls = [f"http://{host}:{listener.port}/cat.jpg" for host in LOOPBACK_SPELLINGS]
        results = fetch_all(urls, DEFAULT)
        assert [code_of(r) for r in results] == [ErrorCode.BLOCKED_ADDRESS] * len(urls)
        assert listener.connections == 0
        # The counter does count: the same listener, allowed, is reached.
        assert fetch_one(listener.url("/cat.jpg"), LOOPBACK) == JPEG
        assert listener.connections == 1


def test_redirect_to_a_blocked_loopback_address_never_connects() -> None:
    # The first hop is allowed (127.0.0.2 only); it redirects to 127.0.0.1, which is not.
    with HTTPTestServer("127.0.0.2") as front, HTTPTestServer("127.0.0.1") as target:
        target.add("/cat.jpg", JPEG)
        front.add_redirect("/go", target.url("/cat.jpg"))
        result = fetch_one(front.url("/go"), Settings(allow_networks=("127.0.0.2/32",)))
        assert code_of(result) is ErrorCode.BLOCKED_ADDRESS, result
        assert front.hits["/go"] == 1 and target.connections == 0


def test_localhost_allowed_when_its_network_is() -> None:
    with HTTPTestServer() as s:
        s.add("/cat.jpg", JPEG)
        assert fetch_one(f"http://localhost:{s.port}/cat.jpg", LOOPBACK) == JPEG


# -- the server answers badly -----------------------------------------------------------------------------

SERVER_CASES: list[tuple[str, ErrorCode]] = [
    ("/404", ErrorCode.HTTP_STATUS),
    ("/500", ErrorCode.HTTP_STATUS),
    ("/to-private", ErrorCode.BLOCKED_ADDRESS),
    ("/to-metadata", ErrorCode.BLOCKED_ADDRESS),
    ("/to-loopback-v6", ErrorCode.BLOCKED_ADDRESS),
    ("/to-file", ErrorCode.INVALID_URL),
    ("/to-gopher", ErrorCode.INVALID_URL),
    ("/to-creds", ErrorCode.INVALID_URL),
    ("/loop", ErrorCode.HTTP_STATUS),
    ("/hop4", ErrorCode.HTTP_STATUS),  # one more than IMGQ_MAX_REDIRECTS=3
    ("/no-location", ErrorCode.HTTP_STATUS),
    ("/1gb-chunked", ErrorCode.TOO_LARGE),
    ("/claims-huge", ErrorCode.TOO_LARGE),
    ("/no-length-close", ErrorCode.TOO_LARGE),
    ("/gzip-bomb", ErrorCode.TOO_LARGE),
    ("/gzip-corrupt", ErrorCode.DECODE_ERROR),
    ("/brotli", ErrorCode.DECODE_ERROR),
    ("/claims-small", ErrorCode.UNREACHABLE),  # bytes past Content-Length: a malformed response
    ("/drop", ErrorCode.UNREACHABLE),
]


@pytest.mark.parametrize(("path", "expected"), SERVER_CASES)
def test_server_misbehaviour(path: str, expected: ErrorCode, server: HTTPTestServer) -> None:
    result = fetch_one(server.url(path), LOOPBACK)
    assert code_of(result) is expected, result


def test_status_code_named_in_message(server: HTTPTestServer) -> None:
    result = fetch_one(server.url("/404"), LOOPBACK)
    assert isinstance(result, ItemError) and "404" in result.message


def test_trickle_ends_at_the_deadline(server: HTTPTestServer) -> None:
    start = time.monotonic()
    result = fetch_one(server.url("/trickle"), LOOPBACK)
    elapsed = time.monotonic() - start
    assert code_of(result) is ErrorCode.TIMEOUT, result
    assert LOOPBACK.fetch_timeout_s - 0.1 < elapsed < LOOPBACK.fetch_timeout_s + 1.0


@pytest.mark.parametrize("url_of", [
    lambda s: f"http://127.0.0.1:{closed_port()}/cat.jpg",
    lambda s: "http://nonexistent.invalid/cat.jpg",
], ids=["closed-port", "dns-failure"])
def test_unreachable(url_of: Callable[[HTTPTestServer], str], server: HTTPTestServer) -> None:
    assert code_of(fetch_one(url_of(server), LOOPBACK)) is ErrorCode.UNREACHABLE


# -- success ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/cat.jpg", "/hop3", "/gzip-ok", "/page.jpg"])
def test_fetch_returns_the_exact_bytes(path: str, server: HTTPTestServer) -> None:
    expected = images.html_page() if path == "/page.jpg" else JPEG  # Content-Type is not the fetcher's business
    assert fetch_one(server.url(path), LOOPBACK) == expected


def test_body_exactly_at_the_cap_is_fine(server: HTTPTestServer) -> None:
    server.add("/at-cap", b"\xff" * CAP)
    server.add("/over-cap", b"\xff" * (CAP + 1))
    at, over = fetch_all([server.url("/at-cap"), server.url("/over-cap")], LOOPBACK)
    assert at == b"\xff" * CAP and code_of(over) is ErrorCode.TOO_LARGE


def test_fetch_many_preserves_order_and_mixes_results(server: HTTPTestServer) -> None:
    urls = [server.url("/cat.jpg"), "file:///etc/passwd", server.url("/404"), server.url("/hop2"),
            f"http://10.0.0.1:{server.port}/", server.url("/gzip-bomb"), server.url("/page.jpg")]
    results = fetch_all(urls, LOOPBACK)
    assert [code_of(r) for r in results] == [None, ErrorCode.INVALID_URL, ErrorCode.HTTP_STATUS, None,
                                             ErrorCode.BLOCKED_ADDRESS, ErrorCode.TOO_LARGE, None]
    assert results[0] == JPEG and results[3] == JPEG and results[6] == images.html_page()


def test_keep_alive_reuses_one_connection() -> None:
    with HTTPTestServer() as s:
        s.add("/cat.jpg", JPEG)

        async def run() -> list[bytes]:
            async with Fetcher(LOOPBACK) as fetcher:
                return [await fetcher.fetch(s.url("/cat.jpg")) for _ in range(5)]

        assert asyncio.run(run()) == [JPEG] * 5
        assert s.connections == 1 and s.hits["/cat.jpg"] == 5


def test_concurrency_waits_outside_the_deadline() -> None:
    # 6 slow answers through 2 slots: the last ones wait ~2x their deadline's worth, yet none time out.
    settings = Settings(allow_networks=("127.0.0.0/8",), fetch_timeout_s=1.0, fetch_concurrency=2,
                        per_host_concurrency=2)

    async def slow(request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(0.4)
        return web.Response(body=JPEG)

    with HTTPTestServer() as s:
        s.add_handler("/slow", slow)
        assert fetch_all([s.url("/slow")] * 6, settings) == [JPEG] * 6


def test_fetcher_in_a_background_loop_thread(server: HTTPTestServer) -> None:
    # How the worker uses it: one loop per process in a thread, coroutines submitted from other threads.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        fetcher = Fetcher(LOOPBACK)
        asyncio.run_coroutine_threadsafe(fetcher.__aenter__(), loop).result(5)
        results = asyncio.run_coroutine_threadsafe(
            fetcher.fetch_many([server.url("/cat.jpg"), server.url("/404")]), loop).result(10)
        assert results[0] == JPEG and code_of(results[1]) is ErrorCode.HTTP_STATUS
        asyncio.run_coroutine_threadsafe(fetcher.__aexit__(None, None, None), loop).result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_fetch_outside_async_with_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        asyncio.run(Fetcher(LOOPBACK).fetch("http://example.com/cat.jpg"))


def test_request_headers_come_from_settings() -> None:
    seen: dict[str, str] = {}

    def echo(request: web.BaseRequest) -> web.Response:
        seen.update(request.headers)
        return web.Response(body=JPEG)

    with HTTPTestServer() as s:
        s.add_handler("/echo", echo)
        assert fetch_one(s.url("/echo"), Settings(allow_networks=("127.0.0.0/8",), user_agent="imgq-test/9")) == JPEG
    assert seen["User-Agent"] == "imgq-test/9"
    assert seen["Accept-Encoding"] == "identity"  # compressed bodies are the exception, not the ask
    assert "image/jpeg" in seen["Accept"] and "Cookie" not in seen


def test_the_bad_character_scan_refuses_exactly_whitespace_controls_and_surrogates() -> None:
    # validate_url's one compiled scan stands for a per-character check: they must agree on every code point.
    import unicodedata

    from worker.urlcheck import _bad_char

    def bad(ch: str) -> bool:
        return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs")

    disagree = [hex(cp) for cp in range(0x110000) if bad(chr(cp)) != (_bad_char(chr(cp)) is not None)]
    assert disagree == []
    assert _bad_char("http://example.com/a b.jpg") == " "
    assert _bad_char("http://example.com/\u3000.jpg") == "\u3000"
    assert _bad_char("http://example.com/ok.jpg") is None
