"""The remote-proxy's internal API (VISIONA_PROXY_INTERNAL_HOST:PORT, 127.0.0.1:3801): what
the api-server calls to see sessions and to reach devices.

=================================================  =============================================
route                                              answer
=================================================  =============================================
``GET /internal/sessions``                         ``{"success": true, "data": [session, ...]}``
``GET /internal/sessions/{device_id}``             one session; 404 ``SESSION_NOT_FOUND``
``DELETE /internal/sessions/{device_id}``          closes the tunnel (GoAway, then WebSocket
                                                   close 1000; our agent redials within 1 s);
                                                   ``{"device_id": ..., "closed": true}``; 404
``ANY /internal/forward/{device_id}/{path}``       an HTTP request to the device's local server
                                                   (raw ASGI, :mod:`.http_forward`)
``WS /internal/forward-ws/{device_id}/{path}``     a WebSocket to it (raw ASGI, :mod:`.ws_forward`)
``GET /internal/events``                           the tunnels coming and going: a stream of
                                                   JSON lines (raw ASGI, :mod:`.events`)
``GET /internal/health``                           ``{"tunnels": n, "draining": bool}``
``GET /metrics``                                   Prometheus text (or OpenMetrics)
=================================================  =============================================

A session is ``{"device_id", "connected": true, "since" (ISO 8601 UTC), "remote_address",
"open_streams", "rtt_ms" (last keepalive round trip, or null), "bytes_in", "bytes_out"}``.

``GET /internal/events`` answers ``application/x-ndjson``, one JSON object per line, as
things happen: first ``{"type": "snapshot", "at", "sessions": [session, ...]}`` (every live
tunnel), then ``{"type": "tunnel.up", "device_id", "at", "session"}`` and ``{"type":
"tunnel.down", "device_id", "at", "reason"}``, a ``{"type": "heartbeat", "at"}`` every
``VISIONA_PROXY_EVENTS_HEARTBEAT`` seconds, and a last ``{"type": "shutdown", "at"}`` when the
proxy shuts down (or ``{"type": "overflow", "at"}`` for a subscriber that fell more than
``ProxyState.events_buffer`` lines behind). A replaced tunnel gives ``tunnel.down`` (reason
``"replaced"``) then the newer one's ``tunnel.up``. ``at`` is ISO 8601 UTC with milliseconds.

One middleware, :class:`InternalMiddleware`, sees every ``http`` and ``websocket`` scope
before anything else does. It picks the request id (``X-Request-ID``, see
:mod:`visiona_services.common.http`) and returns it on every response, requires
``Authorization: Bearer $VISIONA_INTERNAL_SECRET`` (else 401 ``UNAUTHORIZED``) -- so no route
can be added without it --, sends the streaming routes (:data:`RAW_ROUTES`) to their raw
ASGI handlers and the rest to Quart, and logs one access line per request. Every error is
the JSON envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast
from urllib.parse import unquote_to_bytes

import attrs
import quart
import trio
from hypercorn.config import Config as HypercornConfig
from quart_trio import QuartTrio

from visiona_tunnel.relay import TunnelStats

from ..common.http import (
    CLOSE_CONNECTION,
    ApiError,
    AsgiApp,
    Message,
    Receive,
    Scope,
    Send,
    bearer_matches,
    has_ambiguous_framing,
    install_json_error_handlers,
    json_response,
    log_access,
    ok_envelope,
    reject_websocket_error,
    request_id_context,
    send_error,
)
from ..common.metrics import exposition
from ..common.raw_route import LINGER_IDLE, RequestBody, ResponseWatch
from ..common.ws_forward import MAX_MESSAGE_SIZE
from .config import ProxyConfig
from .events import stream_events
from .http_forward import forward_http_request
from .sessions import session_json
from .state import ProxyState
from .ws_forward import forward_websocket

__all__ = [
    "RAW_ROUTES",
    "InternalMiddleware",
    "RawEndpoint",
    "RawRoute",
    "create_internal_app",
    "internal_hypercorn_config",
    "session_json",
]

logger = logging.getLogger("visiona_services.remote_proxy.internal")
access_logger = logging.getLogger("visiona_services.remote_proxy.access")

#: ``handler(state, scope, receive, send, device_id, target)``; ``target`` is the rest of
#: the path after the device id, escaped as received, with the query: ``/a%2Fb?x=1``.
RawHandler = Callable[[ProxyState, Scope, Receive, Send, str, bytes], Awaitable[None]]
#: ``handler(state, scope, receive, send)``: a raw route's handler with what the path says
#: bound (see :meth:`RawRoute.bind`), or a :class:`RawEndpoint`'s.
BoundHandler = Callable[[ProxyState, Scope, Receive, Send], Awaitable[None]]


@attrs.frozen
class RawRoute:
    """A route served by a raw ASGI handler instead of Quart: every path under ``prefix``
    (``{prefix}{device_id}/{path}``) of scope type ``kind``."""

    kind: str  # "http" or "websocket"
    #: The route as a Quart-style rule (for documentation and tests).
    rule: str
    prefix: bytes
    handler: RawHandler

    def match(self, scope: Scope) -> tuple[str, bytes] | None:
        """``(device_id, target)`` if ``scope`` is for this route, else None.

        The path is cut from ``raw_path``, so the device's path stays escaped as sent.
        """
        if scope["type"] != self.kind:
            return None
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(self.prefix):
            return None
        device, _, rest = raw_path[len(self.prefix) :].partition(b"/")
        device_id = unquote_to_bytes(device).decode("utf-8", "replace")
        if not device_id:
            return None
        target = b"/" + rest
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        return device_id, target

    def bind(self, scope: Scope) -> BoundHandler | None:
        """The handler for ``scope`` with the device id and target bound, if it matches."""
        matched = self.match(scope)
        if matched is None:
            return None
        device_id, target = matched

        async def handle(state: ProxyState, scope: Scope, receive: Receive, send: Send) -> None:
            await self.handler(state, scope, receive, send, device_id, target)

        return handle


@attrs.frozen
class RawEndpoint:
    """A route served by a raw ASGI handler at one exact path (any query, any method: the
    handler answers the methods it does not take), without a device id."""

    kind: str  # "http" or "websocket"
    #: The route as a Quart-style rule (for documentation and tests).
    rule: str
    path: bytes
    handler: BoundHandler

    def bind(self, scope: Scope) -> BoundHandler | None:
        """The handler, if ``scope`` is for this route."""
        if scope["type"] != self.kind:
            return None
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        return self.handler if raw_path == self.path else None


#: The raw ASGI routes, as data: the middleware dispatches on them, tests iterate them.
RAW_ROUTES: tuple[RawRoute | RawEndpoint, ...] = (
    RawRoute(
        "http",
        "/internal/forward/<device_id>/<path:path>",
        b"/internal/forward/",
        forward_http_request,
    ),
    RawRoute(
        "websocket",
        "/internal/forward-ws/<device_id>/<path:path>",
        b"/internal/forward-ws/",
        forward_websocket,
    ),
    RawEndpoint("http", "/internal/events", b"/internal/events", stream_events),
)


class _ResponseWatch(ResponseWatch):
    """:class:`ResponseWatch` that also sets ``X-Request-ID`` on the response head
    (replacing a device's own); its status is the access log's."""

    def __init__(self, send: Send, request_id: str, *, closing: bool = False) -> None:
        super().__init__(send)
        self._headers = [(b"X-Request-ID", request_id.encode())]
        if closing:  # RFC 9112 6.1 (has_ambiguous_framing)
            self._headers.append(CLOSE_CONNECTION)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind in ("http.response.start", "websocket.http.response.start", "websocket.accept"):
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
            message = {**message, "headers": [*headers, *self._headers]}
        await super().send(message)


class InternalMiddleware:
    """Request id, authentication, raw routes, access log; see the module docstring."""

    def __init__(
        self,
        state: ProxyState,
        app: AsgiApp,
        routes: Sequence[RawRoute | RawEndpoint] = RAW_ROUTES,
    ) -> None:
        self.state = state
        self.app = app
        self.routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        with request_id_context(scope.get("headers", [])) as request_id:
            closing = has_ambiguous_framing(scope.get("headers", []))
            watch = _ResponseWatch(send, request_id, closing=closing)
            start = trio.current_time()
            try:
                try:
                    await self._dispatch(scope, receive, watch)
                except Exception:
                    logger.exception("unhandled error in %s", scope.get("path"))
                    await watch.fail(scope, ApiError(500, "INTERNAL_ERROR", "internal error"))
                if watch.body is not None:
                    await watch.body.discard_rest(LINGER_IDLE)
            finally:
                log_access(access_logger, scope, watch.status, start)

    async def _dispatch(self, scope: Scope, receive: Receive, watch: _ResponseWatch) -> None:
        send = watch.send
        authorized = bearer_matches(scope.get("headers", []), self.state.config.internal_secret)
        handler = self._route(scope) if authorized else None
        if scope["type"] == "http" and (handler is not None or not authorized):
            # Ours to read; Quart reads the body of its own routes.
            watch.body = RequestBody(receive)
            receive = watch.body.receive
        if not authorized:
            await self._unauthorized(scope, receive, send)
            return
        if handler is not None:
            await handler(self.state, scope, receive, send)
            return
        if scope["type"] == "websocket":  # Quart has no websocket routes here
            await receive()
            await reject_websocket_error(scope, send, 404, "NOT_FOUND", "no such route")
            return
        await self.app(scope, receive, send)

    def _route(self, scope: Scope) -> BoundHandler | None:
        for route in self.routes:
            handler = route.bind(scope)
            if handler is not None:
                return handler
        return None

    async def _unauthorized(self, scope: Scope, receive: Receive, send: Send) -> None:
        challenge = (b"www-authenticate", b"Bearer")
        message = "Authorization: Bearer <internal secret> required"
        if scope["type"] == "http":
            await send_error(send, 401, "UNAUTHORIZED", message, [challenge])
            return
        await receive()  # websocket.connect
        await reject_websocket_error(scope, send, 401, "UNAUTHORIZED", message, [challenge])


# -- the Quart routes -----------------------------------------------------------------------


def _register_routes(app: QuartTrio, state: ProxyState) -> None:
    def tunnel_of(device_id: str) -> TunnelStats:
        tunnel = state.tunnels.get(device_id)
        if tunnel is None:
            raise ApiError(404, "SESSION_NOT_FOUND", f"device {device_id!r} is not connected")
        return tunnel.stats()

    @app.get("/internal/sessions")
    async def list_sessions() -> quart.Response:
        sessions = sorted((session_json(t.stats()) for t in state.tunnels), key=_by_device)
        return json_response(200, ok_envelope(sessions))

    # ``path``: a device id may hold "/", which hypercorn has unescaped from %2F by now.
    @app.get("/internal/sessions/<path:device_id>")
    async def get_session(device_id: str) -> quart.Response:
        return json_response(200, ok_envelope(session_json(tunnel_of(device_id))))

    @app.delete("/internal/sessions/<path:device_id>")
    async def close_session(device_id: str) -> quart.Response:
        tunnel = state.tunnels.get(device_id)
        if tunnel is None:
            raise ApiError(404, "SESSION_NOT_FOUND", f"device {device_id!r} is not connected")
        await tunnel.close(1000, "closed by the remote-proxy")
        logger.info("session closed by request", extra={"device": device_id})
        return json_response(200, ok_envelope({"device_id": device_id, "closed": True}))

    @app.get("/internal/health")
    async def health() -> quart.Response:
        # Cheap at any number of tunnels: the api-server's health check calls it.
        draining = state.draining.is_set()
        return json_response(
            200, ok_envelope({"tunnels": len(state.tunnels), "draining": draining})
        )

    @app.get("/metrics")
    async def metrics() -> quart.Response:
        body, content_type = exposition(state.metrics.registry, quart.request.headers.get("Accept"))
        return quart.Response(body, status=200, content_type=content_type)


def _by_device(session: dict[str, object]) -> str:
    return str(session["device_id"])


def create_internal_app(state: ProxyState) -> QuartTrio:
    """The internal API app; serve it with :func:`internal_hypercorn_config`."""
    app = QuartTrio(__name__, static_folder=None)
    install_json_error_handlers(app)
    _register_routes(app, state)
    quart_app = cast(AsgiApp, app.asgi_app)  # hypercorn's TypedDicts are narrower
    app.asgi_app = InternalMiddleware(state, quart_app)  # type: ignore[method-assign,assignment]
    return app


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def internal_hypercorn_config(config: ProxyConfig) -> HypercornConfig:
    """hypercorn settings for the internal listener.

    Response headers are the agent's: hypercorn adds no ``Date`` or ``Server``, and keeps
    the case of request header names (``h11_pass_raw_headers``). The access log is the
    middleware's (JSON, with the request id); hypercorn's errors go to ``logging``.
    """
    hyper = HypercornConfig()
    hyper.bind = [_bind(config.internal_host, config.internal_port)]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.include_date_header = False
    hyper.include_server_header = False
    hyper.h11_pass_raw_headers = True
    hyper.websocket_max_message_size = MAX_MESSAGE_SIZE
    # The service waits for in-flight forwards itself (state.inflight) before it stops
    # the server; what is left by then gets a few seconds.
    hyper.graceful_timeout = min(5.0, config.shutdown_grace)
    return hyper
