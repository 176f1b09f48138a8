"""The remote-proxy process: the tunnel listener and the internal listener in one trio
process, sharing one :class:`ProxyState`. The internal listener is a hypercorn server; the
tunnel listener is ours (:func:`.tunnel_listener.serve_tunnel_listener_raw`) or, with
``VISIONA_TUNNEL_SERVER=hypercorn``, the Quart app on hypercorn (:mod:`.tunnel_app`).

Shutdown (``RunningProxy.stop()``, SIGTERM in ``__main__``): stop accepting tunnels and
forwards, send GoAway to every agent, let in-flight forwards finish for up to
``shutdown_grace`` seconds, close the tunnels (1001: agents redial with backoff and find the
next instance), then stop both servers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

import attrs
import hypercorn.trio
import trio

from visiona_tunnel import yamux

from .config import ProxyConfig
from .internal_app import create_internal_app, internal_hypercorn_config
from .state import ProxyState
from .tunnel_app import create_tunnel_app, tunnel_hypercorn_config
from .tunnel_listener import GRACEFUL_TIMEOUT, serve_tunnel_listener_raw
from .verify import verifier_from_config

logger = logging.getLogger("visiona_services.remote_proxy")


@attrs.frozen
class RunningProxy:
    state: ProxyState
    tunnel_urls: list[str]
    internal_urls: list[str]
    #: Begin the graceful shutdown; ``serve_remote_proxy`` returns once it is done.
    stop: Callable[[], None]


async def serve_remote_proxy(
    config: ProxyConfig, *, task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run both listeners until ``stop()``; ``task_status.started`` gives the bound URLs."""
    state = ProxyState.create(config)
    stopping = trio.Event()
    servers_done = trio.Event()
    async with trio.open_nursery() as nursery:
        tunnel_urls = await nursery.start(
            _tunnel_server(config, state, shutdown_trigger=servers_done.wait)
        )
        internal_urls = await nursery.start(
            functools.partial(
                hypercorn.trio.serve,
                create_internal_app(state),
                internal_hypercorn_config(config),
                shutdown_trigger=servers_done.wait,
            )
        )
        logger.info("listening", extra={"tunnel": tunnel_urls, "internal": internal_urls})
        task_status.started(RunningProxy(state, tunnel_urls, internal_urls, stopping.set))
        await stopping.wait()
        await drain(state, config.shutdown_grace)
        servers_done.set()


def _tunnel_server(
    config: ProxyConfig, state: ProxyState, *, shutdown_trigger: Callable[[], Awaitable[None]]
) -> Callable[..., Awaitable[None]]:
    """The tunnel listener that ``config.tunnel_server`` names, for ``nursery.start``
    (started with the bound URLs)."""
    verifier = verifier_from_config(config)
    if config.tunnel_server == "hypercorn":
        hyper = tunnel_hypercorn_config(config)
        return functools.partial(
            hypercorn.trio.serve,
            create_tunnel_app(state, verifier),
            hyper,
            shutdown_trigger=shutdown_trigger,
        )
    return functools.partial(
        serve_tunnel_listener_raw,
        state,
        verifier,
        host=config.tunnel_host,
        port=config.tunnel_port,
        shutdown_trigger=shutdown_trigger,
        graceful_timeout=min(GRACEFUL_TIMEOUT, config.shutdown_grace),
    )


async def drain(state: ProxyState, grace: float) -> None:
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
