"""What every route handler needs from the request: who acts (for the audit trail) and
how to answer."""

from __future__ import annotations

import quart

from ...common.http import current_request_id, json_response, ok_envelope
from .. import audit

__all__ = ["actor", "ok"]


def actor(user_id: str | None = None) -> audit.Actor:
    """The audit actor of the current request."""
    return audit.Actor(user_id, current_request_id.get(), quart.request.remote_addr)


def ok(data: object, status: int = 200) -> quart.Response:
    return json_response(status, ok_envelope(data))
