"""The tunnel listener without hypercorn: the HTTP surface of :mod:`.tunnel_app` served on a
plain :func:`trio.serve_tcp` listener, with h11 for the request head and wsproto
(:mod:`visiona_tunnel.wsconn`) for the tunnels.

Why: hypercorn's per-message ASGI path costs CPU on every WebSocket message; a tunnel on
:class:`~visiona_tunnel.wsconn.WebSocketStream` straight on the socket moves about twice as
much (docs/performance.md). ``VISIONA_TUNNEL_SERVER=raw`` (the default) selects this one.

The answers are those of :func:`.tunnel_app.create_tunnel_app` (see its module docstring):
``GET /healthz`` (200, or 503 ``DRAINING``), ``GET /tunnel/connect`` with a WebSocket upgrade
(token checked before the upgrade: 401 ``UNAUTHORIZED``, 503 ``AUTH_UNAVAILABLE``, 503
``DRAINING``; accepted, ``state.tunnels.serve``), 426 ``UPGRADE_REQUIRED`` without the
upgrade, 404/405 envelopes otherwise; ``X-Request-ID`` on every answer and in the log lines
made while a request (or tunnel) is handled.

Connections: a request head may take :data:`HANDSHAKE_TIMEOUT` and :data:`MAX_HEAD_SIZE`
bytes; plain requests keep the connection alive for :data:`KEEP_ALIVE_TIMEOUT`. Accepted
sockets get ``TCP_USER_TIMEOUT``. When a tunnel ends we send our close frame (the
WebSocket's ``aclose``), then half-close and read what the agent still sends until it
closes (at most ``drain_timeout``): closing a socket with unread data would reset the
connection, and an agent still writing would then lose our close code (e.g. 4001).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import h11
import trio
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request as WsRequest

from visiona_tunnel.relay import close_and_drain, token_from_request
from visiona_tunnel.wsconn import RECEIVE_SIZE, WebSocketRequest

from ..common.http import (
    JSON_CONTENT_TYPE,
    error_envelope,
    json_bytes,
    ok_envelope,
    request_id_context,
    request_id_header,
)
from .state import ProxyState
from .tunnel_app import (
    DRAIN_TIMEOUT,
    TCP_USER_TIMEOUT,
    TUNNEL_MAX_MESSAGE_SIZE,
    TUNNEL_PATH,
    VERIFY_TIMEOUT,
)
from .verify import Refusal, TokenVerifier, admit

__all__ = [
    "GRACEFUL_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "KEEP_ALIVE_TIMEOUT",
    "MAX_HEAD_SIZE",
    "serve_tunnel_listener_raw",
]

logger = logging.getLogger("visiona_services.remote_proxy.tunnel")

#: The largest request head we read.
MAX_HEAD_SIZE = 64 * 1024
#: How long a request head (and the token check's upgrade) may take to arrive.
HANDSHAKE_TIMEOUT = 10.0
#: How long an idle connection is kept for a next request (only ``/healthz`` uses it).
KEEP_ALIVE_TIMEOUT = 5.0
#: After the shutdown trigger, how long connections may take to end.
GRACEFUL_TIMEOUT = 5.0

_HEALTHZ_PATH = "/healthz"
_ALLOW = (b"allow", b"GET, HEAD")
_NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually please "
    "check your spelling and try again."
)
_NOT_ALLOWED = "The method is not allowed for the requested URL."

Headers = Sequence[tuple[bytes, bytes]]


async def serve_tunnel_listener_raw(
    state: ProxyState,
    verifier: TokenVerifier,
    *,
    host: str | None = None,
    port: int = 0,
    listeners: Sequence[trio.SocketListener] = (),
    verify_timeout: float = VERIFY_TIMEOUT,
    drain_timeout: float = DRAIN_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    tcp_user_timeout: float | None = TCP_USER_TIMEOUT,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the tunnel listener on ``host:port`` (or on ``listeners``, already bound: the
    service binds first, to report a busy port before anything starts) until cancelled or,
    with ``shutdown_trigger``, until it returns: then stop accepting and give the open
    connections ``graceful_timeout`` to end (idle keep-alive ones end at once).

    ``task_status.started`` gets the bound URLs (``["http://127.0.0.1:PORT"]``), as
    hypercorn's ``serve`` does.
    """
    handler = _Handler(
        state,
        verifier,
        verify_timeout=verify_timeout,
        drain_timeout=drain_timeout,
        handshake_timeout=handshake_timeout,
        keep_alive_timeout=keep_alive_timeout,
        tcp_user_timeout=tcp_user_timeout,
    )
    bound = list(listeners) or await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            serve = partial(trio.serve_listeners, handler, bound, handler_nursery=connections)
            await accepting.start(serve)
            task_status.started([_url(listener) for listener in bound])
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            accepting.cancel_scope.cancel()
        handler.stopping = True
        for scope in handler.idle:
            scope.cancel()
        connections.cancel_scope.deadline = trio.current_time() + graceful_timeout


def _url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Handler:
    """One accepted connection: requests until one ends it, or a tunnel."""

    def __init__(
        self,
        state: ProxyState,
        verifier: TokenVerifier,
        *,
        verify_timeout: float,
        drain_timeout: float,
        handshake_timeout: float,
        keep_alive_timeout: float,
        tcp_user_timeout: float | None,
    ) -> None:
        self.state = state
        self.verifier = verifier
        self.verify_timeout = verify_timeout
        self.drain_timeout = drain_timeout
        self.handshake_timeout = handshake_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.tcp_user_timeout = tcp_user_timeout
        #: Set once the listener shuts down: no more keep-alive.
        self.stopping = False
        #: The cancel scopes of connections waiting for a request (head).
        self.idle: set[trio.CancelScope] = set()

    async def __call__(self, tcp: trio.SocketStream) -> None:
        remote = _prepare(tcp, self.tcp_user_timeout)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        keep_open = False  # True once a tunnel owns the socket
        try:
            first = True
            while not self.stopping:
                request = await self._next_request(tcp, conn, first=first)
                if request is None:
                    return
                first = False
                if _is_tunnel_upgrade(request):
                    keep_open = True
                    await self._tunnel(tcp, conn, request, remote)
                    return
                if not await self._answer(tcp, conn, request):
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
            logger.debug(
                "tunnel listener connection ended", extra={"remote": remote, "error": repr(exc)}
            )
        except Exception:
            logger.exception("tunnel listener connection failed", extra={"remote": remote})
        finally:
            if not keep_open:
                await trio.aclose_forcefully(tcp)

    # -- reading -------------------------------------------------------------------------

    async def _next_request(
        self, tcp: trio.SocketStream, conn: h11.Connection, *, first: bool
    ) -> h11.Request | None:
        """The next request head (with its body read if it came along), or None when the
        connection should end (closed, too slow, or a bad request, answered with 400)."""
        timeout = self.handshake_timeout if first else self.keep_alive_timeout
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        self.idle.add(scope)
        try:
            with scope:
                request = await self._read_head(tcp, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                code = "BAD_REQUEST" if status == 400 else "HTTP_ERROR"
                with trio.move_on_after(1):
                    await _respond(tcp, conn, status, error_envelope(code, str(exc)), close=True)
            return None
        finally:
            self.idle.discard(scope)
        if scope.cancelled_caught:
            return None
        return request

    async def _read_head(self, tcp: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if request is not None:
                    return request  # a body still to come: answered without it
                conn.receive_data(await tcp.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            # h11.Data: a request body, which no route reads

    # -- plain requests ------------------------------------------------------------------

    async def _answer(
        self, tcp: trio.SocketStream, conn: h11.Connection, request: h11.Request
    ) -> bool:
        """Answer a request that is not a tunnel upgrade; whether the connection may stay."""
        with request_id_context(request.headers):
            path = request.target.split(b"?", 1)[0].decode("latin-1")
            method = request.method
            head = method == b"HEAD"
            close = self.stopping
            if path == _HEALTHZ_PATH and method in (b"GET", b"HEAD"):
                if self.state.draining.is_set():
                    status = 503
                    payload = error_envelope("DRAINING", "the proxy is shutting down")
                else:
                    status = 200
                    payload = ok_envelope({"status": "ok", "sessions": len(self.state.tunnels)})
                await _respond(tcp, conn, status, payload, head=head, close=close)
            elif path == TUNNEL_PATH and method in (b"GET", b"HEAD"):
                envelope = error_envelope("UPGRADE_REQUIRED", "connect with a WebSocket upgrade")
                upgrade = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
                await _respond(tcp, conn, 426, envelope, upgrade, head=head, close=close)
            elif path in (_HEALTHZ_PATH, TUNNEL_PATH):
                envelope = error_envelope("METHOD_NOT_ALLOWED", _NOT_ALLOWED)
                await _respond(tcp, conn, 405, envelope, [_ALLOW], head=head, close=close)
            else:
                envelope = error_envelope("NOT_FOUND", _NOT_FOUND)
                await _respond(tcp, conn, 404, envelope, head=head, close=close)
        return not close

    # -- tunnels -------------------------------------------------------------------------

    async def _tunnel(
        self, tcp: trio.SocketStream, conn: h11.Connection, request: h11.Request, remote: str | None
    ) -> None:
        """Check the token, upgrade, and run the tunnel until it ends; closes ``tcp``."""
        with request_id_context(request.headers):
            try:
                with trio.fail_after(self.handshake_timeout + self.verify_timeout):
                    upgrade = await self._upgrade(tcp, conn, request, remote)
                    if upgrade is None:
                        await trio.aclose_forcefully(tcp)
                        return
                    device, ws_request = upgrade
                    ws = await ws_request.accept(
                        headers=[request_id_header()], max_message_size=TUNNEL_MAX_MESSAGE_SIZE
                    )
                # The socket outlives the WebSocket's aclose (see close_and_drain).
                spare = tcp.socket.dup()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            try:
                await self.state.tunnels.serve(device, ws, remote_address=remote)
            finally:
                with trio.move_on_after(self.drain_timeout) as drain:
                    await close_and_drain(ws, spare)
                if drain.cancelled_caught:
                    logger.warning(
                        "agent did not answer our close", extra={"device": device, "remote": remote}
                    )

    async def _upgrade(
        self, tcp: trio.SocketStream, conn: h11.Connection, request: h11.Request, remote: str | None
    ) -> tuple[str, WebSocketRequest] | None:
        """The device and the upgrade to accept, or None after the refusal (and close)."""
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(request.headers), request.target)
            trailing, _ = conn.trailing_data
            if trailing:
                ws.receive_data(bytes(trailing))  # handed to the connection on accept
            ws_request = next(event for event in ws.events() if isinstance(event, WsRequest))
        except (h11.ProtocolError, wsproto.utilities.ProtocolError, StopIteration) as exc:
            message = f"not a WebSocket upgrade: {exc}"
            await _refuse(tcp, conn, 400, "BAD_REQUEST", message)
            return None
        target = request.target.decode("latin-1")
        token = token_from_request(target, request.headers)
        admitted = await admit(
            self.state, self.verifier, token, timeout=self.verify_timeout, remote=remote
        )
        if isinstance(admitted, Refusal):
            await _refuse(tcp, conn, admitted.status, admitted.code, admitted.message)
            return None
        device = admitted
        return device, WebSocketRequest(tcp, ws, ws_request)


def _prepare(tcp: trio.SocketStream, tcp_user_timeout: float | None) -> str | None:
    """Set ``TCP_USER_TIMEOUT`` (see :class:`.tunnel_app.TunnelHypercornConfig`); the
    peer's address."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    with contextlib.suppress(OSError):
        if tcp_user_timeout is not None and option is not None:
            milliseconds = max(1, round(tcp_user_timeout * 1000))
            tcp.socket.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
    try:
        return "{}:{}".format(*tcp.socket.getpeername()[:2])
    except OSError:
        return None


def _is_tunnel_upgrade(request: h11.Request) -> bool:
    """A WebSocket upgrade (as hypercorn tells one: ``GET``, ``Connection: upgrade``,
    ``Upgrade: websocket``) of :data:`TUNNEL_PATH`."""
    if request.method != b"GET" or request.target.split(b"?", 1)[0] != TUNNEL_PATH.encode():
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


async def _respond(
    tcp: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    payload: object,
    headers: Headers = (),
    *,
    head: bool = False,
    close: bool = False,
) -> None:
    """A whole JSON response (``X-Request-ID`` added)."""
    body = json_bytes(payload)
    fields = [
        (b"content-type", JSON_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *headers,
        request_id_header(),
    ]
    if close:
        fields.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=fields)) or b""
    if not head:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await tcp.send_all(data)


async def _refuse(
    tcp: trio.SocketStream, conn: h11.Connection, status: int, code: str, message: str
) -> None:
    """Answer the upgrade with ``status`` and the error envelope; the connection ends."""
    headers = [(b"cache-control", b"no-store")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="visiona-tunnel"'))
    elif status == 503:
        headers.append((b"retry-after", b"5"))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await _respond(tcp, conn, status, error_envelope(code, message), headers, close=True)
