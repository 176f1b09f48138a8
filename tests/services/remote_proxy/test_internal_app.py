"""The remote-proxy's internal API over real sockets: hypercorn serving the app on
127.0.0.1:0, a relay listener and our agent (``TunnelClient``) on the same ``ProxyState``,
and a local hypercorn server behind the agent -- all in this process.

Waits are on events, hooks and ``InFlight.wait_idle``, each bounded.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import re
from datetime import datetime
from functools import partial

import h11
import pytest
import trio
import trio.testing
from support.data import pattern, pattern_pieces, pattern_sha256
from support.internalapi import (
    AUTH,
    DEVICE,
    SECRET,
    Proxy,
    ProxyLocalServer,
    call,
    caller_websocket,
    connect_agent,
    download_digest,
    json_of,
    refused_websocket,
    start_proxy,
    start_proxy_local_server,
    upload_pattern,
    with_config,
)
from support.pyagent import PyAgent
from support.pyrelay import MEMORY_BOUND, traced_peak
from support.tunnelhttp import (
    HttpExchange,
    HttpResponse,
    MiB,
    closed_port,
    h2_request,
    hang_up_mid_download,
    http_exchange,
    serve_on_loopback,
)
from trio_websocket import ConnectionClosed

from visiona_services.common.http import Receive, Scope, Send
from visiona_services.common.logs import json_handler
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.internal_app import (
    RAW_ROUTES,
    InternalMiddleware,
    RawRoute,
    create_internal_app,
)
from visiona_services.remote_proxy.state import ProxyState
from visiona_tunnel.agent_stream import UNREACHABLE_BODY

#: Upper bound for one test body.
TEST_TIMEOUT = 30.0
FORWARD = f"/internal/forward/{DEVICE}"
FORWARD_WS = f"/internal/forward-ws/{DEVICE}"


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> Proxy:
    return await start_proxy(nursery)


@pytest.fixture
async def local(nursery: trio.Nursery) -> ProxyLocalServer:
    return await start_proxy_local_server(nursery)


@pytest.fixture
async def agent(nursery: trio.Nursery, proxy: Proxy, local: ProxyLocalServer) -> PyAgent:
    return await connect_agent(nursery, proxy, local.port)


def assert_error(response: HttpResponse, status: int, code: str) -> dict[str, str]:
    """``response`` is the error envelope with ``status`` and ``code``; returns the error."""
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    body = json_of(response)
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    error: dict[str, str] = body["error"]
    return error


# -- authentication, over the route table ---------------------------------------------------


def _concrete(rule: str) -> str:
    """``/internal/sessions/<device_id>`` -> ``/internal/sessions/x``."""
    return re.sub(r"<[^>]+>", "x", rule)


def _every_route() -> list[tuple[str, str]]:
    """(method or "WEBSOCKET", path) for every route: Quart's rules and the raw routes."""
    app = create_internal_app(ProxyState.create(ProxyConfig(internal_secret=SECRET)))
    routes = [
        (method, _concrete(rule.rule))
        for rule in app.url_map.iter_rules()
        for method in sorted(rule.methods or ())
    ]
    for raw in RAW_ROUTES:
        methods = ["GET", "POST", "PUT", "DELETE"] if raw.kind == "http" else ["WEBSOCKET"]
        routes += [(method, _concrete(raw.rule)) for method in methods]
    return routes


EVERY_ROUTE = _every_route()
BAD_CREDENTIALS = {
    "missing": [],
    "wrong-secret": [("Authorization", "Bearer not-the-secret")],
    "wrong-scheme": [("Authorization", f"Basic {SECRET}")],
    "two-headers": [AUTH, AUTH],
}


def test_the_route_table_has_every_route() -> None:
    paths = {path for _, path in EVERY_ROUTE}
    assert {"/internal/sessions", "/internal/sessions/x", "/metrics"} <= paths
    assert {"/internal/forward/x/x", "/internal/forward-ws/x/x", "/internal/events"} <= paths


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
@pytest.mark.parametrize(("method", "path"), EVERY_ROUTE, ids=[" ".join(r) for r in EVERY_ROUTE])
async def test_every_route_answers_401_without_the_secret(
    proxy: Proxy, method: str, path: str, credentials: list[tuple[str, str]]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        if method == "WEBSOCKET":
            upgrade = [
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ]
            response = await call(
                proxy.port, "GET", path, headers=[*upgrade, *credentials], auth=False
            )
        else:
            response = await call(proxy.port, method, path, headers=credentials, auth=False)
    assert response.status == 401
    assert response.headers["www-authenticate"] == "Bearer"
    if method != "HEAD":
        assert_error(response, 401, "UNAUTHORIZED")


async def test_unknown_route_is_a_404_envelope(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/internal/nothing-here")
    assert_error(response, 404, "NOT_FOUND")


async def test_wrong_method_is_a_405_envelope_with_allow(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "POST", "/internal/sessions")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in response.headers["allow"]


# -- request ids ----------------------------------------------------------------------------


async def test_a_sane_request_id_is_returned_and_in_the_envelope(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(
            proxy.port, "GET", "/internal/sessions/nobody", headers=[("X-Request-ID", "req.1_a-B")]
        )
    assert response.headers["x-request-id"] == "req.1_a-B"
    assert assert_error(response, 404, "SESSION_NOT_FOUND")["request_id"] == "req.1_a-B"


@pytest.mark.parametrize("supplied", [None, "x" * 129, "has space", "semi;colon", ""])
async def test_a_request_id_is_generated_when_missing_or_insane(
    proxy: Proxy, supplied: str | None
) -> None:
    headers = [] if supplied is None else [("X-Request-ID", supplied)]
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/internal/sessions", headers=headers)
    assert response.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


async def test_unauthorized_answers_carry_the_request_id(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(
            proxy.port, "GET", "/metrics", headers=[("X-Request-ID", "abc")], auth=False
        )
    assert assert_error(response, 401, "UNAUTHORIZED")["request_id"] == "abc"


async def test_the_request_id_is_forwarded_to_the_device(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(
            proxy.port, "GET", f"{FORWARD}/headers", headers=[("X-Request-ID", "trace-7")]
        )
    assert response.status == 200
    assert ["x-request-id", "trace-7"] in json_of(response)  # the local server lower-cases


async def test_log_lines_during_a_request_carry_its_id(proxy: Proxy) -> None:
    lines = io.StringIO()
    handler = json_handler(lines)
    logged = trio.Event()
    handler.addFilter(lambda record: logged.set() or True)  # the access line ends a request
    access = logging.getLogger("visiona_services.remote_proxy.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        with trio.fail_after(TEST_TIMEOUT):
            await call(proxy.port, "GET", "/internal/sessions", headers=[("X-Request-ID", "r-42")])
            await logged.wait()
    finally:
        access.removeHandler(handler)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [(r["request_id"], r["path"], r["status"]) for r in records] == [
        ("r-42", "/internal/sessions", 200)
    ]


# -- sessions -------------------------------------------------------------------------------


async def test_sessions_lists_the_connected_device(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert (await call(proxy.port, "GET", f"{FORWARD}/hello")).status == 200
        response = await call(proxy.port, "GET", "/internal/sessions")
    assert response.status == 200
    body = json_of(response)
    assert body["success"] is True
    [session] = body["data"]
    assert session["device_id"] == DEVICE
    assert session["connected"] is True
    assert session["remote_address"].startswith("127.0.0.1:")
    assert datetime.fromisoformat(session["since"]).utcoffset() is not None
    assert session["bytes_in"] > 0 and session["bytes_out"] > 0
    assert isinstance(session["open_streams"], int)
    assert session["rtt_ms"] is None or session["rtt_ms"] >= 0


async def test_health_counts_tunnels_and_says_whether_draining(
    proxy: Proxy, agent: PyAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/internal/health")
    assert response.status == 200
    assert json_of(response)["data"] == {"tunnels": 1, "draining": False}


async def test_session_by_device(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", f"/internal/sessions/{DEVICE}")
    assert response.status == 200
    assert json_of(response)["data"]["device_id"] == DEVICE


async def test_a_device_id_with_a_slash_is_looked_up_and_closed_escaped(
    nursery: trio.Nursery, local: ProxyLocalServer
) -> None:
    proxy = await start_proxy(nursery, device="site/cam 1")
    await connect_agent(nursery, proxy, local.port)
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/internal/sessions/site%2Fcam%201")
        assert json_of(response)["data"]["device_id"] == "site/cam 1"
        forwarded = await call(proxy.port, "GET", "/internal/forward/site%2Fcam%201/hello")
        assert forwarded.body == b"hello from local-1"
        response = await call(proxy.port, "DELETE", "/internal/sessions/site%2Fcam%201")
    assert json_of(response)["data"] == {"device_id": "site/cam 1", "closed": True}


async def test_unknown_session_is_404(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/internal/sessions/nobody")
    assert "nobody" in assert_error(response, 404, "SESSION_NOT_FOUND")["message"]


async def test_delete_closes_the_session(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "DELETE", f"/internal/sessions/{DEVICE}")
        assert response.status == 200
        assert json_of(response) == {
            "success": True,
            "data": {"device_id": DEVICE, "closed": True},
        }
        down = await agent.hooks.wait_for("session_down")
        await agent.hooks.wait_for("session_up")  # the agent redials at once
    assert down[1] is not None  # the relay ended it


async def test_delete_unknown_session_is_404(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "DELETE", "/internal/sessions/nobody")
    assert_error(response, 404, "SESSION_NOT_FOUND")


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_count_forwards(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert (await call(proxy.port, "POST", f"{FORWARD}/echo", b"x" * 1000)).status == 200
        assert (await call(proxy.port, "GET", f"{FORWARD}/status/404")).status == 404
        assert (await call(proxy.port, "GET", "/internal/forward/nobody/x")).status == 502
        response = await call(proxy.port, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.body.decode()
    for line in [  # prometheus-client writes every value as a float
        'visiona_forward_requests_total{status="200"} 1.0',
        'visiona_forward_requests_total{status="404"} 1.0',
        'visiona_forward_requests_total{status="502"} 1.0',
        "visiona_forward_duration_seconds_count 2.0",
        "visiona_forward_request_bytes_total 1000.0",
        "visiona_tunnel_sessions 1.0",
    ]:
        assert line in text.splitlines(), line
    assert re.search(r"^visiona_forward_response_bytes_total (\d+)\.0$", text, re.M)
    assert "_created" not in text


async def test_metrics_in_openmetrics_when_asked_for(proxy: Proxy) -> None:
    accept = ("Accept", "application/openmetrics-text;version=1.0.0;q=0.6,*/*;q=0.2")
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/metrics", headers=[accept])
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    text = response.body.decode()
    assert "# TYPE visiona_tunnel_connects counter" in text
    assert "visiona_tunnel_connects_total 0.0" in text.splitlines()
    assert text.endswith("# EOF\n") and "_created" not in text


async def test_metrics_show_the_garbage_collectors_pauses(proxy: Proxy) -> None:
    gc.collect()  # a full collection, timed by the hook
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/metrics")
    lines = response.body.decode().splitlines()
    assert "# TYPE visiona_gc_longest_pause_seconds gauge" in lines
    longest = proxy.state.metrics.value("visiona_gc_longest_pause_seconds", generation="2")
    total = proxy.state.metrics.value("visiona_gc_pause_seconds_total", generation="2")
    assert 0 < longest <= total


async def test_tunnel_byte_totals_keep_counting_after_a_tunnel_ends(
    proxy: Proxy, agent: PyAgent
) -> None:
    names = ("visiona_tunnel_received_bytes_total", "visiona_tunnel_sent_bytes_total")
    with trio.fail_after(TEST_TIMEOUT):
        assert (await call(proxy.port, "POST", f"{FORWARD}/echo", b"x" * 100_000)).status == 200
        before = [proxy.state.metrics.value(name) for name in names]
        assert (await call(proxy.port, "DELETE", f"/internal/sessions/{DEVICE}")).status == 200
        await agent.hooks.wait_for("session_down")
        after = [proxy.state.metrics.value(name) for name in names]
    assert all(b > 100_000 for b in before)
    assert [a >= b for a, b in zip(after, before, strict=True)] == [True, True]


# -- HTTP forwarding ------------------------------------------------------------------------


async def test_forward_keeps_the_escaped_path_and_query_byte_exact(
    proxy: Proxy, agent: PyAgent
) -> None:
    path, query = "/target/a%2Fb%20c/%7E/%C3%A9//end", "x=1&y=%2F&z=a+b&&w"
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", f"{FORWARD}{path}?{query}")
    assert response.status == 200
    assert json_of(response) == {"raw_path": path, "query": query}


async def test_forward_of_the_bare_device_path_is_root(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", f"{FORWARD}/")
    assert (response.status, response.body) == (404, b"no such route")  # the local server's


async def test_forward_head_keeps_the_length_without_a_body(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "HEAD", f"{FORWARD}/hello")
    assert (response.status, response.body) == (200, b"")
    assert response.headers["content-length"] == str(len(b"hello from local-1"))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_forward_post_echoes_the_body(proxy: Proxy, agent: PyAgent, chunked: bool) -> None:
    body = pattern(3, 3 * MiB + 17)
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "POST", f"{FORWARD}/echo", body, chunked=chunked)
    assert (response.status, response.body == body) == (200, True)


async def test_a_request_with_both_framings_is_forwarded_chunked_and_the_connection_closes(
    proxy: Proxy, agent: PyAgent
) -> None:
    # RFC 9112 6.1: Transfer-Encoding wins, and the connection must not be reused; the
    # pipelined second request is never answered.
    head = (
        f"POST {FORWARD}/echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SECRET}\r\n"
        "transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
    ).encode()
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    second = f"GET /internal/health HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SECRET}\r\n\r\n"
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))  # to expect one
    events: list[h11.Event] = []
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(head + body + second.encode())
            while data := await stream.receive_some():
                client.receive_data(data)
                while isinstance(event := client.next_event(), h11.Event):
                    events.append(event)
    responses = [event for event in events if isinstance(event, h11.Response)]
    assert [response.status_code for response in responses] == [200]
    assert (b"connection", b"close") in responses[0].headers
    echoed = b"".join(bytes(event.data) for event in events if isinstance(event, h11.Data))
    assert echoed == b"hello world"


@pytest.mark.parametrize("status", [201, 204, 301, 304, 400, 404, 418, 500, 503])
async def test_forward_passes_the_status_through(proxy: Proxy, agent: PyAgent, status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", f"{FORWARD}/status/{status}")
    assert response.status == status
    assert response.body == (b"" if status in (204, 304) else f"status {status}".encode())
    if 300 <= status < 400:
        assert response.headers["location"] == "/hello"


async def test_forward_passes_request_headers_minus_ours_and_hop_by_hop(
    proxy: Proxy, agent: PyAgent
) -> None:
    headers = [
        ("X-One", "1"),
        ("x-two", "a"),
        ("x-two", "b"),
        ("Connection", "close, X-Hop-Named"),
        ("X-Hop-Named", "gone"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic eA=="),
    ]
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", f"{FORWARD}/headers", headers=headers)
    assert response.status == 200
    seen = [(name.lower(), value) for name, value in json_of(response)]  # lower-cased there
    names = [name for name, _ in seen]
    assert [p for p in seen if p[0] in ("x-one", "x-two")] == [
        ("x-one", "1"),
        ("x-two", "a"),
        ("x-two", "b"),
    ]
    for gone in ("x-hop-named", "keep-alive", "te", "proxy-authorization", "authorization"):
        assert gone not in names
    assert ("host", "localhost") in seen
    assert SECRET not in response.body.decode()


async def test_forward_passes_response_headers_minus_hop_by_hop(
    proxy: Proxy, agent: PyAgent, local: ProxyLocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        direct = await call(local.port, "GET", "/hop", auth=False)
        response = await call(proxy.port, "GET", f"{FORWARD}/hop")
    assert {"keep-alive", "x-hop-named", "proxy-authenticate"} <= direct.headers.keys()
    assert (response.status, response.body) == (200, b"hop")
    assert response.headers["x-kept"] == "yes"
    assert not {"keep-alive", "x-hop-named", "proxy-authenticate"} & response.headers.keys()


async def test_forward_keeps_header_case_and_repeats(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with http_exchange(proxy.port) as exchange:
            await exchange.send_request(
                "GET", f"{FORWARD}/headers", headers=[("connection", "close"), AUTH]
            )
            head = await exchange.receive_response()
    raw = head.headers.raw_items()
    assert (b"X-Custom", b"Value") in raw
    assert [v for n, v in raw if n.lower() == b"set-cookie"] == [b"a=1", b"b=2"]


async def test_download_100_mib_is_byte_exact_with_bounded_memory(
    proxy: Proxy, agent: PyAgent
) -> None:
    size = 100 * MiB
    async with traced_peak() as peak:
        response = await download_digest(proxy.port, f"{FORWARD}/bytes/{size}")
    assert response.status == 200
    assert (response.size, response.sha256) == (size, pattern_sha256(size))
    assert peak[0] < MEMORY_BOUND, f"peak {peak[0] / MiB:.1f} MiB"


async def test_upload_100_mib_is_byte_exact_with_bounded_memory(
    proxy: Proxy, agent: PyAgent
) -> None:
    size = 100 * MiB
    async with traced_peak() as peak:
        response = await upload_pattern(proxy.port, f"{FORWARD}/sha256", size)
    assert response.status == 200
    assert response.body == f"{size} {pattern_sha256(size)}".encode()
    assert peak[0] < MEMORY_BOUND, f"peak {peak[0] / MiB:.1f} MiB"


async def test_200_slow_forwards_run_concurrently(
    proxy: Proxy, agent: PyAgent, local: ProxyLocalServer
) -> None:
    # Each request stays 2 s at the device, so that on a loaded machine the 200 still
    # overlap (at 500 ms one CI run saw 99 at once).
    count, delay_ms = 200, 2000
    statuses: list[int] = []

    async def one() -> None:
        response = await call(proxy.port, "GET", f"{FORWARD}/slow?ms={delay_ms}")
        assert response.body == f"slept {delay_ms}".encode()
        statuses.append(response.status)

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    assert statuses == [200] * count
    assert local.app.slow_peak >= count // 2, f"at most {local.app.slow_peak} at once"


async def test_the_agents_502_for_an_unreachable_local_server_passes_through(
    nursery: trio.Nursery, proxy: Proxy
) -> None:
    await connect_agent(nursery, proxy, closed_port())
    with trio.fail_after(TEST_TIMEOUT):
        http = await call(proxy.port, "GET", f"{FORWARD}/hello")
        ws = await refused_websocket(proxy.port, f"{FORWARD_WS}/ws/echo")
    assert (http.status, http.body) == (502, UNREACHABLE_BODY)
    assert (ws.status, ws.body) == (502, UNREACHABLE_BODY)
    assert ws.headers["content-type"].startswith("text/plain")


async def test_no_session_is_502_tunnel_disconnected(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", "/internal/forward/nobody/hello")
    assert "nobody" in assert_error(response, 502, "TUNNEL_DISCONNECTED")["message"]


async def test_slow_agent_is_504_tunnel_timeout(proxy: Proxy, agent: PyAgent) -> None:
    with_config(proxy, forward_timeout=0.3)
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", f"{FORWARD}/slow?ms=20000")
        assert_error(response, 504, "TUNNEL_TIMEOUT")
        with_config(proxy, forward_timeout=30.0)
        assert (await call(proxy.port, "GET", f"{FORWARD}/hello")).status == 200


async def test_slow_agent_after_an_upload_is_504_tunnel_timeout(
    proxy: Proxy, agent: PyAgent
) -> None:
    with_config(proxy, forward_timeout=0.3)
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "POST", f"{FORWARD}/slow?ms=20000", b"x" * 100_000)
    assert_error(response, 504, "TUNNEL_TIMEOUT")


async def test_forward_timeout_does_not_count_a_slow_caller_or_a_long_upload(
    proxy: Proxy, agent: PyAgent
) -> None:
    with_config(proxy, forward_timeout=0.2)
    size = 40 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        # The caller stops for longer than the timeout (a deliberately slow caller, not
        # a synchronisation), and the whole upload takes longer than it too.
        response = await upload_pattern(proxy.port, f"{FORWARD}/sha256", size, pause=(8, 0.5))
    assert (response.status, response.body) == (200, f"{size} {pattern_sha256(size)}".encode())


async def test_tunnel_lost_before_the_head_is_502_tunnel_error(
    proxy: Proxy, agent: PyAgent, local: ProxyLocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            result: list[HttpResponse] = []

            async def slow() -> None:
                result.append(await call(proxy.port, "GET", f"{FORWARD}/slow?ms=20000"))

            nursery.start_soon(slow)
            await local.app.slow_started.wait()
            agent.client.stop()
    assert_error(result[0], 502, "TUNNEL_ERROR")


async def test_tunnel_lost_mid_body_ends_the_response_short(proxy: Proxy, agent: PyAgent) -> None:
    size = 1024 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        async with http_exchange(proxy.port) as exchange:
            await exchange.send_request(
                "GET", f"{FORWARD}/bytes/{size}?cl=1", headers=[("connection", "close"), AUTH]
            )
            assert (await exchange.receive_response()).status_code == 200
            received = 0
            while received < MiB:
                received += len(await exchange.receive_body_piece())
            agent.client.stop()
            with pytest.raises(h11.RemoteProtocolError):
                while await exchange.receive_body_piece():
                    pass


async def _send_until_blocked(
    exchange: HttpExchange, target: str, size: int, *, auth: bool = True
) -> None:
    """POST ``target`` with a ``size``-byte Content-Length, then body bytes until the
    connection is closed under us."""
    headers = [("connection", "close"), ("content-length", str(size)), *([AUTH] if auth else [])]
    await exchange.send_request("POST", target, headers=headers, end=False)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for piece in pattern_pieces(size):
            await exchange.send_body_piece(piece)


@pytest.mark.parametrize(
    ("target", "auth", "status"),
    [(f"{FORWARD}/echo", False, 401), ("/internal/forward/nobody/echo", True, 502)],
)
async def test_a_refused_upload_gets_its_answer_then_the_connection_closes(
    proxy: Proxy, target: str, auth: bool, status: int
) -> None:
    # Answered before its body was read: the caller gets the answer, then the connection
    # closes (it cannot carry another request).
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery, http_exchange(proxy.port) as exchange:
            nursery.start_soon(partial(_send_until_blocked, auth=auth), exchange, target, 64 * MiB)
            assert (await exchange.receive_whole_response()).status == status
            assert isinstance(await exchange.next_event(), h11.ConnectionClosed)


async def test_a_raw_route_failing_after_the_head_still_ends_the_connection(
    nursery: trio.Nursery,
) -> None:
    failing = trio.Event()

    async def fail_after_the_head(
        state: ProxyState, scope: Scope, receive: Receive, send: Send, device: str, path: bytes
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await failing.wait()
        raise RuntimeError("a failure after the head")

    async def lifespan_only(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    state = ProxyState.create(ProxyConfig(internal_secret=SECRET))
    route = RawRoute("http", "/boom/<device_id>/<path:path>", b"/boom/", fail_after_the_head)
    port = await serve_on_loopback(nursery, InternalMiddleware(state, lifespan_only, (route,)))
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as senders, http_exchange(port) as exchange:
            senders.start_soon(_send_until_blocked, exchange, "/boom/d/x", 64 * MiB)
            assert (await exchange.receive_response()).status_code == 200
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # the upload is stuck
            failing.set()
            with pytest.raises(h11.RemoteProtocolError):  # no end: the body is cut
                await exchange.receive_body_piece()
            senders.cancel_scope.cancel()


async def test_caller_leaving_during_a_stalled_upload_ends_the_forward(
    proxy: Proxy, agent: PyAgent
) -> None:
    # The local server never reads: the upload fills the tunnel's window, then hypercorn's
    # queue of request messages, then the sockets; then the caller leaves.
    with_config(proxy, forward_timeout=0.5)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery, http_exchange(proxy.port) as exchange:
            nursery.start_soon(_send_until_blocked, exchange, f"{FORWARD}/stall", 1024 * MiB)
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            await exchange.stream.aclose()
        await proxy.state.inflight.wait_idle()
        response = await call(proxy.port, "GET", f"{FORWARD}/hello")
    assert (response.status, response.body) == (200, b"hello from local-1")


async def test_a_response_that_moves_is_not_cut_while_the_agent_ignores_the_upload(
    proxy: Proxy, agent: PyAgent
) -> None:
    # The local server answers at once and never reads the request's body.
    with_config(proxy, forward_timeout=0.5)
    size = 256 * MiB  # takes longer than the timeout
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery, http_exchange(proxy.port) as exchange:
            nursery.start_soon(_send_until_blocked, exchange, f"{FORWARD}/bytes/{size}", 64 * MiB)
            assert (await exchange.receive_response()).status_code == 200
            received = 0
            while piece := await exchange.receive_body_piece():
                received += len(piece)
            nursery.cancel_scope.cancel()
    assert received == size


async def test_a_stuck_upload_and_a_still_response_cut_the_response(
    proxy: Proxy, agent: PyAgent
) -> None:
    # The local server answers a head and one byte, then neither reads the request's body
    # nor sends more: neither direction moves.
    with_config(proxy, forward_timeout=0.3)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery, http_exchange(proxy.port) as exchange:
            target = f"{FORWARD}/stall-after-head"
            nursery.start_soon(_send_until_blocked, exchange, target, 64 * MiB)
            assert (await exchange.receive_response()).status_code == 200
            assert await exchange.receive_body_piece() == b"x"
            # Cut; the connection closes once the caller's upload is drained.
            with pytest.raises(h11.RemoteProtocolError):
                await exchange.receive_body_piece()
            nursery.cancel_scope.cancel()
        await proxy.state.inflight.wait_idle()


async def test_an_http2_request_body_without_a_length_is_forwarded(
    proxy: Proxy, agent: PyAgent
) -> None:
    # hypercorn speaks h2c (prior knowledge) on the internal listener too.
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "proxy"),
        (":path", f"{FORWARD}/echo"),
        ("authorization", AUTH[1]),
    ]
    with trio.fail_after(TEST_TIMEOUT):
        status, body = await h2_request(proxy.port, request, b"important-payload")
    assert (status, body) == (200, b"important-payload")


async def test_the_request_id_appears_once_when_the_device_echoes_it(
    proxy: Proxy, agent: PyAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(
            proxy.port, "GET", f"{FORWARD}/request-id", headers=[("X-Request-ID", "abc-123")]
        )
    assert response.status == 200
    assert [v for n, v in response.header_list if n == "x-request-id"] == ["abc-123"]


async def test_caller_leaving_mid_download_resets_the_agent_stream(
    proxy: Proxy, agent: PyAgent, local: ProxyLocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="visiona_services.remote_proxy.forward")
    with trio.fail_after(TEST_TIMEOUT):
        status = await hang_up_mid_download(
            proxy.port, f"{FORWARD}/bytes/{1024 * MiB}", headers=[("connection", "close"), AUTH]
        )
        assert status == 200
        # The connection is closed: the proxy resets the stream, the agent drops the
        # local request, the local server sees the disconnect.
        await local.app.download_aborted.wait()
        await proxy.state.inflight.wait_idle()
        response = await call(proxy.port, "GET", f"{FORWARD}/hello")
    assert (response.status, response.body) == (200, b"hello from local-1")
    assert proxy.state.metrics.value("visiona_forward_requests_total", status="200") >= 1
    gone = [record for record in caplog.records if record.getMessage() == "caller went away"]
    assert len(gone) == 1  # the download left early; the GET that got its answer did not


async def test_a_caller_that_hangs_up_after_its_answer_has_not_gone_away(
    proxy: Proxy, agent: PyAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="visiona_services.remote_proxy.forward")
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(20):
            response = await call(proxy.port, "GET", f"{FORWARD}/hello")
            assert response.status == 200
        await proxy.state.inflight.wait_idle()
    assert not [record for record in caplog.records if record.getMessage() == "caller went away"]


async def test_draining_refuses_new_forwards_and_waits_for_running_ones(
    proxy: Proxy, agent: PyAgent
) -> None:
    size = 8 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        async with http_exchange(proxy.port) as exchange:
            await exchange.send_request(
                "GET", f"{FORWARD}/bytes/{size}", headers=[("connection", "close"), AUTH]
            )
            assert (await exchange.receive_response()).status_code == 200
            assert proxy.state.inflight.count == 1
            proxy.state.draining.set()
            refused = await call(proxy.port, "GET", f"{FORWARD}/hello")
            assert_error(refused, 503, "SHUTTING_DOWN")
            assert proxy.state.inflight.count == 1  # the running one goes on
            received = 0
            while piece := await exchange.receive_body_piece():
                received += len(piece)
        assert received == size
        await proxy.state.inflight.wait_idle()


# -- WebSocket forwarding -------------------------------------------------------------------


async def test_websocket_echoes_text_and_bytes(proxy: Proxy, agent: PyAgent) -> None:
    big = pattern(1, 3 * MiB)
    with trio.fail_after(TEST_TIMEOUT):
        async with caller_websocket(proxy.port, f"{FORWARD_WS}/ws/echo") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01bytes")
            assert await ws.get_message() == b"\x00\x01bytes"
            await ws.send_message(big)
            assert await ws.get_message() == big


async def test_websocket_close_code_of_the_local_server_reaches_the_caller(
    proxy: Proxy, agent: PyAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with caller_websocket(proxy.port, f"{FORWARD_WS}/ws/echo") as ws:
            await ws.send_message("close-4002")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (4002, "bye")


async def test_websocket_caller_closing_closes_the_local_side(
    proxy: Proxy, agent: PyAgent, local: ProxyLocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with caller_websocket(proxy.port, f"{FORWARD_WS}/ws/echo") as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
        await local.app.ws_disconnected.wait()


async def test_websocket_refused_by_the_local_server_passes_its_status(
    proxy: Proxy, agent: PyAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await refused_websocket(proxy.port, f"{FORWARD_WS}/ws/nowhere")
    assert response.status == 403  # hypercorn's answer to a close before accept


async def test_websocket_refusal_with_an_endless_body_is_502(nursery: trio.Nursery) -> None:
    async def refuse_endlessly(stream: trio.SocketStream) -> None:
        await stream.receive_some(64 * 1024)  # the handshake request
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 1000000000\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError):
            while True:
                await stream.send_all(b"x" * 65536)

    listeners = await nursery.start(partial(trio.serve_tcp, refuse_endlessly, 0, host="127.0.0.1"))
    proxy = await start_proxy(nursery, forward_timeout=20.0)
    await connect_agent(nursery, proxy, listeners[0].socket.getsockname()[1])
    with trio.fail_after(TEST_TIMEOUT):
        refused = await refused_websocket(proxy.port, f"{FORWARD_WS}/ws")
    assert "handshake answer" in assert_error(refused, 502, "TUNNEL_ERROR")["message"]


async def test_websocket_caller_leaving_during_the_handshake_ends_it(
    nursery: trio.Nursery,
) -> None:
    local_asked, local_gone = trio.Event(), trio.Event()

    async def never_answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(64 * 1024):
                local_asked.set()
        local_gone.set()

    listeners = await nursery.start(partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1"))
    proxy = await start_proxy(nursery, forward_timeout=60.0)
    await connect_agent(nursery, proxy, listeners[0].socket.getsockname()[1])
    upgrade = (
        f"GET {FORWARD_WS}/ws HTTP/1.1\r\nHost: proxy\r\nAuthorization: {AUTH[1]}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with trio.fail_after(TEST_TIMEOUT):
        caller = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await caller.send_all(upgrade.encode())
        await local_asked.wait()  # the handshake is under way
        await caller.aclose()
        await local_gone.wait()  # long before the forward timeout
    assert proxy.state.metrics.value("visiona_forward_requests_total", status="499") == 1


async def test_websocket_without_session_is_502(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await refused_websocket(proxy.port, "/internal/forward-ws/nobody/ws/echo")
    assert_error(response, 502, "TUNNEL_DISCONNECTED")


async def test_websocket_to_an_unknown_route_is_404(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await refused_websocket(proxy.port, "/internal/sessions")
    assert_error(response, 404, "NOT_FOUND")


async def test_websocket_closes_1011_when_the_tunnel_breaks(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with caller_websocket(proxy.port, f"{FORWARD_WS}/ws/echo") as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            agent.client.stop()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1011


async def test_websocket_closes_1001_when_draining(proxy: Proxy, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with caller_websocket(proxy.port, f"{FORWARD_WS}/ws/echo") as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            proxy.state.draining.set()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            refused = await refused_websocket(proxy.port, f"{FORWARD_WS}/ws/echo")
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1001
    assert_error(refused, 503, "SHUTTING_DOWN")
