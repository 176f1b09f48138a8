"""``WS /internal/forward-ws/{device_id}/{path}``: a WebSocket through a device's tunnel,
relayed message by message, as a raw ASGI handler.

The relay opens a tunnel stream (``Tunnel.open_stream``; the agent pipes it to its local
server) and hands it to
:func:`visiona_services.common.ws_forward.forward_asgi_websocket`, which performs the
client handshake on it, accepts the caller with the subprotocol the local server chose,
and relays messages both ways (its docstring has how).

==================================================  =========================================
what happened                                        the caller gets
==================================================  =========================================
draining / no tunnel / handshake not answered in     503 ``SHUTTING_DOWN`` / 502
``forward_timeout`` / tunnel broke in the handshake  ``TUNNEL_DISCONNECTED`` / 504
or its answer passed ``MAX_HANDSHAKE_RESPONSE``       ``TUNNEL_TIMEOUT`` / 502 ``TUNNEL_ERROR``,
                                                     as HTTP responses (envelope)
the local server refused the upgrade (or the agent   that HTTP status, headers (minus
could not reach it: 502)                             hop-by-hop ones) and body
the local server closed with code C                  close C and its reason (1005, "no
                                                     code": 1000)
the tunnel broke after the handshake                 close 1011
the service started draining                         close 1001 (the agent side too)
the caller left during the handshake                 (nothing; the stream is reset, counted
                                                     as 499)
==================================================  =========================================

The caller closing (any code: hypercorn 0.18 reports every caller-side close as 1006, so
the code is lost) closes the local server's side with 1000.
"""

from __future__ import annotations

import logging

from visiona_tunnel import yamux

from ..common.http import ApiError, Receive, Scope, Send, reject_websocket_api_error
from ..common.ws_forward import WebSocketUpstream, forward_asgi_websocket
from .http_forward import TUNNEL_TIMEOUT
from .state import ProxyState

__all__ = ["forward_websocket"]

logger = logging.getLogger("visiona_services.remote_proxy.forward_ws")

#: Host header of the handshake to the local server (as for HTTP forwards).
_LOCAL_HOST = "localhost"


def _stream_failure(exc: Exception) -> ApiError | None:
    if isinstance(exc, yamux.SessionClosed | yamux.StreamsExhausted):
        return ApiError(502, "TUNNEL_DISCONNECTED", "the device's tunnel is closing")
    return None


async def forward_websocket(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, device_id: str, target: bytes
) -> None:
    """The raw ASGI handler for a ``websocket`` scope; see the module docstring."""
    await receive()  # websocket.connect
    with state.inflight:  # a drain waits for the relay's own 1001 close
        status = await _forward(state, scope, receive, send, device_id, target)
    state.metrics.forwards.labels(status=str(status)).inc()


async def _forward(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, device_id: str, target: bytes
) -> int:
    """Returns the status to count: 101 once accepted, else the HTTP status answered."""
    if state.draining.is_set():
        draining = ApiError(503, "SHUTTING_DOWN", "shutting down")
        return await reject_websocket_api_error(scope, send, draining)
    tunnel = state.tunnels.get(device_id)
    if tunnel is None:
        failure = ApiError(502, "TUNNEL_DISCONNECTED", f"{device_id!r} is not connected")
        return await reject_websocket_api_error(scope, send, failure)
    upstream = WebSocketUpstream(
        open=tunnel.open_stream,
        host=_LOCAL_HOST,
        target=target.decode("latin-1"),
        timeout=state.config.forward_timeout,
        timeout_error=TUNNEL_TIMEOUT,
        failure=_stream_failure,
        broken_error=ApiError(502, "TUNNEL_ERROR", "the tunnel failed during the handshake"),
        lost_reason="tunnel connection lost",
        closing=state.draining.wait,
        log_extra={"device": tunnel.key},
        logger=logger,
    )
    return await forward_asgi_websocket(scope, receive, send, upstream)
