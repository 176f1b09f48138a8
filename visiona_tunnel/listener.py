"""The tunnel listener: agents dial in here (``ws://`` or, with an SSL context, ``wss://``).

:func:`serve_tunnel_listener` reads request heads with h11 on a plain trio listener. A
WebSocket upgrade of the tunnel path is shown to ``admit`` *before* the upgrade: a key (the
device id) upgrades it with wsproto and ``registry.serve`` runs the tunnel on a
:class:`~visiona_tunnel.wsconn.WebSocketStream`; a :class:`Refusal` becomes an HTTP answer
and the connection ends. Other requests go to ``routes`` (``GET``/``HEAD`` by path, e.g. a
health check) and keep the connection alive for :data:`KEEP_ALIVE_TIMEOUT`; the rest get
404, 405 or, at the tunnel path without an upgrade, 426. Every error answer (refusals
included) is built by ``render``: plain text by default, the service's JSON envelope in the
remote-proxy.

The listener owns the connection's rules: a request head may take ``handshake_timeout``
and :data:`MAX_HEAD_SIZE` bytes; accepted sockets get ``TCP_USER_TIMEOUT`` (the kernel
aborts a connection whose data stays unacknowledged, so a vanished agent's tunnel ends);
when a tunnel ends we send our close frame, then half-close and read what the agent still
sends until it hangs up (:func:`close_and_drain`), so that the agent gets our close code.
With ``shutdown_trigger``, it stops accepting when that returns and gives the open
connections ``graceful_timeout`` to end (idle keep-alive ones end at once).

Each task it starts lives in its own nursery: one per connection, inside
``serve_tunnel_listener``'s, and the tunnel's tasks inside ``registry.serve``.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from .admission import (
    Admit,
    Answer,
    ListenerRequest,
    OnRefusal,
    Refusal,
    RequestScope,
    Route,
    admit_with,
    no_request_scope,
    plain_text,
    token_from_request,
)
from .limits import AttemptLimit, AttemptLimiter, EveryInterval, Occupancy
from .listener_connection import MAX_HEAD_SIZE, ListenerConnection, close_and_drain
from .relay import TunnelRegistry
from .wsconn import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "ADMIT_TIMEOUT",
    "CLOSE_DRAIN_TIMEOUT",
    "DESCRIPTOR_HEADROOM",
    "GRACEFUL_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "KEEP_ALIVE_TIMEOUT",
    "MAX_HANDSHAKES",
    "MAX_HANDSHAKES_PER_ADDRESS",
    "MAX_HEAD_SIZE",
    "TCP_USER_TIMEOUT",
    "Admit",
    "Answer",
    "AttemptLimit",
    "ListenerRequest",
    "OnRefusal",
    "Refusal",
    "admit_with",
    "close_and_drain",
    "plain_text",
    "serve_tunnel_listener",
    "token_from_request",
    "tunnel_capacity",
]

logger = logging.getLogger("visiona_tunnel.listener")

#: How long a request head (and, for a tunnel, the check and the upgrade) may take.
HANDSHAKE_TIMEOUT = 10.0
#: How long ``admit`` may take before the agent gets 503 (``AUTH_UNAVAILABLE``).
ADMIT_TIMEOUT = 10.0
#: How long an idle connection is kept for a next request (plain routes only).
KEEP_ALIVE_TIMEOUT = 5.0
#: After the shutdown trigger, how long connections may take to end.
GRACEFUL_TIMEOUT = 5.0
#: After a tunnel ends, how long its agent has to read our close frame and hang up.
CLOSE_DRAIN_TIMEOUT = 10.0
#: Connections still in their handshake (reading a head, plain requests, admission), in all
#: and per client address; over a cap a new connection is answered 503 and closed at once.
MAX_HANDSHAKES = 256
#: Refused tunnel upgrades (401) per client address before it gets 429.
DEFAULT_ATTEMPT_LIMIT = AttemptLimit()
MAX_HANDSHAKES_PER_ADDRESS = 16
#: File descriptors kept free of tunnels and handshakes (the process's other listeners,
#: outgoing calls, files): see :func:`tunnel_capacity`.
DESCRIPTOR_HEADROOM = 128
#: Errors of ``accept()`` that mean "out of resources now", not "the listener is broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: The kernel aborts a tunnel connection whose sent data stays unacknowledged this long
#: (seconds): the relay's yamux keepalive timeout.
TCP_USER_TIMEOUT = 30.0


def tunnel_capacity(max_handshakes: int = MAX_HANDSHAKES) -> int:
    """How many tunnels this process has descriptors for: one each (its socket), after
    ``max_handshakes`` and :data:`DESCRIPTOR_HEADROOM` (``RLIMIT_NOFILE``'s soft limit;
    raise it to serve more)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - DESCRIPTOR_HEADROOM - max_handshakes)


async def serve_tunnel_listener(
    registry: TunnelRegistry,
    admit: Admit,
    *,
    host: str | None = None,
    port: int = 3800,
    listeners: Sequence[trio.SocketListener] = (),
    path: str = "/tunnel/connect",
    routes: Mapping[str, Route] | None = None,
    render: Callable[[Refusal], Answer] = plain_text,
    request_scope: RequestScope = no_request_scope,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    admit_timeout: float = ADMIT_TIMEOUT,
    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    tcp_user_timeout: float | None = TCP_USER_TIMEOUT,
    drain_timeout: float = CLOSE_DRAIN_TIMEOUT,
    max_handshakes: int = MAX_HANDSHAKES,
    max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS,
    max_tunnels: int | None = None,
    attempt_limit: AttemptLimit | None = DEFAULT_ATTEMPT_LIMIT,
    on_refusal: OnRefusal | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept agents on ``host:port`` (or on ``listeners``, already bound) until cancelled
    or, with ``shutdown_trigger``, until it returns (see the module docstring).

    ``admit`` decides each tunnel (:func:`admit_with` makes one from a token verifier);
    ``task_status.started`` gets the bound URLs (``["ws://127.0.0.1:PORT"]``).

    Bounds: at most ``max_handshakes`` connections (``max_handshakes_per_address`` per
    client address) in their handshake, more are answered 503 and closed at once; at most
    ``max_tunnels`` tunnels (default :func:`tunnel_capacity`), a new device over it gets 503;
    an address whose attempts were refused (401) more than ``attempt_limit`` allows gets
    429 with ``Retry-After`` before ``admit`` is asked (None: no limit). ``accept()``
    failing for lack of descriptors is logged at most every 10 s, and retried.
    """
    handler = ListenerConnection(
        registry,
        admit,
        path=path,
        routes=dict(routes or {}),
        render=render,
        request_scope=request_scope,
        ssl_context=ssl_context,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
        admit_timeout=admit_timeout,
        keep_alive_timeout=keep_alive_timeout,
        tcp_user_timeout=tcp_user_timeout,
        drain_timeout=drain_timeout,
        handshakes=Occupancy(max_handshakes, max_handshakes_per_address),
        max_tunnels=tunnel_capacity(max_handshakes) if max_tunnels is None else max_tunnels,
        attempts=None if attempt_limit is None else AttemptLimiter(attempt_limit),
        on_refusal=on_refusal,
    )
    bound = list(listeners) or await trio.open_tcp_listeners(port, host=host)
    scheme = "wss" if ssl_context is not None else "ws"
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            starved = EveryInterval(10.0)
            for listener in bound:
                accepting.start_soon(_accept_forever, listener, handler, connections, starved)
            task_status.started([_url(scheme, listener) for listener in bound])
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            accepting.cancel_scope.cancel()
        handler.stopping = True
        for scope in handler.idle:
            scope.cancel()
        connections.cancel_scope.deadline = trio.current_time() + graceful_timeout


async def _accept_forever(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    connections: trio.Nursery,
    starved: EveryInterval,
) -> None:
    """``trio.serve_listeners``' loop, without a traceback per failed ``accept()``: out of
    descriptors, the listener waits a little and tries again, and says so now and then."""
    async with listener:  # closed with the loop, as serve_listeners does
        await _accept_loop(listener, handler, connections, starved)


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    connections: trio.Nursery,
    starved: EveryInterval,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            if count := starved.due(trio.current_time()):
                logger.warning(
                    "cannot accept connections: %s (%d times in the last while)",
                    os.strerror(exc.errno or 0),
                    count,
                )
            await trio.sleep(0.1)
        else:
            connections.start_soon(handler, stream)


def _url(scheme: str, listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
