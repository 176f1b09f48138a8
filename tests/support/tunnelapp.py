"""The remote-proxy's tunnel listener on loopback, for tests: ``create_tunnel_app`` on
hypercorn or ``serve_tunnel_listener_raw`` (``TUNNEL_SERVERS``); what an agent dials, the
shared state, and its registry's events as a queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import attrs
import hypercorn.trio
import trio

from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.state import ProxyState
from visiona_services.remote_proxy.tunnel_app import (
    TCP_USER_TIMEOUT,
    create_tunnel_app,
    tunnel_hypercorn_config,
)
from visiona_services.remote_proxy.tunnel_listener import serve_tunnel_listener_raw
from visiona_services.remote_proxy.verify import StaticTokenVerifier, TokenVerifier
from visiona_tunnel.relay import TunnelDown, TunnelEvent

#: The implementations of the tunnel listener (``ProxyConfig.tunnel_server``).
TUNNEL_SERVERS = ("hypercorn", "raw")
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
    #: ``"hypercorn"`` or ``"raw"``.
    server: str = "hypercorn"

    @property
    def url(self) -> str:
        """What an agent dials (without the token)."""
        return f"ws://127.0.0.1:{self.port}/tunnel/connect"


async def start_tunnel_listener(
    nursery: trio.Nursery,
    tokens: dict[str, str] | None = None,
    *,
    verifier: TokenVerifier | None = None,
    config: ProxyConfig | None = None,
    tcp_user_timeout: float = TCP_USER_TIMEOUT,
    server: str = "hypercorn",
) -> TunnelListener:
    """The tunnel listener on 127.0.0.1 (a free port) in ``nursery``: with ``server``
    ``"hypercorn"``, ``create_tunnel_app`` served by hypercorn with
    ``tunnel_hypercorn_config`` (and ``tcp_user_timeout``); with ``"raw"``,
    ``serve_tunnel_listener_raw``. ``verifier`` defaults to the static ``tokens``."""
    config = attrs.evolve(
        config or ProxyConfig(internal_secret="test-secret"), tunnel_host="127.0.0.1", tunnel_port=0
    )
    state = ProxyState.create(config)
    events = TunnelEvents()
    state.tunnels.add_observer(events)
    verifier = verifier or StaticTokenVerifier(tokens or {})
    shutdown = trio.Event()
    if server == "hypercorn":
        hyper = tunnel_hypercorn_config(config)
        hyper.tcp_user_timeout = tcp_user_timeout
        app = create_tunnel_app(state, verifier)
        serve = partial(hypercorn.trio.serve, app, hyper, shutdown_trigger=shutdown.wait)
    elif server == "raw":
        serve = partial(
            serve_tunnel_listener_raw,
            state,
            verifier,
            host=config.tunnel_host,
            port=config.tunnel_port,
            tcp_user_timeout=tcp_user_timeout,
            shutdown_trigger=shutdown.wait,
        )
    else:
        raise ValueError(f"unknown tunnel server {server!r}")
    binds: list[str] = await nursery.start(serve)
    return TunnelListener(state, int(binds[0].rsplit(":", 1)[1]), events, shutdown, server)
