"""The remote-proxy process: the tunnel listener and the internal listener in one trio
process, sharing one :class:`ProxyState`. The internal listener is a hypercorn server; the
tunnel listener is the library's (:func:`.tunnel_listener.serve_tunnels`).

Shutdown (``RunningProxy.stop()``, SIGTERM in ``__main__``): stop accepting tunnels and
forwards, send GoAway to every agent, let in-flight forwards finish for up to
``shutdown_grace`` seconds, close the tunnels (1001: agents redial with backoff and find the
next instance), then stop both servers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from visiona_tunnel import yamux

from ..common.hypercorn_reads import read_larger_pieces
from ..common.lifecycle import cannot_listen
from .config import ProxyConfig
from .internal_app import create_internal_app, internal_hypercorn_config
from .state import ProxyState
from .tunnel_listener import GRACEFUL_TIMEOUT, serve_tunnels
from .verify import verifier_from_config

logger = logging.getLogger("visiona_services.remote_proxy")


@attrs.frozen
class RunningProxy:
    state: ProxyState
    tunnel_urls: list[str]
    internal_urls: list[str]
    #: Begin the graceful shutdown; ``serve_remote_proxy`` returns once it is done.
    stop: Callable[[], None]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_hypercorn(hyper: HypercornConfig, variable: str) -> Sockets:
    """Bind ``hyper.bind``.

    Raises:
        CannotListen: it cannot be bound.
    """
    try:
        sockets = hyper.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(hyper.backlog)
    except OSError as exc:
        raise cannot_listen(hyper.bind[0], exc, variable) from None
    return sockets


async def serve_remote_proxy(
    config: ProxyConfig, *, task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run both listeners until ``stop()``; ``task_status.started`` gives the bound URLs.

    Both addresses are bound before anything starts.

    Raises:
        CannotListen: a listener's address cannot be bound (a busy port, say).
    """
    state = ProxyState.create(config)
    read_larger_pieces()  # a forward's upload costs less CPU per byte (docs/performance.md)
    stopping = trio.Event()
    servers_done = trio.Event()
    internal_hyper = internal_hypercorn_config(config)
    internal_sockets = _listen_hypercorn(internal_hyper, "VISIONA_PROXY_INTERNAL_PORT")
    try:
        tunnel_listeners = await trio.open_tcp_listeners(
            config.tunnel_port, host=config.tunnel_host
        )
    except OSError as exc:
        for sock in internal_sockets.insecure_sockets:
            sock.close()
        address = _address(config.tunnel_host, config.tunnel_port)
        raise cannot_listen(address, exc, "VISIONA_TUNNEL_PORT") from None
    async with verifier_from_config(config) as verifier, trio.open_nursery() as nursery:
        tunnel_urls = await nursery.start(
            functools.partial(
                serve_tunnels,
                state,
                verifier,
                listeners=tunnel_listeners,
                ssl_context=config.tunnel_ssl_context(),
                shutdown_trigger=servers_done.wait,
                graceful_timeout=min(GRACEFUL_TIMEOUT, config.shutdown_grace),
            )
        )
        internal_urls = await nursery.start(
            functools.partial(
                worker_serve,
                wrap_app(create_internal_app(state), internal_hyper.wsgi_max_body_size, None),
                internal_hyper,
                sockets=internal_sockets,
                shutdown_trigger=servers_done.wait,
            )
        )
        logger.info("listening", extra={"tunnel": tunnel_urls, "internal": internal_urls})
        task_status.started(RunningProxy(state, tunnel_urls, internal_urls, stopping.set))
        await stopping.wait()
        await shut_down(state, config.shutdown_grace)
        servers_done.set()


async def shut_down(state: ProxyState, grace: float) -> None:
    """No new tunnels or forwards; GoAway; in-flight forwards finish; tunnels close."""
    logger.info("draining", extra={"tunnels": len(state.tunnels), "grace": grace})
    state.draining.set()
    for tunnel in state.tunnels:
        with contextlib.suppress(yamux.SessionClosed):
            await tunnel.session.go_away()
    with trio.move_on_after(grace) as deadline:
        await state.inflight.wait_idle()
    if deadline.cancelled_caught:
        logger.warning("shutdown grace over with forwards in flight")
    async with trio.open_nursery() as nursery:  # each close is bounded; an agent that
        for tunnel in list(state.tunnels):  # does not answer must not hold up the rest
            nursery.start_soon(tunnel.close, 1001, "relay shutting down")
