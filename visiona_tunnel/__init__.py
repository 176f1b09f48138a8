"""visionA tunnel: structured-concurrency reverse tunnels on trio.

Layers, bottom up: :mod:`visiona_tunnel.yamux` (the multiplexer), :mod:`~visiona_tunnel.wsconn`
(a WebSocket as a byte stream), :mod:`~visiona_tunnel.agent_stream` and
:mod:`~visiona_tunnel.httpstream` (one HTTP exchange per stream, agent and relay side),
:mod:`~visiona_tunnel.client` (the reconnecting agent), :mod:`~visiona_tunnel.relay`
(live tunnels by device) and :mod:`~visiona_tunnel.listener` (where agents dial in).
Beside them, :mod:`~visiona_tunnel.pairing` (trade a pairing token for a device token at the
api-server) and :mod:`~visiona_tunnel.credentials` (where the agent keeps it).
"""

from .agent_stream import serve_tunnel_stream
from .backoff import backoff
from .client import (
    ClientConfig,
    ClientHooks,
    ClientState,
    Replaced,
    TokenRefused,
    TunnelClient,
    check_relay_url,
)
from .credentials import (
    CredentialsError,
    DeviceCredentials,
    default_credentials_path,
    load_credentials,
    store_credentials,
)
from .httpstream import ForwardError, HttpResponse, http_exchange
from .listener import (
    Answer,
    ListenerRequest,
    Refusal,
    admit_with,
    plain_text,
    serve_tunnel_listener,
)
from .pairing import (
    PairingError,
    PairingFailed,
    PairingRefused,
    PairingResult,
    PairingUnavailable,
    exchange_pairing_token,
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

__all__ = [
    "CLOSE_REPLACED",
    "Answer",
    "ClientConfig",
    "ClientHooks",
    "ClientState",
    "CredentialsError",
    "DeviceCredentials",
    "ForwardError",
    "HttpResponse",
    "ListenerRequest",
    "PairingError",
    "PairingFailed",
    "PairingRefused",
    "PairingResult",
    "PairingUnavailable",
    "Refusal",
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
    "backoff",
    "check_relay_url",
    "connect_websocket_stream",
    "default_credentials_path",
    "exchange_pairing_token",
    "http_exchange",
    "load_credentials",
    "pair_device",
    "plain_text",
    "serve_tunnel_listener",
    "serve_tunnel_stream",
    "store_credentials",
]
