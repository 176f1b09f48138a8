"""Forwarding to a device: every path under a forwarded prefix (``VISIONA_FORWARD_PREFIXES``:
``/api/cameras/``, ``/api/inference/``, ``/api/devices/scan``, ``/ws/``), HTTP or
WebSocket, goes to the chosen device's local server at the same path and query, through the
remote-proxy (``{VISIONA_PROXY_INTERNAL_URL}/internal/forward/{device_id}/...`` and
``/internal/forward-ws/{device_id}/...``).

:class:`ForwardDispatcher` sits between :class:`~.middleware.ApiMiddleware` (request id,
CORS, access log) and Quart, and serves these paths as raw ASGI: bodies stream both ways
with backpressure, with neither Quart's buffering nor its response timeout
(:mod:`visiona_services.common.http_forward`, :mod:`visiona_services.common.ws_forward`;
the exchange with the remote-proxy is one TCP connection per forward, HTTP/1.1 by
``visiona_tunnel.httpstream``, or trio-websocket over it).

* **Which paths.** A prefix ending in ``/`` takes every path below it; one without takes
  itself and the paths below it (``/api/devices/scan`` is not ``/api/devices/scanner``).
  A path with a ``.`` or ``..`` segment is not forwarded (404): the device is reached at
  the forwarded prefixes only.
* **Rules.** Those of every session route (:func:`.policy.authorize`): a session (401),
  ``X-CSRF: 1`` on unsafe methods and an allowed ``Origin`` (403).
* **Which device.** The ``device_id`` query parameter (removed before forwarding) or the
  ``X-Device-ID`` header; naming none, the caller's only device
  (:func:`.devices.resolve_device`): several -> 400 ``DEVICE_REQUIRED``; not the caller's
  or unknown -> 404 ``DEVICE_NOT_FOUND``; two different ones named -> 400 ``BAD_REQUEST``.
* **Headers.** The device never gets ``Cookie`` (the session), ``X-CSRF``,
  ``Authorization`` (the remote-proxy gets ours, the internal secret), ``X-Device-ID``,
  ``Host``, ``Expect`` or hop-by-hop headers; it gets our ``X-Request-ID``. The caller
  never gets the device's ``Set-Cookie``, CORS headers (the api-server's CORS rules hold)
  or ``Date`` (ours).
* **Answers.** The remote-proxy's, as received (``TUNNEL_DISCONNECTED``,
  ``TUNNEL_TIMEOUT``, ``TUNNEL_ERROR`` ...); the remote-proxy unreachable or failing
  before its answer -> 502 ``REMOTE_PROXY_UNAVAILABLE``; silent for
  ``VISIONA_FORWARD_TIMEOUT`` -> 504 ``REMOTE_PROXY_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import quote, unquote_to_bytes

import attrs
import trio

from visiona_tunnel.httpstream import HttpResponse, http_exchange

from ..common.http import (
    ApiError,
    AsgiApp,
    Receive,
    Scope,
    Send,
    header_values,
    reject_websocket_api_error,
    send_api_error,
)
from ..common.http_forward import HttpUpstream, forward_asgi_http
from ..common.internal_url import InternalUrl
from ..common.raw_route import LINGER_IDLE, RequestBody, ResponseWatch
from ..common.ws_forward import WebSocketUpstream, forward_asgi_websocket
from .config import ApiConfig
from .devices import resolve_device
from .errors import DomainError
from .policy import Access, RequestFacts, authorize
from .services import ApiServices

__all__ = [
    "DROPPED_REQUEST_HEADERS",
    "DROPPED_RESPONSE_HEADERS",
    "FORWARD_KINDS",
    "ForwardDispatcher",
    "ForwardRoute",
    "forward_routes",
    "split_device_query",
]

logger = logging.getLogger("visiona_services.api_server.forwarding")

#: Each forwarded prefix is forwarded for both.
FORWARD_KINDS = ("http", "websocket")
#: The remote-proxy's forwarding routes, by scope type.
_UPSTREAM_ROUTES = {"http": "/internal/forward/", "websocket": "/internal/forward-ws/"}
DEVICE_PARAMETER = b"device_id"
DEVICE_HEADER = b"x-device-id"
#: Request headers the device never sees (beyond those every forward drops: ``Host``,
#: ``Authorization``, ``Expect``, hop-by-hop ones; ``X-Request-ID`` becomes ours).
DROPPED_REQUEST_HEADERS = frozenset({b"cookie", b"x-csrf", DEVICE_HEADER})
#: Response headers of the device the browser never sees (beyond hop-by-hop ones).
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        b"set-cookie",
        b"date",
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)
#: A ``.`` or ``..`` path segment (``\\`` counted as ``/``, as some servers do).
_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.{1,2}(?:[/\\]|$)")
#: The code of an unexpected failure (as the app's, ``app.INTERNAL_CODE``).
_INTERNAL = ApiError(500, "INTERNAL", "internal error")
_NOT_FORWARDED = ApiError(404, "NOT_FOUND", "no such route")


@attrs.frozen
class ForwardRoute:
    """Every path under ``prefix`` with scope type ``kind`` goes to the device."""

    kind: str  # "http" or "websocket"
    prefix: str

    @property
    def rule(self) -> str:
        """The route as a Quart-style rule (for documentation and tests)."""
        if self.prefix.endswith("/"):
            return f"{self.prefix}<path:path>"
        return self.prefix

    def matches(self, scope: Scope) -> bool:
        if scope["type"] != self.kind:
            return False
        path: str = scope["path"]
        if self.prefix.endswith("/"):
            return path.startswith(self.prefix)
        return path == self.prefix or path.startswith(self.prefix + "/")


def forward_routes(config: ApiConfig) -> tuple[ForwardRoute, ...]:
    """The forwarded routes, as data: the dispatcher matches them, tests walk them."""
    return tuple(
        ForwardRoute(kind, prefix) for prefix in config.forwarded_prefixes for kind in FORWARD_KINDS
    )


def split_device_query(query: bytes) -> tuple[bytes, list[str]]:
    """The query string without its ``device_id`` parameters (the rest byte for byte, in
    order), and their values."""
    kept: list[bytes] = []
    named: list[str] = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == DEVICE_PARAMETER:
            named.append(unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8", "replace"))
        else:
            kept.append(part)
    return b"&".join(kept), named


def _named_device(scope: Scope, named_in_query: list[str]) -> str | None:
    """The device the request names, if any.

    Raises:
        ApiError: 400 ``BAD_REQUEST`` when it names two different ones.
    """
    headers = [value.decode("latin-1") for value in header_values(scope["headers"], DEVICE_HEADER)]
    named = {value.strip() for value in [*named_in_query, *headers]} - {""}
    if len(named) > 1:
        raise ApiError(400, "BAD_REQUEST", "name one device (device_id or X-Device-ID)")
    return named.pop() if named else None


def _proxy_failure(exc: Exception) -> ApiError | None:
    """Connecting failed, or the connection broke before the remote-proxy's answer."""
    if isinstance(exc, OSError | trio.BrokenResourceError):
        return ApiError(502, "REMOTE_PROXY_UNAVAILABLE", "the remote-proxy cannot be reached")
    return None


#: Reads of the remote-proxy's response: on a busy machine more than the tunnel's 64 KiB
#: often waits on this TCP connection, and fewer, larger pieces cost less CPU per byte on
#: their way to the browser (15-20% less for a download than 64 KiB reads;
#: docs/performance.md).
PROXY_READ_SIZE = 256 * 1024
_PROXY_TIMEOUT = ApiError(504, "REMOTE_PROXY_TIMEOUT", "the remote-proxy did not answer in time")
_PROXY_BROKEN = ApiError(502, "REMOTE_PROXY_UNAVAILABLE", "the remote-proxy failed to answer")


class ForwardDispatcher:
    """ASGI: the forwarded routes to the device (see the module docstring), everything else
    to ``app``."""

    def __init__(self, services: ApiServices, app: AsgiApp) -> None:
        self.services = services
        self.app = app
        self.routes = forward_routes(services.config)
        self.proxy = InternalUrl.parse(services.config.proxy_internal_url, allow_https=True)
        self._authorization = (
            b"Authorization",
            f"Bearer {services.config.internal_secret}".encode(),
        )
        self._ssl = ssl.create_default_context() if self.proxy.tls else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not any(route.matches(scope) for route in self.routes):
            await self.app(scope, receive, send)
            return
        body: RequestBody | None = None
        if scope["type"] == "http":
            body = RequestBody(receive)  # ours to read, and to drain when unread
            receive = body.receive
        else:
            await receive()  # websocket.connect
        watch = ResponseWatch(send, body)
        try:
            await self._forward(scope, receive, watch.send)
        except Exception:
            logger.exception("forward failed unexpectedly")
            await watch.fail(scope, _INTERNAL)
        if body is not None:
            await body.discard_rest(LINGER_IDLE)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = scope["type"] == "websocket"
        query, named = split_device_query(scope.get("query_string", b""))
        try:
            if _DOT_SEGMENT.search(scope["path"]):
                raise _NOT_FORWARDED
            device_id = await self._device(scope, named)
        except ApiError as error:
            if websocket:
                await reject_websocket_api_error(scope, send, error)
            else:
                await send_api_error(send, error)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        target = (
            f"{self.proxy.prefix}{_UPSTREAM_ROUTES[scope['type']]}{quote(device_id, safe='')}"
        ).encode() + raw_path
        if query:
            target += b"?" + query
        config = self.services.config
        with self.services.forwards:
            if websocket:
                ws_upstream = WebSocketUpstream(
                    open=self._connect,
                    host=self.proxy.netloc,
                    target=target.decode("latin-1"),
                    timeout=config.forward_timeout,
                    timeout_error=_PROXY_TIMEOUT,
                    failure=_proxy_failure,
                    broken_error=_PROXY_BROKEN,
                    extra_headers=[self._authorization],
                    drop_request_headers=DROPPED_REQUEST_HEADERS,
                    drop_response_headers=DROPPED_RESPONSE_HEADERS,
                    lost_reason="remote-proxy connection lost",
                    log_extra={"device": device_id},
                    logger=logger,
                )
                await forward_asgi_websocket(scope, receive, send, ws_upstream)
            else:
                upstream = HttpUpstream(
                    open=functools.partial(self._open, target),
                    timeout=config.forward_timeout,
                    timeout_error=_PROXY_TIMEOUT,
                    failure=_proxy_failure,
                    drop_request_headers=DROPPED_REQUEST_HEADERS,
                    drop_response_headers=DROPPED_RESPONSE_HEADERS,
                    log_extra={"device": device_id},
                    logger=logger,
                )
                await forward_asgi_http(scope, receive, send, upstream)

    async def _device(self, scope: Scope, named_in_query: list[str]) -> str:
        """The caller's device the request is for.

        Raises:
            ApiError: the rules refused the request, or no device fits.
        """
        user = await authorize(self.services, RequestFacts.of_scope(scope), Access.SESSION)
        assert user is not None  # a session route
        named = _named_device(scope, named_in_query)
        try:
            return await self.services.db.run(
                functools.partial(resolve_device, user_id=user.user_id, named=named)
            )
        except DomainError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None

    async def _connect(self) -> trio.abc.Stream:
        """A new connection to the remote-proxy's internal API."""
        if self._ssl is not None:
            return await trio.open_ssl_over_tcp_stream(
                self.proxy.host, self.proxy.port, ssl_context=self._ssl, https_compatible=True
            )
        return await trio.open_tcp_stream(self.proxy.host, self.proxy.port)

    @contextlib.asynccontextmanager
    async def _open(
        self,
        target: bytes,
        method: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> AsyncIterator[HttpResponse]:
        """The forward's exchange with the remote-proxy, on a connection of its own (closed
        with the exchange)."""
        stream = await self._connect()
        async with http_exchange(
            stream,
            method,
            target,
            [*headers, self._authorization],
            body,
            host=self.proxy.netloc,
            read_size=PROXY_READ_SIZE,
        ) as response:
            yield response
