"""visionA tunnel: structured-concurrency reverse tunnels on trio.

Layers, bottom up: :mod:`visiona_tunnel.yamux` (the multiplexer), :mod:`~visiona_tunnel.wsconn`
(a WebSocket as a byte stream), :mod:`~visiona_tunnel.forward` and
:mod:`~visiona_tunnel.httpstream` (one HTTP exchange per stream, agent and relay side),
:mod:`~visiona_tunnel.client` (the reconnecting agent) and :mod:`~visiona_tunnel.relay`
(live tunnels by device).
"""

from .backoff import backoff
from .client import (
    ClientConfig,
    ClientHooks,
    ClientState,
    Replaced,
    TokenRefused,
    TunnelClient,
)
from .forward import serve_tunnel_stream
from .httpstream import ForwardError, HttpResponse, forward_http
from .relay import Tunnel, TunnelDown, TunnelRegistry, TunnelStats, TunnelUp, serve_tunnel_listener
from .wsconn import (
    CLOSE_REPLACED,
    WebSocketClosed,
    WebSocketRejected,
    WebSocketStream,
    connect_websocket_stream,
)

__version__ = "0.1.0"

__all__ = [
    "CLOSE_REPLACED",
    "ClientConfig",
    "ClientHooks",
    "ClientState",
    "ForwardError",
    "HttpResponse",
    "Replaced",
    "TokenRefused",
    "Tunnel",
    "TunnelClient",
    "TunnelDown",
    "TunnelRegistry",
    "TunnelStats",
    "TunnelUp",
    "WebSocketClosed",
    "WebSocketRejected",
    "WebSocketStream",
    "__version__",
    "backoff",
    "connect_websocket_stream",
    "forward_http",
    "serve_tunnel_listener",
    "serve_tunnel_stream",
]
