"""The rules every route follows, applied in one place (before each request and each
WebSocket handshake), so that no handler repeats them and none can forget them.

* **Default deny.** A route needs a valid session unless it is marked :func:`public` or
  :func:`internal` (``Authorization: Bearer $VISIONA_INTERNAL_SECRET``, constant time).
  Unknown paths and wrong methods count as session routes: no session, 401.
* **CSRF.** With a session (cookie auth), an unsafe method must carry ``X-CSRF: 1`` and,
  when there is an ``Origin``, an allowed one; a WebSocket handshake's ``Origin`` must be
  allowed when present. Else 403 ``CSRF_REJECTED``.
* **Rate limits.** A route marked :func:`rate_limited` takes a token per client address
  (and per user, with a session); else 429 ``RATE_LIMITED`` with ``Retry-After``.

The principal is left in ``quart.g.principal`` for the handler (None on public routes).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import quart
from werkzeug.datastructures import Headers
from werkzeug.http import parse_cookie

from ..common.http import ApiError, Scope, bearer_matches
from .auth.cookies import unsign
from .auth.sessions import Principal, load_session
from .ratelimit import client_key
from .services import ApiServices, current_services

__all__ = [
    "SESSION_COOKIE",
    "UNSAFE_METHODS",
    "Access",
    "RequestFacts",
    "access_of",
    "authorize",
    "enforce",
    "internal",
    "principal",
    "public",
    "rate_limited",
]

F = TypeVar("F", bound=Callable[..., Any])

SESSION_COOKIE = "visiona_session"
SESSION_PURPOSE = "session"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = "X-CSRF"
_ACCESS = "_visiona_access"
_RATE_LIMITS = "_visiona_rate_limits"


class Access(enum.Enum):
    SESSION = "session"
    PUBLIC = "public"
    INTERNAL = "internal"


def public(view: F) -> F:
    """No session needed (health, login, the agent's pairing exchange ...)."""
    setattr(view, _ACCESS, Access.PUBLIC)
    return view


def internal(view: F) -> F:
    """For the remote-proxy: the internal bearer secret instead of a session."""
    setattr(view, _ACCESS, Access.INTERNAL)
    return view


def rate_limited(*buckets: str) -> Callable[[F], F]:
    """Limit the route with the named limits of :meth:`ApiServices.rate_limit`."""

    def mark(view: F) -> F:
        setattr(view, _RATE_LIMITS, buckets)
        return view

    return mark


def access_of(view: Callable[..., Any] | None) -> Access:
    return getattr(view, _ACCESS, Access.SESSION) if view is not None else Access.SESSION


def rate_limits_of(view: Callable[..., Any] | None) -> tuple[str, ...]:
    return tuple(getattr(view, _RATE_LIMITS, ()))


def principal() -> Principal:
    """The caller of a session route (the policy has checked there is one)."""
    found: Principal | None = quart.g.get("principal")
    if found is None:  # only reachable if a public route asks for one
        raise ApiError(401, "UNAUTHORIZED", "log in first")
    return found


async def session_principal(services: ApiServices, cookie: str | None) -> Principal | None:
    session_id = unsign(services.config.session_secret, SESSION_PURPOSE, cookie)
    if session_id is None:
        return None
    return await services.db.run(
        functools.partial(
            load_session,
            session_id=session_id,
            policy=services.session_policy,
            now=services.clock(),
        )
    )


@attrs.frozen
class RequestFacts:
    """What the rules look at, the same for a Quart request and a raw ASGI scope."""

    method: str
    path: str
    headers: Headers
    address: str
    websocket: bool

    @classmethod
    def of_quart(cls) -> RequestFacts:
        websocket = quart.has_websocket_context()
        connection = quart.websocket if websocket else quart.request
        method = "GET" if websocket else connection.method
        return cls(
            method, connection.path, connection.headers, connection.remote_addr or "", websocket
        )

    @classmethod
    def of_scope(cls, scope: Scope) -> RequestFacts:
        headers = Headers(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        )
        client = scope.get("client") or ("", 0)
        websocket = scope["type"] == "websocket"
        method = "GET" if websocket else str(scope.get("method", "GET"))
        return cls(method, str(scope.get("path", "")), headers, str(client[0]), websocket)


async def enforce() -> None:
    """The before-request / before-websocket hook (see the module docstring)."""
    facts = RequestFacts.of_quart()
    endpoint = (quart.websocket if facts.websocket else quart.request).endpoint
    view = quart.current_app.view_functions.get(endpoint) if endpoint else None
    quart.g.principal = None  # for the handler, and for the error path
    quart.g.principal = await authorize(
        current_services(), facts, access_of(view), rate_limits_of(view)
    )


async def authorize(
    services: ApiServices, facts: RequestFacts, access: Access, buckets: tuple[str, ...] = ()
) -> Principal | None:
    """Apply the rules to one request; the principal on session routes, else None.

    Raises:
        ApiError: 401, 403 or 429 (see the module docstring).
    """
    # Whatever a route says of itself, /internal/* is for the remote-proxy's secret only.
    if facts.path.startswith("/internal/"):
        access = Access.INTERNAL
    headers = facts.headers
    found: Principal | None = None
    if access is Access.INTERNAL:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        if not bearer_matches(raw, services.config.internal_secret):
            raise ApiError(401, "UNAUTHORIZED", "Authorization: Bearer <internal secret> required")
    elif access is Access.SESSION:
        cookie = parse_cookie(headers.get("Cookie", "")).get(SESSION_COOKIE)
        found = await session_principal(services, cookie)
        if found is None:
            raise ApiError(401, "UNAUTHORIZED", "log in first (GET /api/auth/login)")
        origins = headers.getlist("Origin")
        if len(origins) > 1 or (
            origins and origins[0].lower() not in services.config.allowed_origins
        ):
            raise ApiError(403, "CSRF_REJECTED", "this origin may not call the API")
        unsafe = not facts.websocket and facts.method in UNSAFE_METHODS
        if unsafe and headers.get(CSRF_HEADER) != "1":
            raise ApiError(403, "CSRF_REJECTED", f"{CSRF_HEADER}: 1 is required")
    _take_rate_limits(services, buckets, facts.address, found)
    return found


def _take_rate_limits(
    services: ApiServices, buckets: tuple[str, ...], address: str, user: Principal | None
) -> None:
    for bucket in buckets:
        limit = services.rate_limit(bucket)
        keys: list[tuple[str, str, str]] = [(bucket, "address", client_key(address))]
        if user is not None:
            keys.append((bucket, "user", user.user_id))
        wait = max(services.limiter.hit(key, limit) for key in keys)
        if wait > 0:
            raise ApiError(
                429,
                "RATE_LIMITED",
                "too many requests; try again later",
                [("Retry-After", str(max(1, math.ceil(wait))))],
            )
