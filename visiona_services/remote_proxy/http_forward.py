"""``ANY /internal/forward/{device_id}/{path}``: one HTTP request through a device's tunnel,
as a raw ASGI handler (Quart would buffer the upload and cut long downloads).

The caller's request goes to the agent as ``METHOD /{path}?{query} HTTP/1.1`` (the path
as the caller escaped it), streamed both ways by
:func:`visiona_services.common.http_forward.forward_asgi_http` (its docstring has how: the
headers the agent gets, the watcher, the timeout), with the tunnel as the upstream:

==================================================  =========================================
what happened                                        the caller gets
==================================================  =========================================
the service is draining                              503 ``SHUTTING_DOWN``
no tunnel for the device (or it is closing)          502 ``TUNNEL_DISCONNECTED``
the tunnel kept us waiting ``forward_timeout`` for   504 ``TUNNEL_TIMEOUT``
the response head
the tunnel stream broke before the response head     502 ``TUNNEL_ERROR``
the agent's response (its 502 for an unreachable     that response: status, headers minus
local server included)                               hop-by-hop ones, body
the tunnel broke mid-body                            the response ends abruptly (the
                                                     connection is closed; the caller
                                                     sees a short body)
==================================================  =========================================

The response's end (or the error answer) goes out while the internal middleware drains the
rest of the request body (:class:`visiona_services.common.raw_route.RequestBody`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable
from contextlib import AbstractAsyncContextManager

from visiona_tunnel import yamux
from visiona_tunnel.httpstream import ExchangeError, HttpResponse

from ..common.http import ApiError, Receive, Scope, Send, send_error
from ..common.http_forward import ForwardHooks, HttpUpstream, forward_asgi_http
from .state import ProxyMetrics, ProxyState

__all__ = ["TUNNEL_TIMEOUT", "forward_http_request"]

logger = logging.getLogger("visiona_services.remote_proxy.forward")

TUNNEL_TIMEOUT = ApiError(504, "TUNNEL_TIMEOUT", "the device did not answer in time")


def _tunnel_failure(exc: Exception) -> ApiError | None:
    """The answer to a tunnel that failed before the response head (or the handshake)."""
    if isinstance(exc, ExchangeError | yamux.StreamReset | yamux.StreamsExhausted):
        return ApiError(502, "TUNNEL_ERROR", "the tunnel failed before the response")
    if isinstance(exc, yamux.SessionClosed):
        return ApiError(502, "TUNNEL_DISCONNECTED", "the device's tunnel is closing")
    return None


def _forward_hooks(metrics: ProxyMetrics) -> ForwardHooks:
    return ForwardHooks(
        head=metrics.forward_seconds.observe,
        request_bytes=metrics.forward_request_bytes.inc,
        response_bytes=metrics.forward_response_bytes.inc,
    )


async def forward_http_request(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, device_id: str, target: bytes
) -> None:
    """The raw ASGI handler: forward one request to ``device_id``'s agent as ``target``
    (``/path?query``, escaped). Never raises for what the tunnel or the caller did."""
    metrics = state.metrics
    if state.draining.is_set():
        metrics.forwards.labels(status="503").inc()
        await send_error(send, 503, "SHUTTING_DOWN", "the remote-proxy is shutting down")
        return
    tunnel = state.tunnels.get(device_id)
    if tunnel is None:
        metrics.forwards.labels(status="502").inc()
        await send_error(send, 502, "TUNNEL_DISCONNECTED", f"device {device_id!r} is not connected")
        return

    def open_exchange(
        method: str, headers: list[tuple[bytes, bytes]], body: bytes | AsyncIterable[bytes]
    ) -> AbstractAsyncContextManager[HttpResponse]:
        return tunnel.request(method, target, headers, body)

    upstream = HttpUpstream(
        open=open_exchange,
        timeout=state.config.forward_timeout,
        timeout_error=TUNNEL_TIMEOUT,
        failure=_tunnel_failure,
        hooks=_forward_hooks(metrics),
        log_extra={"device": tunnel.key},
        logger=logger,
    )
    with state.inflight:
        status = await forward_asgi_http(scope, receive, send, upstream)
    metrics.forwards.labels(status=str(status)).inc()
