"""``GET /api/audit[?limit=50&before=ID]``: the caller's own events, newest first."""

from __future__ import annotations

import functools

import quart
from quart_trio import QuartTrio

from ...common.http import ApiError, json_response, ok_envelope
from ..audit import list_events
from ..policy import principal
from ..services import current_services

__all__ = ["register"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    text = quart.request.args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, "INVALID_PARAMETER", f"{name} must be an integer in {low}..{high}")
    return value


def register(app: QuartTrio) -> None:
    @app.get("/api/audit")
    async def list_audit() -> quart.Response:
        limit = int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        before = int_arg("before", None, 1, 2**63 - 1)
        user = principal()
        page = await current_services().db.run(
            functools.partial(list_events, user_id=user.user_id, limit=limit or 1, before=before)
        )
        return json_response(
            200, ok_envelope({"events": page.events, "next_before": page.next_before})
        )
