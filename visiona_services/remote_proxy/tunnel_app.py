"""The remote-proxy's tunnel listener (VISIONA_TUNNEL_HOST:PORT, 0.0.0.0:3800): agents
connect here.

Routes:

* ``GET /healthz`` -> ``{"success": true, "data": {"status": "ok", "sessions": N}}``;
  503 ``DRAINING`` (error envelope) while the service drains.
* ``GET /tunnel/connect?token=...`` (WebSocket; ``Authorization: Bearer <token>`` also
  works): the token is verified *before* the upgrade. Refusals are HTTP responses with the
  error envelope ``{"success": false, "error": {"code", "message", "request_id"}}``:

  * 401 ``UNAUTHORIZED``: no token, or the verifier does not know it (the body does not
    say which; counted in ``metrics.auth_failures``);
  * 503 ``AUTH_UNAVAILABLE``: the verifier cannot answer (:class:`.VerifierUnavailable`
    or no answer within ``verify_timeout``);
  * 503 ``DRAINING``: the service is shutting down (``state.draining``).

  Accepted, ``state.tunnels.serve(device_id, ...)`` runs the yamux server session until it
  ends; a reconnect of the same device replaces the older tunnel (close 4001, done by the
  registry). A plain GET there (no upgrade) gets 426 ``UPGRADE_REQUIRED``.

Every response carries ``X-Request-ID`` (the caller's if sane, else a new one), and log
lines made while a request is handled -- for a tunnel, for its whole life -- carry it too
(:data:`~visiona_services.common.http.current_request_id`).

The WebSocket goes around Quart: :class:`TunnelMiddleware` takes the ``websocket`` scope at
``/tunnel/connect``, refuses with the ASGI ``websocket.http.response`` extension (hypercorn
has it), and otherwise runs the tunnel on :class:`~.asgi_websocket.AsgiWebSocketStream`
(Quart's websocket object would queue messages without bound; hypercorn's own queue holds
10, which is backpressure on the agent). Tokens are never logged.

Serve it with :func:`tunnel_hypercorn_config`: hypercorn's default 16 MiB message limit is
too small for a Go agent (see :data:`TUNNEL_MAX_MESSAGE_SIZE`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import cast

import quart
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from quart_trio import QuartTrio

from visiona_tunnel.relay import token_from_request

from ..common.http import (
    AsgiApp,
    Message,
    Receive,
    Scope,
    Send,
    error_envelope,
    install_json_error_handlers,
    json_response,
    ok_envelope,
    reject_websocket_error,
    request_id_context,
    request_id_header,
)
from .asgi_websocket import AsgiWebSocketStream
from .config import ProxyConfig
from .state import ProxyState
from .verify import Refusal, TokenVerifier, admit

__all__ = [
    "DRAIN_TIMEOUT",
    "TCP_USER_TIMEOUT",
    "TUNNEL_MAX_MESSAGE_SIZE",
    "TUNNEL_PATH",
    "VERIFY_TIMEOUT",
    "TunnelEndpoint",
    "TunnelHypercornConfig",
    "TunnelMiddleware",
    "create_tunnel_app",
    "tunnel_hypercorn_config",
]

logger = logging.getLogger("visiona_services.remote_proxy.tunnel")

MiB = 1024 * 1024
#: Where agents connect.
TUNNEL_PATH = "/tunnel/connect"
#: The largest WebSocket message hypercorn takes from an agent. A Go (hashicorp) agent
#: writes a Data frame's body as one message, as large as its send window (with a 16 MiB
#: window: 16 MiB, plus the 12-byte header in a message of its own); twice that, plus
#: headroom. hypercorn's default (16 MiB) would close such an agent with 1009.
TUNNEL_MAX_MESSAGE_SIZE = 32 * MiB + 64 * 1024
#: How long a token check may take before the agent gets 503.
VERIFY_TIMEOUT = 10.0
#: How long, after a tunnel ended, we wait for the agent's close reply.
DRAIN_TIMEOUT = 10.0
#: The kernel aborts a tunnel connection whose sent data stays unacknowledged this long
#: (seconds), see :class:`TunnelHypercornConfig`. The relay's yamux keepalive timeout.
TCP_USER_TIMEOUT = 30.0


def _remote_address(scope: Scope) -> str | None:
    client = scope.get("client")
    return "{}:{}".format(*client[:2]) if client else None


class TunnelEndpoint:
    """The raw-ASGI handler of the ``websocket`` scope at :data:`TUNNEL_PATH` (expects
    :data:`current_request_id` to be set, as :class:`TunnelMiddleware` does)."""

    def __init__(
        self,
        state: ProxyState,
        verifier: TokenVerifier,
        *,
        verify_timeout: float = VERIFY_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.state = state
        self.verifier = verifier
        self.verify_timeout = verify_timeout
        self.drain_timeout = drain_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # gone before the handshake reached us
        remote = _remote_address(scope)
        device = await self._admit(scope, send, remote)
        if device is None:
            return
        await send({"type": "websocket.accept", "headers": [request_id_header()]})
        ws = AsgiWebSocketStream(receive, send)
        try:
            # TunnelRegistry.serve is annotated with WebSocketStream but needs only a trio
            # Stream whose aclose takes (code, reason), which this is.
            await self.state.tunnels.serve(device, ws, remote_address=remote)
        finally:
            with trio.move_on_after(self.drain_timeout) as drain:
                await ws.aclose()
                await ws.drain()
            if drain.cancelled_caught:
                logger.warning(
                    "agent did not answer our close", extra={"device": device, "remote": remote}
                )

    async def _admit(self, scope: Scope, send: Send, remote: str | None) -> str | None:
        """The device id to serve, or None after sending the refusal."""
        target = "?" + bytes(scope.get("query_string", b"")).decode("latin-1")
        token = token_from_request(target, scope.get("headers", []))
        admitted = await admit(
            self.state, self.verifier, token, timeout=self.verify_timeout, remote=remote
        )
        if isinstance(admitted, Refusal):
            await _refuse(scope, send, admitted.status, admitted.code, admitted.message)
            return None
        return admitted


async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    """Answer the handshake with ``status`` and the error envelope."""
    headers = [(b"cache-control", b"no-store"), request_id_header()]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="visiona-tunnel"'))
    elif status == 503:
        headers.append((b"retry-after", b"5"))
    await reject_websocket_error(scope, send, status, code, message, headers)


class TunnelMiddleware:
    """In front of Quart: sets the request id (and returns it on Quart's responses), and
    routes the ``websocket`` scope at :data:`TUNNEL_PATH` to ``endpoint``."""

    def __init__(self, app: AsgiApp, endpoint: TunnelEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        with request_id_context(scope.get("headers", [])) as request_id:
            if scope["type"] == "websocket" and scope["path"] == TUNNEL_PATH:
                await self.endpoint(scope, receive, send)
            else:
                await self.app(scope, receive, _RequestIdSend(send, request_id))


class _RequestIdSend:
    """``send`` that adds ``X-Request-ID`` to a response head."""

    _STARTS = ("http.response.start", "websocket.http.response.start", "websocket.accept")

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._header = (b"x-request-id", request_id.encode())

    async def __call__(self, message: Message) -> None:
        if message["type"] in self._STARTS:
            message = {**message, "headers": [*message.get("headers", ()), self._header]}
        await self._send(message)


def create_tunnel_app(
    state: ProxyState,
    verifier: TokenVerifier,
    *,
    verify_timeout: float = VERIFY_TIMEOUT,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> QuartTrio:
    """The tunnel listener's app (routes in the module docstring)."""
    app = QuartTrio(__name__, static_folder=None)
    install_json_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> quart.Response:
        if state.draining.is_set():
            return json_response(503, error_envelope("DRAINING", "the proxy is shutting down"))
        return json_response(200, ok_envelope({"status": "ok", "sessions": len(state.tunnels)}))

    @app.get(TUNNEL_PATH)
    async def connect_without_upgrade() -> quart.Response:
        envelope = error_envelope("UPGRADE_REQUIRED", "connect with a WebSocket upgrade")
        return json_response(426, envelope, _UPGRADE_HEADERS)

    endpoint = TunnelEndpoint(
        state, verifier, verify_timeout=verify_timeout, drain_timeout=drain_timeout
    )
    quart_app = cast(AsgiApp, app.asgi_app)  # hypercorn's TypedDicts are narrower
    app.asgi_app = TunnelMiddleware(quart_app, endpoint)  # type: ignore[method-assign,assignment]
    return app


_UPGRADE_HEADERS: Sequence[tuple[str, str]] = (("Upgrade", "websocket"), ("Connection", "Upgrade"))


class TunnelHypercornConfig(HypercornConfig):
    """hypercorn's ``Config``, whose TCP listening sockets get ``TCP_USER_TIMEOUT``
    (:attr:`tcp_user_timeout` seconds; accepted connections inherit it; Linux only).

    Why: hypercorn writes to the socket inside a shielded cancel scope, so an agent that
    stops reading (its receive window stays at zero) blocks our sends for good: yamux's
    write timeout cancels its writer in vain, the tunnel never ends, and the server's
    shutdown waits forever. With the option the kernel aborts such a connection (it also
    applies to zero-window probes; checked on Linux 6.18), the send fails and the tunnel
    ends. A peer that vanished without a trace is dropped in that time too, instead of
    after ``tcp_retries2`` (about 15 minutes).
    """

    tcp_user_timeout: float | None = TCP_USER_TIMEOUT

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if self.tcp_user_timeout is not None and option is not None:
            milliseconds = max(1, round(self.tcp_user_timeout * 1000))
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
        return sockets


def tunnel_hypercorn_config(config: ProxyConfig) -> TunnelHypercornConfig:
    """hypercorn settings for the tunnel listener (``VISIONA_TUNNEL_HOST``/``PORT``).

    * ``websocket_max_message_size``: :data:`TUNNEL_MAX_MESSAGE_SIZE` (hypercorn: 16 MiB).
    * ``TCP_USER_TIMEOUT`` :data:`TCP_USER_TIMEOUT` on the sockets (see
      :class:`TunnelHypercornConfig`).
    * No WebSocket pings from hypercorn (yamux pings every 10 s); HTTP keep-alive 5 s
      (only ``/healthz`` uses it).
    * No access log; hypercorn's errors go to ``logging`` (``hypercorn.error``); no
      ``Server`` header.
    * ``graceful_timeout``: how long connections may take to end after the shutdown
      trigger; the service closes the tunnels (1001) before it pulls it.
    * ``max_app_queue_size`` stays 10 messages per connection: our backpressure on an
      agent (its yamux windows bound what it may send anyway).
    """
    hyper = TunnelHypercornConfig()
    host, port = config.tunnel_host, config.tunnel_port
    hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hyper.websocket_max_message_size = TUNNEL_MAX_MESSAGE_SIZE
    hyper.websocket_ping_interval = None
    hyper.keep_alive_timeout = 5.0
    hyper.graceful_timeout = min(5.0, config.shutdown_grace)
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.include_server_header = False
    return hyper
