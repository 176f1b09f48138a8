"""The remote-proxy's tunnel listener (``VISIONA_TUNNEL_HOST:PORT``, 0.0.0.0:3800): the
library's :func:`visiona_tunnel.listener.serve_tunnel_listener`, given the service's
admission, its health route, its error envelope and its request ids. Agents connect here.

* ``GET /healthz`` -> ``{"success": true, "data": {"status": "ok", "sessions": N}}``;
  503 ``DRAINING`` (error envelope) while the service drains.
* ``GET /tunnel/connect?token=...`` (WebSocket; ``Authorization: Bearer <token>`` also
  works): the token is verified *before* the upgrade (:func:`.verify.admit`). Refusals are
  HTTP answers with the error envelope ``{"success": false, "error": {"code", "message",
  "request_id"}}``: 401 ``UNAUTHORIZED`` (no token, or an unknown one: the body does not
  say which), 503 ``AUTH_UNAVAILABLE`` (the verifier cannot answer, or not within
  ``VERIFY_TIMEOUT``), 503 ``DRAINING``. Accepted, ``state.tunnels.serve(device_id, ...)``
  runs the tunnel until it ends; a reconnect of the same device replaces the older tunnel
  (close 4001). A plain GET there gets 426 ``UPGRADE_REQUIRED``.
* Otherwise 404 ``NOT_FOUND``, 405 ``METHOD_NOT_ALLOWED``, 400 ``BAD_REQUEST``.

Every answer carries ``X-Request-ID`` (the caller's if sane, else a new one), and log lines
made while a request (or a tunnel, for its whole life) is handled carry it too. Tokens are
never logged.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence

import trio

from visiona_tunnel.limits import AttemptLimit
from visiona_tunnel.listener import (
    TCP_USER_TIMEOUT,
    Answer,
    ListenerRequest,
    Refusal,
    serve_tunnel_listener,
)

from ..common.http import (
    JSON_CONTENT_TYPE,
    error_envelope,
    json_bytes,
    ok_envelope,
    request_id_context,
    request_id_header,
)
from .state import ProxyState
from .verify import TokenVerifier, admit

logger = logging.getLogger("visiona_services.remote_proxy.tunnel")

__all__ = [
    "GRACEFUL_TIMEOUT",
    "TUNNEL_MAX_MESSAGE_SIZE",
    "TUNNEL_PATH",
    "VERIFY_TIMEOUT",
    "serve_tunnels",
]

MiB = 1024 * 1024
#: Where agents connect.
TUNNEL_PATH = "/tunnel/connect"
#: The largest WebSocket message taken from an agent. A Go (hashicorp) agent writes a Data
#: frame's body as one message, as large as its send window (with a 16 MiB window: 16 MiB,
#: plus the 12-byte header in a message of its own); twice that, plus headroom.
TUNNEL_MAX_MESSAGE_SIZE = 32 * MiB + 64 * 1024
#: How long a token check may take before the agent gets 503.
VERIFY_TIMEOUT = 10.0
#: After the shutdown trigger, how long connections may take to end.
GRACEFUL_TIMEOUT = 5.0


def render(refusal: Refusal) -> Answer:
    """An error answer: the error envelope."""
    return _json(refusal.status, error_envelope(refusal.code, refusal.message))


def _json(status: int, payload: object) -> Answer:
    return Answer(status, json_bytes(payload), ((b"content-type", JSON_CONTENT_TYPE.encode()),))


@contextlib.contextmanager
def request_scope(request: ListenerRequest) -> Iterator[Sequence[tuple[bytes, bytes]]]:
    """The request's id, for its answers and its log lines."""
    with request_id_context(request.headers):
        yield (request_id_header(),)


async def serve_tunnels(
    state: ProxyState,
    verifier: TokenVerifier,
    *,
    listeners: Sequence[trio.SocketListener],
    ssl_context: ssl.SSLContext | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    verify_timeout: float = VERIFY_TIMEOUT,
    tcp_user_timeout: float | None = TCP_USER_TIMEOUT,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The tunnel listener on ``listeners`` (bound by the caller, so that a busy port is
    reported before anything starts); see :func:`serve_tunnel_listener` for the rest."""

    async def healthz(request: ListenerRequest) -> Answer:
        await trio.lowlevel.checkpoint()
        if state.draining.is_set():
            return render(Refusal(503, "DRAINING", "the proxy is shutting down"))
        return _json(200, ok_envelope({"status": "ok", "sessions": len(state.tunnels)}))

    async def admit_tunnel(request: ListenerRequest) -> str | Refusal:
        return await admit(
            state, verifier, request.token, timeout=verify_timeout, remote=request.remote
        )

    def on_refusal(request: ListenerRequest, refusal: Refusal) -> None:
        state.metrics.refusals.labels(status=str(refusal.status), code=refusal.code).inc()
        if count := state.refusals_log.due(trio.current_time()):
            logger.info(
                "tunnel upgrades refused",
                extra={"count": count, "last": refusal.code, "remote": request.remote},
            )

    config = state.config
    attempts = AttemptLimit(
        burst=config.tunnel_auth_failures_burst,
        per_minute=config.tunnel_auth_failures_per_minute,
    )

    await serve_tunnel_listener(
        state.tunnels,
        admit_tunnel,
        listeners=listeners,
        ssl_context=ssl_context,
        path=TUNNEL_PATH,
        routes={"/healthz": healthz},
        render=render,
        request_scope=request_scope,
        max_message_size=TUNNEL_MAX_MESSAGE_SIZE,
        max_handshakes=config.tunnel_max_handshakes,
        max_handshakes_per_address=config.tunnel_max_handshakes_per_address,
        max_tunnels=config.tunnel_max_tunnels or None,
        attempt_limit=attempts,
        on_refusal=on_refusal,
        # Its own verify timeout answers first (and logs why).
        admit_timeout=verify_timeout + 1,
        shutdown_trigger=shutdown_trigger,
        graceful_timeout=graceful_timeout,
        tcp_user_timeout=tcp_user_timeout,
        task_status=task_status,
    )
