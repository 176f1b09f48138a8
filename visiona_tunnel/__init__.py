"""visionA tunnel: structured-concurrency reverse tunnels on trio.

Layers, bottom up: :mod:`visiona_tunnel.yamux` (the multiplexer), :mod:`~visiona_tunnel.wsconn`
(a WebSocket as a byte stream), :mod:`~visiona_tunnel.agent_stream` and
:mod:`~visiona_tunnel.httpstream` (one HTTP exchange per stream, agent and relay side),
:mod:`~visiona_tunnel.client` (the reconnecting agent), :mod:`~visiona_tunnel.relay`
(live tunnels by device) and :mod:`~visiona_tunnel.listener` (where agents dial in).
Beside them, :mod:`~visiona_tunnel.pairing` (trade a pairing token for a device token at the
api-server) and :mod:`~visiona_tunnel.credentials` (where the agent keeps it).
"""

from . import yamux
from .client import (
    ClientConfig,
    ClientHooks,
    ClientState,
    RelayBusy,
    Replaced,
    TokenRefused,
    TunnelClient,
)
from .credentials import (
    CredentialsError,
    DeviceCredentials,
    default_credentials_path,
    load_credentials,
    store_credentials,
)
from .httpstream import ExchangeError, HttpResponse
from .listener import Answer, ListenerRequest, Refusal, admit_with, serve_tunnel_listener
from .pairing import (
    PairingError,
    PairingFailed,
    PairingRefused,
    PairingResult,
    PairingUnavailable,
    pair_device,
)
from .relay import (
    TokenVerifier,
    Tunnel,
    TunnelDown,
    TunnelRegistry,
    TunnelStats,
    TunnelUp,
    VerifierUnavailable,
)
from .wsconn import (
    CLOSE_REPLACED,
    WebSocketClosed,
    WebSocketRejected,
    WebSocketStream,
    connect_websocket_stream,
)

__version__ = "0.1.0"

# What a user needs, at one level: the agent (client, pairing, credentials), the relay
# (registry, listener, requests), the WebSocket transport. The layers below have their own
# modules: yamux, httpstream.http_exchange, agent_stream.serve_tunnel_stream, backoff.
__all__ = [
    "CLOSE_REPLACED",
    "Answer",
    "ClientConfig",
    "ClientHooks",
    "ClientState",
    "CredentialsError",
    "DeviceCredentials",
    "ExchangeError",
    "HttpResponse",
    "ListenerRequest",
    "PairingError",
    "PairingFailed",
    "PairingRefused",
    "PairingResult",
    "PairingUnavailable",
    "Refusal",
    "RelayBusy",
    "Replaced",
    "TokenRefused",
    "TokenVerifier",
    "Tunnel",
    "TunnelClient",
    "TunnelDown",
    "TunnelRegistry",
    "TunnelStats",
    "TunnelUp",
    "VerifierUnavailable",
    "WebSocketClosed",
    "WebSocketRejected",
    "WebSocketStream",
    "__version__",
    "admit_with",
    "connect_websocket_stream",
    "default_credentials_path",
    "load_credentials",
    "pair_device",
    "serve_tunnel_listener",
    "store_credentials",
    "yamux",
]
