"""The remote-proxy's internal API in one process, for tests: the app on hypercorn
(127.0.0.1:0), a relay listener feeding its ``ProxyState``, our agent, and a local server;
plus h11 callers that send the internal secret.

``ProxyLocalApp`` is ``LocalApp`` with three more routes: ``ANY /target/...`` answers the
request target as the local server received it (``{"raw_path", "query"}``), ``GET /hop``
answers with hop-by-hop headers, ``POST /slow?ms=N`` reads the body, then sleeps;
``slow_started`` is set when a ``GET /slow`` begins.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any

import attrs
import h11
import trio
from hypercorn.trio import serve
from quart_trio import QuartTrio
from trio_websocket import WebSocketConnection

from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.internal_app import (
    create_internal_app,
    internal_hypercorn_config,
)
from visiona_services.remote_proxy.state import ProxyState
from visiona_services.remote_proxy.tunnel_listener import serve_tunnels
from visiona_services.remote_proxy.verify import StaticTokenVerifier

from .data import pattern_pieces
from .pyagent import PyAgent, start_py_agent
from .tunnelhttp import (
    HTTP_TIMEOUT,
    HttpDigest,
    HttpResponse,
    LocalApp,
    LocalServer,
    Message,
    Receive,
    Send,
    browser_websocket,
    http_download,
    http_exchange,
    http_request,
    respond,
    serve_on_loopback,
    websocket_handshake,
)

SECRET = "internal-secret-for-tests"
TOKEN = "token-1"
DEVICE = "device-1"
AUTH = ("Authorization", f"Bearer {SECRET}")

# -- the local server -----------------------------------------------------------------------


class ProxyLocalApp(LocalApp):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.slow_started = trio.Event()

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/target/"):
            seen = {"raw_path": scope["raw_path"].decode(), "query": scope["query_string"].decode()}
            await respond(send, 200, json.dumps(seen).encode())
        elif path == "/hop":
            headers = [
                (b"Connection", b"X-Hop-Named"),
                (b"X-Hop-Named", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"X-Kept", b"yes"),
            ]
            await respond(send, 200, b"hop", headers)
        elif path == "/request-id":  # answers with the X-Request-ID it got
            echoed = [(n, v) for n, v in scope["headers"] if n.lower() == b"x-request-id"]
            await respond(send, 200, b"id", echoed)
        elif path == "/stall":  # never reads the body, never answers
            await trio.sleep_forever()
        elif path == "/stall-after-head":  # never reads the body, answers a head and 1 byte
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await trio.sleep_forever()
        elif path.startswith("/bytes/") and scope["method"] == "POST":  # never reads the body
            size = int(path.removeprefix("/bytes/"))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for piece in pattern_pieces(size, 64 * 1024):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/slow" and scope["method"] == "POST":  # reads the body, then sleeps
            while (await receive()).get("more_body", False):
                pass
            await trio.sleep(int(scope["query_string"].removeprefix(b"ms=")) / 1000)
            await respond(send, 200, b"slept")
        else:
            if path == "/slow":
                self.slow_started.set()
            await super()._http(scope, receive, send)


@dataclass
class ProxyLocalServer(LocalServer):
    app: ProxyLocalApp


async def start_proxy_local_server(nursery: trio.Nursery) -> ProxyLocalServer:
    app = ProxyLocalApp("local-1")
    return ProxyLocalServer(app, await serve_on_loopback(nursery, app))


# -- the proxy ------------------------------------------------------------------------------


@dataclass
class Proxy:
    state: ProxyState
    app: QuartTrio
    #: The internal API's port.
    port: int
    #: What an agent dials.
    relay_url: str
    #: The device id that ``TOKEN`` stands for.
    device: str = DEVICE


async def start_proxy(nursery: trio.Nursery, *, device: str = DEVICE, **config: Any) -> Proxy:
    """The internal app and a relay listener sharing one ``ProxyState`` (device token
    ``TOKEN`` -> ``device``); ``config`` overrides ``ProxyConfig`` fields."""
    proxy_config = ProxyConfig(internal_secret=SECRET, internal_port=0, **config)
    state = ProxyState.create(proxy_config)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    verifier = StaticTokenVerifier({TOKEN: device})
    await nursery.start(partial(serve_tunnels, state, verifier, listeners=listeners))
    relay_port = listeners[0].socket.getsockname()[1]
    app = create_internal_app(state)
    hyper = internal_hypercorn_config(proxy_config)
    binds: list[str] = await nursery.start(partial(serve, app, hyper))
    return Proxy(
        state,
        app,
        int(binds[0].rsplit(":", 1)[1]),
        f"ws://127.0.0.1:{relay_port}/tunnel/connect",
        device,
    )


async def connect_agent(nursery: trio.Nursery, proxy: Proxy, local_port: int) -> PyAgent:
    """Our agent for ``proxy.device``, with its tunnel registered."""
    agent = await start_py_agent(nursery, proxy.relay_url, TOKEN, local_port)
    with trio.fail_after(10):
        await proxy.state.tunnels.wait_for(proxy.device)
    return agent


def with_config(proxy: Proxy, **changes: Any) -> None:
    """Change the running proxy's configuration (it is read per request)."""
    proxy.state.config = attrs.evolve(proxy.state.config, **changes)


# -- callers --------------------------------------------------------------------------------

Headers = Sequence[tuple[str, str]]


async def call(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    headers: Headers = (),
    auth: bool = True,
    chunked: bool = False,
) -> HttpResponse:
    """One request on a fresh connection, with the internal secret unless ``auth=False``."""
    sent = [("connection", "close"), *headers, *([AUTH] if auth else [])]
    return await http_request(port, method, target, body, headers=sent, chunked=chunked)


def json_of(response: HttpResponse) -> Any:
    return json.loads(response.body)


async def download_digest(port: int, target: str) -> HttpDigest:
    """GET with the secret; the body is hashed as it arrives, never held."""
    return await http_download(port, target, headers=[("connection", "close"), AUTH])


def _data(piece: bytes) -> h11.Data:
    return h11.Data(data=piece)


async def upload_pattern(
    port: int, target: str, size: int, *, pause: tuple[int, float] | None = None
) -> HttpResponse:
    """POST ``pattern(0, size)`` with Content-Length, generated piece by piece while the
    response is read; the response is returned whole. ``pause=(n, seconds)``: a caller
    that stops for ``seconds`` after ``n`` pieces."""
    with trio.fail_after(HTTP_TIMEOUT):
        async with http_exchange(port) as exchange, trio.open_nursery() as nursery:

            async def send_body() -> None:
                headers = [
                    ("host", f"127.0.0.1:{port}"),
                    ("connection", "close"),
                    ("content-length", str(size)),
                    AUTH,
                ]
                request = h11.Request(method="POST", target=target, headers=headers)
                events = chain([request], map(_data, pattern_pieces(size)), [h11.EndOfMessage()])
                for index, event in enumerate(events):  # one piece at a time
                    data = exchange.conn.send(event)
                    assert data is not None
                    await exchange.stream.send_all(data)
                    if pause is not None and index == pause[0]:
                        await trio.sleep(pause[1])

            nursery.start_soon(send_body)
            return await exchange.receive_whole_response()


async def refused_websocket(port: int, target: str, *, auth: bool = True) -> HttpResponse:
    """A WebSocket handshake that is expected to be answered with an HTTP status."""
    return await websocket_handshake(port, target, [AUTH] if auth else [])


def caller_websocket(
    port: int, resource: str, headers: Headers = ()
) -> AbstractAsyncContextManager[WebSocketConnection]:
    """trio-websocket as the api-server, with the secret (``tunnelhttp.browser_websocket``)."""
    return browser_websocket(port, resource, [AUTH, *headers])
