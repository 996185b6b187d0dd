"""Issue 16, part C: transient failures are retried with back-off inside the fetch and batch budgets, Retry-After
is honoured (or ends the item at once when it is past the budget), and IMGQ_PER_HOST_RPS paces each host.

Everything runs against real HTTP servers on 127.0.0.1 (tests/httpserver.py); the job-level cases go through
a real Redis and a real `imgq worker` process. Rate checks are on the server's arrival times and are lower
bounds on spacing: a loaded machine only spreads requests further apart.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from imgq.errors import ErrorCode, ItemError, SettingsError
from imgq.redis_server import free_port
from imgq.settings import Settings
from tests import images
from tests.httpserver import Handler, HTTPTestServer, answer, flaky, reset_mid_body, stamped
from tests.support import Cluster, ImageSite, every_index_once
from worker.fetch import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    Fetcher,
    HostPacer,
    backoff_bound_s,
    fetch_all,
    parse_retry_after,
)

JPEG = images.jpeg((64, 48))
# Budgets wide enough that two failures and their waits (at most ~3 s) fit many times over on a loaded box.
ROOMY = Settings(allow_networks=("127.0.0.0/8",), fetch_timeout_s=10.0, connect_timeout_s=2.0, fetch_retries=2)
# For job-level cases: the same room in the worker, and a batch bound well inside the visibility timeout.
ROOMY_ENV = {"IMGQ_FETCH_TIMEOUT": "10", "IMGQ_TASK_TIME_LIMIT": "30", "IMGQ_VISIBILITY_TIMEOUT": "60",
             "IMGQ_FETCH_RETRIES": "2"}


def unavailable(retry_after: str | None = None) -> Handler:
    return answer(503, headers={"Retry-After": retry_after} if retry_after is not None else None)


def too_many(retry_after: str) -> Handler:
    return answer(429, headers={"Retry-After": retry_after})


# The three ways a URL fails before it is served: an overloaded server, a connection reset mid-body, and a rate
# limit that asks for one second.
KINDS: tuple[tuple[str, Callable[[], Handler]], ...] = (
    ("http_503", unavailable),
    ("reset", reset_mid_body),
    ("http_429", lambda: too_many("1")),
)


def http_date(from_now_s: float) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=from_now_s), usegmt=True)


def code_of(result: bytes | ItemError) -> ErrorCode | None:
    return result.code if isinstance(result, ItemError) else None


def message_of(result: bytes | ItemError) -> str:
    assert isinstance(result, ItemError), "expected an error, got a body"
    return result.message


def retries_counted(reason: str) -> float:
    return REGISTRY.get_sample_value("imgq_fetch_retries_total", {"reason": reason}) or 0.0


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def report(name: str, seconds: float) -> None:
    print(f"\n[measured] {name}: {seconds:.2f} s")  # shown with -s


def assert_paced(arrivals: list[float], rps: float, *, slack_s: float = 1.0, min_gap: int = 5) -> None:
    """No stretch of requests came faster than ``rps``. A request whose arrival the server noticed late can make the
    next gap look short, so only stretches of ``min_gap`` or more requests are checked, each with ``slack_s``."""
    for i in range(len(arrivals)):
        for j in range(i + min_gap, len(arrivals)):
            span, allowed = arrivals[j] - arrivals[i], (j - i) / rps - slack_s
            assert span >= allowed, f"requests {i}..{j} came {span:.2f} s apart, faster than {rps}/s allows"


@pytest.fixture
def server() -> Iterator[HTTPTestServer]:
    with HTTPTestServer() as s:
        yield s


# -- the policy's parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("1", 1.0),
    (" 120 ", 120.0),
    ("0", 0.0),
    ("2.5", 2.5),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: now
    ("", None),
    (None, None),
    ("soon", None),
    ("-5", None),
    ("1e3", None),
])
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date_is_seconds_from_now() -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Tue, 01 Dec 2026 12:01:30 GMT", now=now) == 90.0
    assert parse_retry_after("Tuesday, 01-Dec-26 12:00:10 GMT", now=now) == 10.0  # RFC 850, still allowed
    assert parse_retry_after("Tue Dec  1 12:00:05 2026", now=now) == 5.0  # asctime


def test_backoff_doubles_up_to_its_cap() -> None:
    bounds = [backoff_bound_s(n) for n in range(1, 10)]
    assert bounds[:3] == [BACKOFF_BASE_S, 2 * BACKOFF_BASE_S, 4 * BACKOFF_BASE_S]
    assert bounds == sorted(bounds) and max(bounds) == BACKOFF_CAP_S


def test_pacer_spaces_turns_per_host_and_takes_no_turn_past_latest() -> None:
    pacer = HostPacer(4.0)
    assert [pacer.take("a", 10.0) for _ in range(3)] == [10.0, 10.25, 10.5]
    assert pacer.take("b", 10.0) == 10.0  # another host has its own turns
    assert pacer.reserve("a", 10.0, latest=10.6) is None  # the next turn (10.75) is too late: nothing reserved
    assert pacer.reserve("a", 10.0, latest=10.75) == 10.75
    assert pacer.take("a", 20.0) == 20.0  # an idle host starts afresh


@pytest.mark.parametrize(("env", "name"), [({"IMGQ_FETCH_RETRIES": "-1"}, "IMGQ_FETCH_RETRIES"),
                                           ({"IMGQ_PER_HOST_RPS": "-2"}, "IMGQ_PER_HOST_RPS"),
                                           ({"IMGQ_PER_HOST_RPS": "fast"}, "IMGQ_PER_HOST_RPS")])
def test_bad_retry_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


# -- retried, and what is not -------------------------------------------------------------------------------


def test_each_transient_failure_is_retried_then_served(server: HTTPTestServer) -> None:
    failing = {
        "/503": [unavailable()],
        "/502-504": [answer(502), answer(504)],
        "/408": [answer(408)],
        "/reset": [reset_mid_body()],
        "/429": [too_many("0")],
        "/mixed": [unavailable("0"), reset_mid_body()],
    }
    for path, failures in failing.items():
        server.add_handler(path, flaky(failures, answer(200, JPEG)))
    before = {reason: retries_counted(reason) for reason in ("http_503", "http_502", "http_504", "http_408",
                                                             "http_429", "reset")}
    results = fetch_all([server.url(p) for p in failing], ROOMY)
    assert results == [JPEG] * len(failing)
    assert {p: server.hits[p] for p in failing} == {p: len(f) + 1 for p, f in failing.items()}
    after = {reason: retries_counted(reason) - n for reason, n in before.items()}
    assert after == {"http_503": 2, "http_502": 1, "http_504": 1, "http_408": 1, "http_429": 1, "reset": 2}


def test_refused_connections_are_retried_and_the_message_counts_the_attempts() -> None:
    result = fetch_all([f"http://127.0.0.1:{free_port()}/gone.jpg"], ROOMY)[0]
    assert code_of(result) is ErrorCode.UNREACHABLE
    assert "cannot connect" in message_of(result) and "(after 3 attempts; IMGQ_FETCH_RETRIES=2)" in message_of(result)


def test_retries_can_be_turned_off(server: HTTPTestServer) -> None:
    url = server.add_handler("/once", flaky([unavailable()], answer(200, JPEG)))
    result = fetch_all([url], ROOMY.replace(fetch_retries=0))[0]
    assert code_of(result) is ErrorCode.HTTP_STATUS and server.hits["/once"] == 1
    assert message_of(result).endswith("HTTP 503 Service Unavailable (after 1 attempt; IMGQ_FETCH_RETRIES=0)")


def test_a_transient_failure_then_a_permanent_one_says_how_many_attempts(server: HTTPTestServer) -> None:
    url = server.add_handler("/then-404", flaky([unavailable("0")], answer(404)))
    result = fetch_all([url], ROOMY)[0]
    assert code_of(result) is ErrorCode.HTTP_STATUS and server.hits["/then-404"] == 2
    assert message_of(result).endswith("HTTP 404 Not Found (after 2 attempts)")


@pytest.mark.parametrize(("handler", "expected"), [
    (answer(404), ErrorCode.HTTP_STATUS),
    (answer(403), ErrorCode.HTTP_STATUS),
    (answer(500), ErrorCode.HTTP_STATUS),
    (answer(200, b"tiny", headers={"Content-Length": str(10 * ROOMY.max_bytes)}), ErrorCode.TOO_LARGE),
    (answer(200, b"\x0b\x02\x80hi\x03", headers={"Content-Encoding": "br"}), ErrorCode.DECODE_ERROR),
    (answer(302, headers={"Location": "http://10.0.0.1/cat.jpg"}), ErrorCode.BLOCKED_ADDRESS),
    (answer(302, headers={"Location": "file:///etc/passwd"}), ErrorCode.INVALID_URL),
], ids=["404", "403", "500", "too-large", "brotli", "redirect-to-private", "redirect-to-file"])
def test_permanent_failures_are_not_retried(handler: Handler, expected: ErrorCode, server: HTTPTestServer) -> None:
    url = server.add_handler("/permanent", handler)
    result = fetch_all([url], ROOMY)[0]
    assert code_of(result) is expected, result
    assert server.hits["/permanent"] == 1  # one request: never asked again
    assert "attempt" not in message_of(result)  # the plain message of a first answer


def test_a_blocked_address_is_never_contacted_nor_retried() -> None:
    with HTTPTestServer() as listener:
        listener.add("/cat.jpg", JPEG)
        result = fetch_all([listener.url("/cat.jpg")], ROOMY.replace(allow_networks=()))[0]
        assert code_of(result) is ErrorCode.BLOCKED_ADDRESS and listener.connections == 0
        assert "attempt" not in message_of(result)


# -- Retry-After and the budgets -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_waited_for(form: str, server: HTTPTestServer) -> None:
    arrivals: list[float] = []

    def later(request: web.BaseRequest) -> web.StreamResponse:
        # As a date (whole seconds) two seconds ahead, the wait is 1-2 s; as seconds, 1 s.
        return web.Response(status=429, headers={"Retry-After": "1" if form == "seconds" else http_date(2)})

    url = server.add_handler("/later", stamped(flaky([later], answer(200, JPEG)), arrivals))
    assert fetch_all([url], ROOMY) == [JPEG]
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.95  # a lower bound: a slow machine only waits longer


@pytest.mark.parametrize(("status", "header"), [(429, "3600"), (503, "http-date")])
def test_retry_after_past_the_budget_ends_the_item_at_once(status: int, header: str, server: HTTPTestServer) -> None:
    def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=status, headers={"Retry-After": "3600" if header == "3600" else http_date(3600)})

    url = server.add_handler("/go-away", handler)
    result = fetch_all([url], ROOMY)[0]
    # Ended with the server's own answer, not as a timeout: nobody waited for the hour, nor for the budget.
    assert code_of(result) is ErrorCode.HTTP_STATUS, result
    assert server.hits["/go-away"] == 1
    message = message_of(result)
    assert f"HTTP {status}" in message and "(after 1 attempt; not retried: the server's Retry-After of" in message
    assert "s is past the" in message and "this URL's budget (IMGQ_FETCH_TIMEOUT=10s)" in message


def test_retries_stop_before_the_batch_deadline_with_the_real_error(server: HTTPTestServer) -> None:
    # Always 503, "retry in 1 s"; plenty of retries allowed, but the batch has 2.2 s left. The first retry fits
    # (at ~1.0-1.5 s), a second would not: each URL ends with its 503, never as a timeout of the batch.
    url = server.add_handler("/overloaded", unavailable("1"))
    urls = [f"{url}?i={i}" for i in range(8)]
    settings = ROOMY.replace(fetch_retries=10)

    async def run() -> list[bytes | ItemError]:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch_many(urls, deadline=time.monotonic() + 2.2)

    results = asyncio.run(run())
    assert [code_of(r) for r in results] == [ErrorCode.HTTP_STATUS] * len(urls), results
    for r in results:
        assert "not retried: the server's Retry-After of 1 s is past the" in message_of(r)
        assert "the batch's time budget (IMGQ_TASK_TIME_LIMIT=" in message_of(r)
    assert len(urls) <= server.hits["/overloaded"] <= 2 * len(urls)


def test_back_off_stays_inside_the_fetch_budget(server: HTTPTestServer) -> None:
    url = server.add_handler("/down", unavailable())
    result = fetch_all([url], ROOMY.replace(fetch_retries=50, fetch_timeout_s=1.5))[0]
    if code_of(result) is ErrorCode.TIMEOUT:
        # Only on a machine so loaded that the last retry took over twice as long as the attempt before it: still
        # ended by the budget, and the message says it was a retry of a 503.
        assert "(IMGQ_FETCH_TIMEOUT, retries included); attempt " in message_of(result), result
        assert "the one before ended: " in message_of(result) and "HTTP 503" in message_of(result), result
    else:
        assert code_of(result) is ErrorCode.HTTP_STATUS, result
        assert "no time left for another within this URL's budget (IMGQ_FETCH_TIMEOUT=1.5s)" in message_of(result)
    assert 2 <= server.hits["/down"] < 50  # it did retry, and stopped long before running out of retries


# -- IMGQ_PER_HOST_RPS in one process ----------------------------------------------------------------------------


def test_turns_past_the_batch_deadline_are_not_taken(server: HTTPTestServer) -> None:
    arrivals: list[float] = []
    url = server.add_handler("/paced", stamped(answer(200, JPEG), arrivals))
    urls = [f"{url}?i={i}" for i in range(12)]
    settings = ROOMY.replace(per_host_rps=2.0)

    async def run() -> list[bytes | ItemError]:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch_many(urls, deadline=time.monotonic() + 2.0)

    results = asyncio.run(run())
    fetched = [r for r in results if r == JPEG]
    late = [r for r in results if isinstance(r, ItemError)]
    assert len(fetched) + len(late) == len(urls) and fetched and late
    assert all(r.code is ErrorCode.TIMEOUT for r in late), late
    assert all("IMGQ_PER_HOST_RPS=2" in r.message or "still downloading" in r.message for r in late), late
    assert len(arrivals) <= 5  # turns at 0, 0.5, 1.0, 1.5, 2.0 s: the rest were never sent
    assert_paced(arrivals, 2.0, slack_s=0.3, min_gap=2)


# -- through a real worker -----------------------------------------------------------------------------------


def test_a_flaky_site_ends_every_url_labelled_after_its_retries(
        make_cluster: Callable[..., Cluster], image_site: ImageSite) -> None:
    chosen = sorted(image_site.truth)[:12]
    with HTTPTestServer() as site:
        urls, expected_label = [], {}
        for i, original in enumerate(chosen):
            body = (image_site.root / original.removeprefix(image_site.base + "/")).read_bytes()
            kinds = [KINDS[i % 3], KINDS[(i + 1) % 3]]  # two different failures, then the image
            url = site.add_handler(f"/flaky/{i}", flaky([make() for _, make in kinds], answer(200, body)))
            urls.append(url)
            expected_label[url] = image_site.truth[original]
        missing = site.add_handler("/missing", answer(404))
        go_away = site.add_handler("/go-away", too_many("3600"))
        cluster = make_cluster(**ROOMY_ENV)
        port = free_port()
        cluster.start_worker(IMGQ_METRICS_PORT=str(port))
        cluster.wait_ready()
        started = time.monotonic()
        job = cluster.submit([*urls, missing, go_away])  # one batch (IMGQ_BATCH_SIZE=16)
        cluster.wait(job, timeout_s=120)
        report("flaky site, 14 URLs in one batch: submit to done", time.monotonic() - started)
        results = every_index_once(cluster, job, len(urls) + 2)

        for r in results[:len(urls)]:
            assert r["error"] is None and r["label"] == expected_label[str(r["url"])], r
            assert site.hits[str(r["url"]).removeprefix(site.url(""))] == 3  # failed twice, served the third time
        gone, refused = results[-2]["error"], results[-1]["error"]
        assert isinstance(gone, dict) and isinstance(refused, dict)
        assert gone["code"] == "http_status" and str(gone["message"]).endswith("HTTP 404 Not Found")
        assert refused["code"] == "http_status" and "Retry-After of 3600 s is past" in str(refused["message"])
        assert site.hits["/missing"] == 1 and site.hits["/go-away"] == 1

    # Delivered once: the retries stayed inside the batch's bound, nothing was redelivered.
    assert list(cluster.store.delivery_counts(job).values()) == [1]
    metrics = scrape(port)
    counted = {reason: metrics.get(("imgq_fetch_retries_total", (("reason", reason),)), 0.0) for reason, _ in KINDS}
    assert counted == {reason: 2 * len(urls) / 3 for reason, _ in KINDS}


def test_per_host_rps_paces_a_worker(make_cluster: Callable[..., Cluster], image_site: ImageSite) -> None:
    rps, n = 5.0, 20
    original, label = next(iter(sorted(image_site.truth.items())))
    body = (image_site.root / original.removeprefix(image_site.base + "/")).read_bytes()
    arrivals: list[float] = []
    with HTTPTestServer() as site:
        url = site.add_handler("/paced.png", stamped(answer(200, body), arrivals))
        cluster = make_cluster(**ROOMY_ENV, IMGQ_PER_HOST_RPS=f"{rps:g}")
        cluster.start_worker()
        cluster.wait_ready()
        job = cluster.submit([f"{url}?i={i}" for i in range(n)])  # two batches, fetched at once by one process
        cluster.wait(job, timeout_s=120)
        results = every_index_once(cluster, job, n)
    assert all(r["error"] is None and r["label"] == label for r in results), results
    assert len(arrivals) == n
    report(f"{n} URLs to one host at IMGQ_PER_HOST_RPS={rps:g}: first to last request", max(arrivals) - min(arrivals))
    assert_paced(sorted(arrivals), rps)
    # Unpaced, 20 loopback requests arrive within a fraction of a second; paced, they span (n-1)/rps = 3.8 s.
    assert max(arrivals) - min(arrivals) >= (n - 1) / rps - 1.0
