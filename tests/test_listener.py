"""The library's tunnel listener (``serve_tunnel_listener``): what an agent's upgrade and a
plain request are answered with, with the default hooks and with a service's."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from support.tunnelhttp import http_request

from visiona_tunnel import (
    Answer,
    ListenerRequest,
    Refusal,
    TokenVerifier,
    TunnelRegistry,
    VerifierUnavailable,
    admit_with,
    serve_tunnel_listener,
)
from visiona_tunnel.limits import AttemptLimit
from visiona_tunnel.listener import Admit
from visiona_tunnel.relay import TunnelDown
from visiona_tunnel.wsconn import (
    CLOSE_REPLACED,
    WebSocketClosed,
    WebSocketRejected,
    WebSocketStream,
    client_handshake,
    connect_websocket_stream,
)

TIMEOUT = 10.0


async def anyone(token: str) -> str | None:
    await trio.lowlevel.checkpoint()
    return "device"


@contextlib.asynccontextmanager
async def listening(admit: Admit, **options: Any) -> AsyncIterator[int]:
    """The listener on 127.0.0.1; its port."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_tunnel_listener, TunnelRegistry(), admit, host="127.0.0.1", port=0, **options
        )
        urls: list[str] = await nursery.start(serve)
        yield int(urls[0].rsplit(":", 1)[1])
        nursery.cancel_scope.cancel()


async def refuse_upgrade(admit: Admit, target: str, **options: Any) -> WebSocketRejected:
    async with listening(admit, **options) as port:
        with trio.fail_after(TIMEOUT), pytest.raises(WebSocketRejected) as raised:
            await connect_websocket_stream(f"ws://127.0.0.1:{port}{target}")
    return raised.value


async def test_a_verifier_that_cannot_answer_gets_503_and_the_listener_goes_on() -> None:
    async def unavailable(token: str) -> str | None:
        raise VerifierUnavailable("backend down")

    refused = await refuse_upgrade(admit_with(unavailable), "/tunnel/connect?token=t")
    assert refused.status_code == 503
    assert (b"retry-after", b"5") in refused.headers


async def test_an_unknown_token_gets_401_with_a_bearer_challenge() -> None:
    async def nobody(token: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    refused = await refuse_upgrade(admit_with(nobody), "/tunnel/connect?token=t")
    assert refused.status_code == 401
    assert refused.body == b"a valid device token is required\n"
    assert (b"www-authenticate", b'Bearer realm="visiona-tunnel"') in refused.headers


async def test_no_token_gets_401_without_asking_the_verifier() -> None:
    asked: list[str] = []

    async def recording(token: str) -> str | None:
        asked.append(token)
        return await anyone(token)

    refused = await refuse_upgrade(admit_with(recording), "/tunnel/connect")
    assert (refused.status_code, asked) == (401, [])


async def test_another_path_gets_404() -> None:
    refused = await refuse_upgrade(admit_with(anyone), "/elsewhere?token=t")
    assert refused.status_code == 404


async def test_an_admit_that_does_not_answer_in_time_gets_503() -> None:
    async def stuck(request: ListenerRequest) -> str | Refusal:
        await trio.sleep_forever()
        raise AssertionError

    refused = await refuse_upgrade(stuck, "/tunnel/connect?token=t", admit_timeout=0.05)
    assert refused.status_code == 503


async def test_admit_sees_the_request_and_its_token() -> None:
    seen: list[ListenerRequest] = []

    async def refuse(request: ListenerRequest) -> str | Refusal:
        seen.append(request)
        await trio.lowlevel.checkpoint()
        return Refusal(403, "FORBIDDEN", "not you")

    refused = await refuse_upgrade(refuse, "/tunnel/connect?token=abc&x=1")
    assert refused.status_code == 403
    (request,) = seen
    assert (request.method, request.path, request.token) == ("GET", "/tunnel/connect", "abc")
    assert request.remote is not None and request.remote.startswith("127.0.0.1:")


async def test_a_route_answers_get_and_head_and_refuses_other_methods() -> None:
    async def health(request: ListenerRequest) -> Answer:
        await trio.lowlevel.checkpoint()
        return Answer(200, b"ok\n", ((b"content-type", b"text/plain"),))

    async with listening(admit_with(anyone), routes={"/healthz": health}) as port:
        got = await http_request(port, "GET", "/healthz")
        head = await http_request(port, "HEAD", "/healthz")
        posted = await http_request(port, "POST", "/healthz", b"")
    assert (got.status, got.body) == (200, b"ok\n")
    assert (head.status, head.body) == (200, b"")
    assert posted.status == 405
    assert posted.headers["allow"] == "GET, HEAD"


async def test_the_tunnel_path_without_an_upgrade_gets_426() -> None:
    async with listening(admit_with(anyone)) as port:
        response = await http_request(port, "GET", "/tunnel/connect")
    assert response.status == 426
    assert response.headers["upgrade"] == "websocket"


async def test_render_and_request_scope_shape_every_answer() -> None:
    def envelope(refusal: Refusal) -> Answer:
        body = f'{{"code": "{refusal.code}"}}'.encode()
        return Answer(refusal.status, body, ((b"content-type", b"application/json"),))

    @contextlib.contextmanager
    def request_id(request: ListenerRequest) -> Iterator[Sequence[tuple[bytes, bytes]]]:
        yield ((b"x-request-id", b"r-1"),)

    options: dict[str, Any] = {"render": envelope, "request_scope": request_id}
    async with listening(admit_with(anyone), **options) as port:
        missing = await http_request(port, "GET", "/nowhere")
    assert (missing.status, missing.body) == (404, b'{"code": "NOT_FOUND"}')
    assert missing.headers["x-request-id"] == "r-1"
    refused = await refuse_upgrade(admit_with(anyone), "/nowhere", **options)
    assert refused.body == b'{"code": "NOT_FOUND"}'
    assert (b"x-request-id", b"r-1") in refused.headers


async def test_a_malformed_request_gets_400_and_the_connection_ends() -> None:
    async with listening(admit_with(anyone)) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"NOT HTTP\r\n\r\n")
            received = b""
            with trio.fail_after(TIMEOUT):
                while chunk := await stream.receive_some(1024):
                    received += chunk
    assert received.startswith(b"HTTP/1.1 400 ")


def test_a_token_verifier_is_the_readme_s_admit() -> None:
    verify: TokenVerifier = anyone
    assert callable(admit_with(verify))


# -- bounds against hostile peers ---------------------------------------------------------------


async def dial_from(source: str, port: int, target: str) -> WebSocketRejected | WebSocketStream:
    """A WebSocket upgrade to 127.0.0.1:``port`` from the loopback address ``source``."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    try:
        return await client_handshake(stream, "127.0.0.1", target)
    except WebSocketRejected as rejected:
        await stream.aclose()
        return rejected


async def test_refused_attempts_past_the_limit_get_429_before_the_verifier_is_asked() -> None:
    asked: list[str] = []

    async def verify(token: str) -> str | None:
        asked.append(token)
        await trio.lowlevel.checkpoint()
        return "device" if token == "good" else None

    limit = AttemptLimit(burst=3, per_minute=1.0)
    async with listening(admit_with(verify), attempt_limit=limit) as port:
        with trio.fail_after(TIMEOUT):
            answers = [
                await dial_from("127.0.0.1", port, "/tunnel/connect?token=bad") for _ in range(3)
            ]
            assert [a.status_code for a in answers if isinstance(a, WebSocketRejected)] == [401] * 3
            over = await dial_from("127.0.0.1", port, "/tunnel/connect?token=good")
            assert isinstance(over, WebSocketRejected) and over.status_code == 429
            retry_after = int(dict(over.headers)[b"retry-after"])
            assert 1 <= retry_after <= 60
            assert asked == ["bad"] * 3  # the guess over the limit never reached it
            # Another address is not held back.
            elsewhere = await dial_from("127.0.0.2", port, "/tunnel/connect?token=good")
            assert isinstance(elsewhere, WebSocketStream)
            await elsewhere.aclose()


async def test_connections_over_the_handshake_caps_get_503_at_once() -> None:
    async with listening(
        admit_with(anyone), max_handshakes=3, max_handshakes_per_address=2
    ) as port:
        with trio.fail_after(TIMEOUT):
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            # A third from the same address: answered 503 without a request being read.
            third = await trio.open_tcp_stream("127.0.0.1", port)
            answer = b""
            while chunk := await third.receive_some():
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 5" in answer
            # Another address gets the last place; the cap in all then turns away a fourth.
            other = await dial_from("127.0.0.2", port, "/elsewhere")
            assert isinstance(other, WebSocketRejected) and other.status_code == 404
            for stream in idle:
                await stream.aclose()
            await third.aclose()


async def test_a_new_device_over_the_tunnel_cap_gets_503_and_a_known_one_reconnects() -> None:
    async def by_token(token: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return token

    registry = TunnelRegistry()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_tunnel_listener,
            registry,
            admit_with(by_token),
            host="127.0.0.1",
            port=0,
            max_tunnels=1,
        )
        urls: list[str] = await nursery.start(serve)
        url = f"{urls[0]}/tunnel/connect"
        with trio.fail_after(TIMEOUT):
            first = await connect_websocket_stream(f"{url}?token=device-1")
            await registry.wait_for("device-1")
            with pytest.raises(WebSocketRejected) as full:
                await connect_websocket_stream(f"{url}?token=device-2")
            assert full.value.status_code == 503
            again = await connect_websocket_stream(f"{url}?token=device-1")  # replaces it
            await again.aclose()
            await first.aclose()
        nursery.cancel_scope.cancel()


async def test_every_refused_upgrade_is_told_to_on_refusal() -> None:
    told: list[int] = []

    def on_refusal(request: ListenerRequest, refusal: Refusal) -> None:
        told.append(refusal.status)

    async def nobody(token: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    await refuse_upgrade(admit_with(nobody), "/tunnel/connect?token=x", on_refusal=on_refusal)
    assert told == [401]


# -- dials that went stale while their token was checked ------------------------------------


async def test_a_tunnel_dialed_before_the_live_one_never_replaces_it() -> None:
    """A slow token check for an older dial ends after the agent is back by a newer one:
    the older one is closed as replaced, the live tunnel stays."""
    older_checked = trio.Event()

    async def admit(request: ListenerRequest) -> str | Refusal:
        if request.token == "older":
            await older_checked.wait()
        await trio.lowlevel.checkpoint()
        return "device"

    registry = TunnelRegistry()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_tunnel_listener, registry, admit, host="127.0.0.1", port=0)
        urls: list[str] = await nursery.start(serve)
        url = urls[0] + "/tunnel/connect?token="
        with trio.fail_after(TIMEOUT):
            older: list[WebSocketStream] = []
            older_upgraded = trio.Event()

            async def dial_older() -> None:
                older.append(await connect_websocket_stream(url + "older"))
                older_upgraded.set()

            nursery.start_soon(dial_older)
            await trio.testing.wait_all_tasks_blocked()
            newer = await connect_websocket_stream(url + "newer")
            live = await registry.wait_for("device")
            older_checked.set()
            await older_upgraded.wait()
            with pytest.raises(WebSocketClosed) as closed:
                await older[0].receive_some()
            assert closed.value.code == CLOSE_REPLACED
            assert registry.get("device") is live
            await older[0].aclose()
            await newer.aclose()
        nursery.cancel_scope.cancel()


async def test_an_agent_that_left_during_its_token_check_gets_no_tunnel() -> None:
    checking = trio.Event()
    left = trio.Event()
    admitted: list[str] = []

    async def admit(request: ListenerRequest) -> str | Refusal:
        checking.set()
        await left.wait()
        admitted.append("device")
        return "device"

    registry = TunnelRegistry()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_tunnel_listener, registry, admit, host="127.0.0.1", port=0)
        urls: list[str] = await nursery.start(serve)
        port = int(urls[0].rsplit(":", 1)[1])
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"GET /tunnel/connect?token=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            await checking.wait()
            await stream.aclose()  # the agent's connect timeout
            left.set()
            await trio.testing.wait_all_tasks_blocked()
        assert admitted == ["device"]
        assert registry.get("device") is None
        nursery.cancel_scope.cancel()


async def test_a_tunnel_holds_one_descriptor_on_the_listener_side() -> None:
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    registry = TunnelRegistry()
    ended = trio.Event()
    registry.add_observer(lambda event: ended.set() if isinstance(event, TunnelDown) else None)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_tunnel_listener, registry, admit_with(anyone), host="127.0.0.1", port=0
        )
        urls: list[str] = await nursery.start(serve)
        before = descriptors()
        with trio.fail_after(TIMEOUT):
            agent = await connect_websocket_stream(urls[0] + "/tunnel/connect?token=t")
            await registry.wait_for("device")
            assert descriptors() - before == 2  # the agent's socket and the listener's
            await agent.aclose()
            await ended.wait()
            await trio.testing.wait_all_tasks_blocked()  # the listener drains and closes
            assert descriptors() == before
        nursery.cancel_scope.cancel()
