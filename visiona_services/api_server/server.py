"""``serve_api_server``: the api-server on hypercorn, with everything it owns.

The listening sockets are made first (a busy port fails before anything else starts),
then the services (:func:`.services.open_services`: database migrated, HTTP client), then
hypercorn serves the app until ``stop()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..common.hypercorn_reads import read_larger_pieces
from ..common.lifecycle import CannotListen, cannot_listen
from .api.models import sweep_forever
from .app import create_app
from .config import ApiConfig
from .services import ApiServices, open_services
from .tunnel_events import follow_tunnel_events

__all__ = ["CannotListen", "RunningApiServer", "hypercorn_config", "serve_api_server"]

logger = logging.getLogger("visiona_services.api_server")


@attrs.frozen
class RunningApiServer:
    services: ApiServices
    urls: list[str]
    #: Begin a graceful shutdown; ``serve_api_server`` returns once it is done.
    stop: Callable[[], None]


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hypercorn_config(config: ApiConfig) -> HypercornConfig:
    hyper = HypercornConfig()
    hyper.bind = [_bind(config.host, config.port)]
    hyper.accesslog = None  # the middleware logs each request (JSON, with its id)
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.include_server_header = False
    hyper.graceful_timeout = 5.0
    return hyper


def listen(config: ApiConfig) -> tuple[HypercornConfig, Sockets]:
    """The hypercorn settings and the bound sockets.

    Raises:
        CannotListen: the address is in use, not ours ...
    """
    hyper = hypercorn_config(config)
    try:
        sockets = hyper.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(hyper.backlog)
        return hyper, sockets
    except OSError as exc:
        raise cannot_listen(hyper.bind[0], exc, "VISIONA_API_PORT") from None


async def serve_api_server(
    config: ApiConfig,
    *,
    sockets: Sockets | None = None,
    task_status: trio.TaskStatus[RunningApiServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop()``; ``task_status.started`` gives the bound URLs.

    ``sockets``: already bound by :func:`listen` (to know the port before the start).

    Raises:
        CannotListen: the address cannot be bound.
    """
    hyper, bound = listen(config) if sockets is None else (hypercorn_config(config), sockets)
    read_larger_pieces()  # uploads (forwards, storage) cost less CPU per byte
    stopping = trio.Event()
    async with open_services(config) as services, trio.open_nursery() as background:
        background.start_soon(follow_tunnel_events, services)
        background.start_soon(sweep_forever, services)
        async with trio.open_nursery() as server:
            urls = await server.start(
                lambda task_status: worker_serve(
                    wrap_app(create_app(services), hyper.wsgi_max_body_size, None),
                    hyper,
                    sockets=bound,
                    shutdown_trigger=stopping.wait,
                    task_status=task_status,
                )
            )
            logger.info("listening", extra={"urls": urls, "public_url": config.public_url})
            task_status.started(RunningApiServer(services, urls, stopping.set))
        background.cancel_scope.cancel()
