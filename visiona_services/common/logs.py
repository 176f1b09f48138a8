"""JSON-lines logging for the services, with the current request id on every line.

``configure_logging(level)`` installs one stderr handler on the root logger: each record
becomes one JSON object (:class:`~visiona_tunnel.agent.JsonLineFormatter`: ``ts``,
``level``, ``logger``, ``msg`` and any ``extra`` fields) and, while a request is being
handled (:data:`~visiona_services.common.http.current_request_id` is set, which trio
passes on to the tasks a request starts), a ``request_id`` field. The filter sits on the
handler, so records of every logger get it -- hypercorn's, the tunnel's, ours.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

from visiona_tunnel.agent import JsonLineFormatter

from .http import current_request_id

__all__ = ["JsonLineFormatter", "RequestIdFilter", "configure_logging"]


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to records made while a request is handled (never drops any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing JSON lines (with the request id) to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one :func:`json_handler` at ``level``."""
    logging.basicConfig(level=level.upper(), handlers=[json_handler(stream)], force=True)
    logging.Formatter.converter = time.gmtime
