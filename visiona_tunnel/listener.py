"""The tunnel listener: agents dial in here (``ws://`` or, with an SSL context, ``wss://``).

:func:`serve_tunnel_listener` reads request heads with h11 on a plain trio listener. A
WebSocket upgrade of the tunnel path is shown to ``admit`` *before* the upgrade: a key (the
device id) upgrades it with wsproto and ``registry.serve`` runs the tunnel on a
:class:`~visiona_tunnel.wsconn.WebSocketStream`; a :class:`Refusal` becomes an HTTP answer
and the connection ends. Other requests go to ``routes`` (``GET``/``HEAD`` by path, e.g. a
health check) and keep the connection alive for :data:`KEEP_ALIVE_TIMEOUT`; the rest get
404, 405 or, at the tunnel path without an upgrade, 426. Every error answer (refusals
included) is built by ``render``: plain text by default, the service's JSON envelope in the
remote-proxy.

The listener owns the connection's rules: a request head may take ``handshake_timeout``
and :data:`MAX_HEAD_SIZE` bytes; accepted sockets get ``TCP_USER_TIMEOUT`` (the kernel
aborts a connection whose data stays unacknowledged, so a vanished agent's tunnel ends);
when a tunnel ends we send our close frame, then half-close and read what the agent still
sends until it hangs up (:func:`close_and_drain`), so that the agent gets our close code.
With ``shutdown_trigger``, it stops accepting when that returns and gives the open
connections ``graceful_timeout`` to end (idle keep-alive ones end at once).

Each task it starts lives in its own nursery: one per connection, inside
``serve_tunnel_listener``'s, and the tunnel's tasks inside ``registry.serve``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from functools import partial
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request as WsRequest

from .relay import TokenVerifier, TunnelRegistry, VerifierUnavailable
from .wsconn import DEFAULT_MAX_MESSAGE_SIZE, RECEIVE_SIZE, WebSocketRequest, WebSocketStream

__all__ = [
    "ADMIT_TIMEOUT",
    "CLOSE_DRAIN_TIMEOUT",
    "GRACEFUL_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "KEEP_ALIVE_TIMEOUT",
    "MAX_HEAD_SIZE",
    "TCP_USER_TIMEOUT",
    "Admit",
    "Answer",
    "ListenerRequest",
    "Refusal",
    "admit_with",
    "close_and_drain",
    "plain_text",
    "serve_tunnel_listener",
    "token_from_request",
]

logger = logging.getLogger("visiona_tunnel.listener")

Headers = Sequence[tuple[bytes, bytes]]

#: The largest request head read.
MAX_HEAD_SIZE = 64 * 1024
#: How long a request head (and, for a tunnel, the check and the upgrade) may take.
HANDSHAKE_TIMEOUT = 10.0
#: How long ``admit`` may take before the agent gets 503 (``AUTH_UNAVAILABLE``).
ADMIT_TIMEOUT = 10.0
#: How long an idle connection is kept for a next request (plain routes only).
KEEP_ALIVE_TIMEOUT = 5.0
#: After the shutdown trigger, how long connections may take to end.
GRACEFUL_TIMEOUT = 5.0
#: After a tunnel ends, how long its agent has to read our close frame and hang up.
CLOSE_DRAIN_TIMEOUT = 10.0
#: The kernel aborts a tunnel connection whose sent data stays unacknowledged this long
#: (seconds): the relay's yamux keepalive timeout.
TCP_USER_TIMEOUT = 30.0


@attrs.frozen
class ListenerRequest:
    """A request head as the hooks see it."""

    method: str
    #: Path and query, as sent.
    target: str
    #: Names in lower case (h11's).
    headers: tuple[tuple[bytes, bytes], ...]
    #: ``host:port`` of the peer, when known.
    remote: str | None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def token(self) -> str | None:
        """The device token it carries (:func:`token_from_request`)."""
        return token_from_request(self.target, self.headers)


@attrs.frozen
class Answer:
    """A whole HTTP answer: status, body, and headers (``content-type`` among them)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Refusal:
    """An error answer, before ``render`` gives it a body: a refused tunnel (401, 503 ...)
    or a request the listener does not serve (400, 404, 405, 426)."""

    status: int
    code: str
    message: str


#: ``await admit(request)``: the key to serve the tunnel as, or why it is refused.
Admit = Callable[[ListenerRequest], Awaitable[str | Refusal]]
#: A plain route: ``await route(request)`` answers a ``GET`` or ``HEAD`` of its path.
Route = Callable[[ListenerRequest], Awaitable[Answer]]
#: Entered around each request (for a tunnel, its whole life; for a head that cannot be
#: parsed, with an empty method and target); yields headers to add to every answer to it
#: (a request id, say).
RequestScope = Callable[[ListenerRequest], contextlib.AbstractContextManager[Headers]]


def plain_text(refusal: Refusal) -> Answer:
    """The default ``render``: the message as text."""
    content_type = (b"content-type", b"text/plain; charset=utf-8")
    return Answer(refusal.status, f"{refusal.message}\n".encode(), (content_type,))


@contextlib.contextmanager
def _no_scope(request: ListenerRequest) -> Iterator[Headers]:
    yield ()


def token_from_request(target: str, headers: Headers) -> str | None:
    """The device token: ``Authorization: Bearer`` or the query parameter ``token``."""
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip() or None
    tokens = parse_qs(urlsplit(target).query).get("token")
    return tokens[0] if tokens else None


UNAUTHORIZED = Refusal(401, "UNAUTHORIZED", "a valid device token is required")
VERIFIER_UNAVAILABLE = Refusal(503, "AUTH_UNAVAILABLE", "cannot check tokens now")


def admit_with(verify_token: TokenVerifier) -> Admit:
    """``admit`` from a token verifier: the token's key; no token or an unknown one is
    401, a verifier raising :class:`~visiona_tunnel.relay.VerifierUnavailable` is 503."""

    async def admit(request: ListenerRequest) -> str | Refusal:
        token = request.token
        try:
            key = await verify_token(token) if token else None
        except VerifierUnavailable:
            return VERIFIER_UNAVAILABLE
        return UNAUTHORIZED if key is None else key

    return admit


async def close_and_drain(ws: WebSocketStream, sock: trio.socket.SocketType) -> None:
    """End an accepted tunnel's connection so the agent gets our close code.

    Sends our close frame (unless one was sent, e.g. 4001 on replacement), then half-closes
    ``sock`` -- a ``dup()`` of the connection's socket, taken at accept, which outlives
    ``ws.aclose()`` -- and reads (and drops) what the agent still sends until it hangs up.
    Closing a socket with unread data would reset the connection, and an agent still
    writing (a ping, a window update) would see 1006 instead of our code. Closes ``sock``;
    bound it with a timeout (:data:`CLOSE_DRAIN_TIMEOUT`).
    """
    try:
        await ws.aclose()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while await sock.recv(RECEIVE_SIZE):
                pass
    finally:
        sock.close()


async def serve_tunnel_listener(
    registry: TunnelRegistry,
    admit: Admit,
    *,
    host: str | None = None,
    port: int = 3800,
    listeners: Sequence[trio.SocketListener] = (),
    path: str = "/tunnel/connect",
    routes: Mapping[str, Route] | None = None,
    render: Callable[[Refusal], Answer] = plain_text,
    request_scope: RequestScope = _no_scope,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    admit_timeout: float = ADMIT_TIMEOUT,
    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    tcp_user_timeout: float | None = TCP_USER_TIMEOUT,
    drain_timeout: float = CLOSE_DRAIN_TIMEOUT,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept agents on ``host:port`` (or on ``listeners``, already bound) until cancelled
    or, with ``shutdown_trigger``, until it returns (see the module docstring).

    ``admit`` decides each tunnel (:func:`admit_with` makes one from a token verifier);
    ``task_status.started`` gets the bound URLs (``["ws://127.0.0.1:PORT"]``).
    """
    handler = _Connection(
        registry,
        admit,
        path=path,
        routes=dict(routes or {}),
        render=render,
        request_scope=request_scope,
        ssl_context=ssl_context,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
        admit_timeout=admit_timeout,
        keep_alive_timeout=keep_alive_timeout,
        tcp_user_timeout=tcp_user_timeout,
        drain_timeout=drain_timeout,
    )
    bound = list(listeners) or await trio.open_tcp_listeners(port, host=host)
    scheme = "wss" if ssl_context is not None else "ws"
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            serve = partial(trio.serve_listeners, handler, bound, handler_nursery=connections)
            await accepting.start(serve)
            task_status.started([_url(scheme, listener) for listener in bound])
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            accepting.cancel_scope.cancel()
        handler.stopping = True
        for scope in handler.idle:
            scope.cancel()
        connections.cancel_scope.deadline = trio.current_time() + graceful_timeout


def _url(scheme: str, listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@attrs.define
class _Connection:
    """Serves one accepted connection: requests until one ends it, or a tunnel."""

    registry: TunnelRegistry
    admit: Admit
    path: str
    routes: dict[str, Route]
    render: Callable[[Refusal], Answer]
    request_scope: RequestScope
    ssl_context: ssl.SSLContext | None
    max_message_size: int
    handshake_timeout: float
    admit_timeout: float
    keep_alive_timeout: float
    tcp_user_timeout: float | None
    drain_timeout: float
    #: Set once the listener shuts down: no more keep-alive.
    stopping: bool = False
    #: The cancel scopes of connections waiting for a request (head).
    idle: set[trio.CancelScope] = attrs.field(factory=set)

    async def __call__(self, tcp: trio.SocketStream) -> None:
        remote = _prepare(tcp, self.tcp_user_timeout)
        stream: trio.abc.Stream = tcp
        if self.ssl_context is not None:
            stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        keep_open = False  # True once a tunnel owns the connection
        try:
            first = True
            while not self.stopping:
                head = await self._next_request(stream, conn, remote, first=first)
                if head is None:
                    return
                first = False
                request = ListenerRequest(
                    head.method.decode("latin-1"),
                    head.target.decode("latin-1"),
                    tuple(head.headers),
                    remote,
                )
                with self.request_scope(request) as extra:
                    if request.path == self.path and _is_websocket_upgrade(head):
                        keep_open = True
                        await self._tunnel(tcp, stream, conn, head, request, extra)
                        return
                    if not await self._answer(stream, conn, request, extra):
                        return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            OSError,
        ) as exc:
            logger.debug("connection ended", extra={"remote": remote, "error": repr(exc)})
        except Exception:
            logger.exception("connection failed", extra={"remote": remote})
        finally:
            if not keep_open:
                await trio.aclose_forcefully(stream)

    # -- reading -------------------------------------------------------------------------

    async def _next_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, remote: str | None, *, first: bool
    ) -> h11.Request | None:
        """The next request head (with its body read if it came along), or None when the
        connection should end (closed, too slow, or a bad request, answered with 400)."""
        timeout = self.handshake_timeout if first else self.keep_alive_timeout
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        self.idle.add(scope)
        try:
            with scope:
                request = await _read_head(stream, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                code = "BAD_REQUEST" if status == 400 else "HTTP_ERROR"
                unreadable = ListenerRequest("", "", (), remote)
                with trio.move_on_after(1), self.request_scope(unreadable) as extra:
                    answer = self.render(Refusal(status, code, str(exc)))
                    await _send(stream, conn, _with_headers(answer, extra), close=True)
            return None
        finally:
            self.idle.discard(scope)
        if scope.cancelled_caught:
            return None
        return request

    # -- plain requests ------------------------------------------------------------------

    async def _answer(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: ListenerRequest,
        extra: Headers,
    ) -> bool:
        """Answer a request that is not a tunnel; whether the connection may stay."""
        path = request.path
        head = request.method == "HEAD"
        close = self.stopping
        route = self.routes.get(path)
        if request.method in ("GET", "HEAD") and route is not None:
            answer = await route(request)
        elif request.method in ("GET", "HEAD") and path == self.path:
            refusal = Refusal(426, "UPGRADE_REQUIRED", "connect with a WebSocket upgrade")
            upgrade = ((b"upgrade", b"websocket"), (b"connection", b"Upgrade"))
            answer = _with_headers(self.render(refusal), upgrade)
        elif route is not None or path == self.path:
            refusal = Refusal(405, "METHOD_NOT_ALLOWED", "the method is not allowed here")
            answer = _with_headers(self.render(refusal), ((b"allow", b"GET, HEAD"),))
        else:
            answer = self.render(Refusal(404, "NOT_FOUND", "no such path"))
        await _send(stream, conn, _with_headers(answer, extra), head=head, close=close)
        return not close

    # -- tunnels -------------------------------------------------------------------------

    async def _tunnel(
        self,
        tcp: trio.SocketStream,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        head: h11.Request,
        request: ListenerRequest,
        extra: Headers,
    ) -> None:
        """Admit, upgrade, and run the tunnel until it ends; closes the connection."""
        try:
            with trio.fail_after(self.handshake_timeout + self.admit_timeout):
                upgrade = await self._upgrade(stream, conn, head, request, extra)
                if upgrade is None:
                    await trio.aclose_forcefully(stream)
                    return
                key, ws_request = upgrade
                ws = await ws_request.accept(headers=extra, max_message_size=self.max_message_size)
            # The socket outlives the WebSocket's aclose (see close_and_drain).
            spare = tcp.socket.dup()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        try:
            await self.registry.serve(key, ws, remote_address=request.remote)
        finally:
            with trio.move_on_after(self.drain_timeout) as drain:
                await close_and_drain(ws, spare)
            if drain.cancelled_caught:
                logger.warning(
                    "agent did not answer our close", extra={"key": key, "remote": request.remote}
                )

    async def _upgrade(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        head: h11.Request,
        request: ListenerRequest,
        extra: Headers,
    ) -> tuple[str, WebSocketRequest] | None:
        """The key and the upgrade to accept, or None after the refusal."""
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(head.headers), head.target)
            trailing, _ = conn.trailing_data
            if trailing:
                ws.receive_data(bytes(trailing))  # handed to the connection on accept
            ws_request = next(event for event in ws.events() if isinstance(event, WsRequest))
        except (h11.ProtocolError, wsproto.utilities.ProtocolError, StopIteration) as exc:
            refusal = Refusal(400, "BAD_REQUEST", f"not a WebSocket upgrade: {exc}")
            await self._refuse(stream, conn, refusal, extra)
            return None
        admitted: str | Refusal = VERIFIER_UNAVAILABLE
        with trio.move_on_after(self.admit_timeout):
            admitted = await self.admit(request)
        if isinstance(admitted, Refusal):
            await self._refuse(stream, conn, admitted, extra)
            return None
        return admitted, WebSocketRequest(stream, ws, ws_request)

    async def _refuse(
        self, stream: trio.abc.Stream, conn: h11.Connection, refusal: Refusal, extra: Headers
    ) -> None:
        """Answer a tunnel upgrade with the refusal; the connection ends."""
        headers: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store"), *extra]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="visiona-tunnel"'))
        elif refusal.status == 503:
            headers.append((b"retry-after", b"5"))
        answer = _with_headers(self.render(refusal), headers)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await _send(stream, conn, answer, close=True)


async def _read_head(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if request is not None:
                return request  # a body still to come: answered without it
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: a request body, which no route reads


def _prepare(tcp: trio.SocketStream, tcp_user_timeout: float | None) -> str | None:
    """Set ``TCP_USER_TIMEOUT`` where the platform has it; the peer's address."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    with contextlib.suppress(OSError):
        if tcp_user_timeout is not None and option is not None:
            milliseconds = max(1, round(tcp_user_timeout * 1000))
            tcp.socket.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
    try:
        return "{}:{}".format(*tcp.socket.getpeername()[:2])
    except OSError:
        return None


def _is_websocket_upgrade(request: h11.Request) -> bool:
    """``GET`` with ``Connection: upgrade`` and ``Upgrade: websocket``."""
    if request.method != b"GET":
        return False
    connection = _tokens(request.headers, b"connection")
    return b"upgrade" in connection and _tokens(request.headers, b"upgrade") == [b"websocket"]


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    """The comma-separated values of header ``name`` (h11 gives names in lower case)."""
    return [
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in value.split(b",")
        if token.strip()
    ]


def _with_headers(answer: Answer, headers: Headers) -> Answer:
    return attrs.evolve(answer, headers=(*answer.headers, *headers))


async def _send(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    answer: Answer,
    *,
    head: bool = False,
    close: bool = False,
) -> None:
    """A whole answer (for ``HEAD``, without its body)."""
    fields = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
    if close:
        fields.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=answer.status, headers=fields)) or b""
    if not head:
        data += conn.send(h11.Data(data=answer.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
