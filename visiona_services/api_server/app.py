"""``create_app``: the api-server's Quart-Trio app, with the rules of :mod:`.policy` on
every route, the envelope on every error and :class:`.middleware.ApiMiddleware` outside;
between the two, :class:`.storage_routes.StorageDispatcher` serves the local store's
signed URLs and :class:`.forwarding.ForwardDispatcher` the paths forwarded to devices."""

from __future__ import annotations

from typing import cast

import quart
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers as WerkzeugHeaders

from ..common.http import (
    JSON_CONTENT_TYPE,
    ApiError,
    AsgiApp,
    current_request_id,
    error_envelope,
    install_json_error_handlers,
    json_response,
)
from .api import audit as audit_api
from .api import auth as auth_api
from .api import devices as devices_api
from .api import events as events_api
from .api import models as models_api
from .api import pairing as pairing_api
from .api import system as system_api
from .errors import DomainError
from .forwarding import ForwardDispatcher
from .middleware import ApiMiddleware
from .policy import enforce
from .services import ApiServices
from .storage_routes import StorageDispatcher

__all__ = ["create_app"]

#: Request bodies of the JSON API (streaming routes read their own).
MAX_BODY = 1 << 20
#: The code of an unexpected failure (its details stay in the log).
INTERNAL_CODE = "INTERNAL"


def create_app(services: ApiServices) -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, BODY_TIMEOUT=30)
    services.install(app)
    install_json_error_handlers(app, internal_code=INTERNAL_CODE)

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> quart.Response:
        response = _error_response(error)
        if isinstance(error, auth_api.LoginFailed):
            response.delete_cookie(
                auth_api.LOGIN_COOKIE,
                path=auth_api.LOGIN_COOKIE_PATH,
                httponly=True,
                samesite="Lax",
                secure=services.config.secure_cookies,
            )
        return response

    @app.errorhandler(DomainError)
    async def domain_error(error: DomainError) -> quart.Response:
        return json_response(error.status, error_envelope(error.code, error.message))

    app.before_request(enforce)
    app.before_websocket(enforce)
    for routes in (
        auth_api,
        system_api,
        audit_api,
        pairing_api,
        devices_api,
        events_api,
        models_api,
    ):
        routes.register(app)
    quart_app = cast(AsgiApp, app.asgi_app)  # hypercorn's TypedDicts are narrower
    raw_routes = StorageDispatcher(services, ForwardDispatcher(services, quart_app))
    app.asgi_app = ApiMiddleware(raw_routes, services.config)  # type: ignore[method-assign,assignment]
    return app


def _error_response(error: ApiError) -> quart.Response:
    """The envelope; a person's browser on a login page gets the same as HTML."""
    if quart.has_request_context() and _wants_html():
        page = auth_api.error_page(
            error.status, error.code, error.message, current_request_id.get()
        )
        headers = WerkzeugHeaders(error.headers)
        headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'none'"
        return quart.Response(page, status=error.status, headers=headers, content_type="text/html")
    return json_response(error.status, error_envelope(error.code, error.message), error.headers)


def _wants_html() -> bool:
    request = quart.request
    if not request.path.startswith("/api/auth/") or request.method != "GET":
        return False
    accept = request.accept_mimetypes
    return accept.quality("text/html") > accept.quality(JSON_CONTENT_TYPE)
