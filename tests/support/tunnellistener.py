"""The remote-proxy's tunnel listener on loopback, for tests (``serve_tunnels``, the one
production runs); what an agent dials, the shared state, and its registry's events as a
queue.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from functools import partial

import attrs
import trio

from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.state import ProxyState
from visiona_services.remote_proxy.tunnel_listener import serve_tunnels
from visiona_services.remote_proxy.verify import StaticTokenVerifier, TokenVerifier
from visiona_tunnel.listener import TCP_USER_TIMEOUT
from visiona_tunnel.relay import TunnelDown, TunnelEvent

#: How long one wait for a registry event may take.
EVENT_TIMEOUT = 10.0


class TunnelEvents:
    """The registry's ``TunnelUp``/``TunnelDown`` events, in order, awaitable (bounded)."""

    def __init__(self) -> None:
        self.events: list[TunnelEvent] = []
        self._in, self._out = trio.open_memory_channel[TunnelEvent](math.inf)

    def __call__(self, event: TunnelEvent) -> None:
        self.events.append(event)
        self._in.send_nowait(event)

    async def next_down(self, timeout: float = EVENT_TIMEOUT) -> TunnelDown:
        """Skip events until the next ``TunnelDown`` not yet taken; return it."""
        with trio.fail_after(timeout):
            while not isinstance(event := await self._out.receive(), TunnelDown):
                pass
        return event


@dataclass
class TunnelListener:
    state: ProxyState
    port: int
    events: TunnelEvents
    #: Set it to shut the server down gracefully.
    shutdown: trio.Event
    #: ``ws`` or, with TLS, ``wss``.
    scheme: str = "ws"

    @property
    def url(self) -> str:
        """What an agent dials (without the token)."""
        return f"{self.scheme}://127.0.0.1:{self.port}/tunnel/connect"


async def start_tunnel_listener(
    nursery: trio.Nursery,
    tokens: dict[str, str] | None = None,
    *,
    verifier: TokenVerifier | None = None,
    config: ProxyConfig | None = None,
    tcp_user_timeout: float = TCP_USER_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> TunnelListener:
    """The tunnel listener on 127.0.0.1 (a free port) in ``nursery``, over TLS with
    ``ssl_context``; ``verifier`` defaults to the static ``tokens``."""
    config = attrs.evolve(
        config or ProxyConfig(internal_secret="test-secret"), tunnel_host="127.0.0.1", tunnel_port=0
    )
    state = ProxyState.create(config)
    events = TunnelEvents()
    state.tunnels.add_observer(events)
    verifier = verifier or StaticTokenVerifier(tokens or {})
    shutdown = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    serve = partial(
        serve_tunnels,
        state,
        verifier,
        listeners=listeners,
        ssl_context=ssl_context,
        tcp_user_timeout=tcp_user_timeout,
        shutdown_trigger=shutdown.wait,
    )
    binds: list[str] = await nursery.start(serve)
    scheme = "wss" if ssl_context is not None else "ws"
    return TunnelListener(state, int(binds[0].rsplit(":", 1)[1]), events, shutdown, scheme)
