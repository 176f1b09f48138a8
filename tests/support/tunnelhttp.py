"""HTTP and WebSocket ends for tunnel tests: the agent's local server and the callers.

* ``LocalApp`` / ``start_local_server``: a raw ASGI app on hypercorn, the server an agent
  forwards to (routes in ``LocalApp``'s docstring); ``serve_on_loopback`` serves any ASGI
  app that way.
* ``http_request`` / ``http_exchange`` / ``http_download``: a tiny HTTP/1.1 client, h11 over
  ``trio.open_tcp_stream`` (httpx is not a dependency of the project).
* ``hang_up_mid_download``: a caller that gives up while the body is still coming.
* ``browser_websocket``: trio-websocket as the browser; ``websocket_handshake`` for a
  handshake that is expected to be refused.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import h2.config
import h2.connection
import h2.events
import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from trio_websocket import WebSocketConnection, wrap_client_stream

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

from .data import pattern

MiB = 1024 * 1024
#: Upper bound for one HTTP exchange.
HTTP_TIMEOUT = 30.0

# -- the agent's local server: a raw ASGI app on hypercorn -------------------------------

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def read_body(receive: Receive) -> bytes:
    """The whole request body, from every ``http.request`` message."""
    received = bytearray()
    more = True
    while more:
        message = await receive()
        received += message.get("body", b"")
        more = message.get("more_body", False)
    return bytes(received)


async def run_lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol: start up at once, shut down when told."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def respond(send: Send, status: int, body: bytes, headers: Sequence[Any] = ()) -> None:
    """A whole response; no Content-Length for statuses that have no body."""
    framing = [] if status in (204, 304) else [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*framing, *headers]})
    await send({"type": "http.response.body", "body": body})


class LocalApp:
    """``GET|HEAD /hello``, ``POST /echo``, ``POST /sha256``, ``GET /bytes/N[?cl=1]``,
    ``ANY /status/N``, ``GET /slow?ms=N``, ``ANY /headers``, WebSocket ``/ws/echo``.

    ``/bytes/N`` streams ``pattern(0, N)`` in 64 KiB pieces, chunked (``cl=1``: with
    Content-Length); if the client goes away first, ``download_aborted`` is set.
    ``/sha256`` reads the body piece by piece and answers ``"<size> <sha256 hex>"``.
    ``/slow`` answers after ``ms`` milliseconds; ``slow_peak`` is the most it ever had in
    flight at once. ``/headers`` answers the request's headers as a JSON list of pairs,
    with the response headers ``X-Custom: Value`` and two ``Set-Cookie``. The WebSocket
    echo closes with 4002 "bye" when it receives the text ``close-4002``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.download_aborted = trio.Event()
        self.ws_disconnected = trio.Event()
        self.slow_in_flight = 0
        self.slow_peak = 0

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await run_lifespan(receive, send)

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        if method in ("GET", "HEAD") and path == "/hello":
            headers = [(b"x-query", scope["query_string"]), (b"content-type", b"text/plain")]
            await respond(send, 200, f"hello from {self.name}".encode(), headers)
        elif method == "POST" and path == "/echo":
            await respond(send, 200, await read_body(receive))
        elif method == "POST" and path == "/sha256":
            digest = hashlib.sha256()
            size = 0
            more = True
            while more:
                message = await receive()
                piece = message.get("body", b"")
                digest.update(piece)
                size += len(piece)
                more = message.get("more_body", False)
            await respond(send, 200, f"{size} {digest.hexdigest()}".encode())
        elif method == "GET" and path.startswith("/bytes/"):
            await self._bytes(int(path.removeprefix("/bytes/")), scope, receive, send)
        elif method == "GET" and path == "/slow":
            query = dict(part.split(b"=", 1) for part in scope["query_string"].split(b"&"))
            self.slow_in_flight += 1
            self.slow_peak = max(self.slow_peak, self.slow_in_flight)
            try:
                await trio.sleep(int(query[b"ms"]) / 1000)
            finally:
                self.slow_in_flight -= 1
            await respond(send, 200, b"slept " + query[b"ms"])
        elif path == "/headers":
            pairs = [[name.decode(), value.decode()] for name, value in scope["headers"]]
            headers = [
                (b"content-type", b"application/json"),
                (b"X-Custom", b"Value"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
            ]
            await respond(send, 200, json.dumps(pairs).encode(), headers)
        elif path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
            headers = [(b"location", b"/hello")] if 300 <= status < 400 else []
            body = b"" if status in (204, 304) else f"status {status}".encode()
            await respond(send, status, body, headers)
        else:
            await respond(send, 404, b"no such route")

    async def _bytes(self, size: int, scope: Message, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/octet-stream")]
        if scope["query_string"] == b"cl=1":
            headers.append((b"content-length", str(size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.download_aborted.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            for offset in range(0, size, 64 * 1024):
                piece = pattern(offset, min(64 * 1024, size - offset))
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            nursery.cancel_scope.cancel()

    async def _websocket(self, scope: Message, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        if scope["path"] != "/ws/echo":
            await send({"type": "websocket.close"})  # before accept: hypercorn answers 403
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.ws_disconnected.set()
                return
            if message.get("text") == "close-4002":
                await send({"type": "websocket.close", "code": 4002, "reason": "bye"})
                return
            await send({"type": "websocket.send", **{k: message.get(k) for k in ("text", "bytes")}})


@dataclass
class LocalServer:
    app: LocalApp
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def serve_on_loopback(nursery: trio.Nursery, app: Callable[..., Awaitable[None]]) -> int:
    """Serve the ASGI ``app`` with hypercorn on 127.0.0.1 (a free port, no access log) in
    ``nursery``; the port."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    # Our apps take plain dicts, not hypercorn's TypedDict unions.
    binds: list[str] = await nursery.start(partial(serve, cast("ASGIFramework", app), config))
    return int(binds[0].rsplit(":", 1)[1])


async def start_local_server(nursery: trio.Nursery, name: str) -> LocalServer:
    app = LocalApp(name)
    return LocalServer(app, await serve_on_loopback(nursery, app))


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- a tiny HTTP/1.1 client: h11 over trio.open_tcp_stream ---------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated ones
    body: bytes
    #: Every header as received (names lower-cased by h11), repeated ones repeated.
    header_list: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, response: h11.Response, body: bytes) -> HttpResponse:
        pairs = [(name.decode().lower(), value.decode()) for name, value in response.headers]
        return cls(response.status_code, dict(pairs), body, pairs)


@dataclass
class HttpDigest:
    """A response whose body was hashed as it arrived, not kept."""

    status: int
    headers: dict[str, str]  # lower-case names
    size: int
    sha256: str


class HttpExchange:
    """One request and its response on a fresh connection (``Connection: close``)."""

    def __init__(self, stream: trio.SocketStream, port: int) -> None:
        self.stream = stream
        self.port = port
        self.conn = h11.Connection(h11.CLIENT)

    async def send_request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        *,
        chunked: bool = False,
        headers: Sequence[tuple[str, str]] = (("connection", "close"),),
        end: bool = True,
    ) -> None:
        """Send the request and ``body``; ``end=False``: the body goes on with
        :meth:`send_body_piece` (``headers`` give its framing)."""
        headers = [("host", f"127.0.0.1:{self.port}"), *headers]
        if body is not None:
            headers.append(
                ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body)))
            )
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=headers))
        )
        for offset in range(0, len(body or b""), 64 * 1024):
            assert body is not None
            await self.send_body_piece(body[offset : offset + 64 * 1024])
        if end:
            data = self.conn.send(h11.EndOfMessage())
            assert data is not None
            await self.stream.send_all(data)

    async def send_body_piece(self, piece: bytes) -> None:
        data = self.conn.send(h11.Data(data=piece))
        assert data is not None
        await self.stream.send_all(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(64 * 1024))
                continue
            assert isinstance(event, h11.Event), event  # PAUSED: not with Connection: close
            return event

    async def receive_response(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            assert isinstance(event, h11.InformationalResponse), event

    async def receive_body_piece(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        event = await self.next_event()
        if isinstance(event, h11.EndOfMessage):
            return b""
        assert isinstance(event, h11.Data), event
        return bytes(event.data)

    async def receive_whole_response(self) -> HttpResponse:
        """The response and all of its body."""
        response = await self.receive_response()
        data = bytearray()
        while piece := await self.receive_body_piece():
            data += piece
        return HttpResponse.of(response, bytes(data))


@asynccontextmanager
async def http_exchange(port: int) -> AsyncIterator[HttpExchange]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield HttpExchange(stream, port)


async def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    chunked: bool = False,
    headers: Sequence[tuple[str, str]] = (("connection", "close"),),
) -> HttpResponse:
    """Send the request while reading the response; return it whole."""
    with trio.fail_after(HTTP_TIMEOUT):
        async with http_exchange(port) as exchange, trio.open_nursery() as nursery:
            send = partial(exchange.send_request, chunked=chunked, headers=headers)
            nursery.start_soon(send, method, target, body)
            return await exchange.receive_whole_response()


async def http_download(
    port: int,
    target: str,
    *,
    timeout: float = HTTP_TIMEOUT,
    headers: Sequence[tuple[str, str]] = (("connection", "close"),),
) -> HttpDigest:
    """GET ``target``; hash the body as it arrives (a large download is never held)."""
    with trio.fail_after(timeout):
        async with http_exchange(port) as exchange:
            await exchange.send_request("GET", target, headers=headers)
            response = await exchange.receive_response()
            digest = hashlib.sha256()
            size = 0
            while piece := await exchange.receive_body_piece():
                digest.update(piece)
                size += len(piece)
    fields = {name.decode().lower(): value.decode() for name, value in response.headers}
    return HttpDigest(response.status_code, fields, size, digest.hexdigest())


async def hang_up_mid_download(
    port: int,
    target: str,
    *,
    after: int = MiB,
    headers: Sequence[tuple[str, str]] = (("connection", "close"),),
) -> int:
    """GET ``target``, read ``after`` bytes of the body or more, then close the connection
    while the rest is still coming: a caller that gives up. The response's status."""
    async with http_exchange(port) as exchange:
        await exchange.send_request("GET", target, headers=headers)
        status = (await exchange.receive_response()).status_code
        received = 0
        while received < after:
            piece = await exchange.receive_body_piece()
            assert piece, f"the body (status {status}) ended after {received} bytes"
            received += len(piece)
    return status


async def h2_request(
    port: int, headers: Sequence[tuple[str, str]], body: bytes
) -> tuple[int, bytes]:
    """One HTTP/2 request (cleartext, prior knowledge) with ``body`` in one DATA frame and
    no ``content-length``: the response's status and body."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, list(headers))
    conn.send_data(stream_id, body, end_stream=True)
    status, data = 0, bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        while True:
            await stream.send_all(conn.data_to_send())
            received = await stream.receive_some(64 * 1024)
            assert received, "the server closed the connection"
            for event in conn.receive_data(received):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, bytes(data)


async def websocket_handshake(
    port: int, target: str, headers: Sequence[tuple[str, str]] = ()
) -> HttpResponse:
    """A WebSocket opening handshake (with ``headers`` added) that is expected to be refused.

    (trio-websocket 0.12 leaves the socket of a refused handshake unclosed, which
    ``filterwarnings = error`` turns into a failure, so h11 asks instead.)
    """
    upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        *headers,
    ]
    response = await http_request(port, "GET", target, headers=upgrade)
    assert response.status != 101, "the handshake was accepted"
    return response


@asynccontextmanager
async def browser_websocket(
    port: int, resource: str, headers: Sequence[tuple[str, str]] = ()
) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket as the browser (sending ``headers`` too), on a TCP stream we close
    ourselves.

    (trio-websocket 0.12's client never closes its socket when the server closes first:
    its reader stops at the server's TCP close and ``aclose`` returns early.)
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    extra = [(name.encode(), value.encode()) for name, value in headers]
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            f"127.0.0.1:{port}",
            resource,
            extra_headers=extra,
            max_message_size=16 * MiB,
        )
        try:
            yield ws
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()
