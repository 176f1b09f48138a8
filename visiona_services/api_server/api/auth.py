"""``/api/auth/*``: the OIDC login (BFF), who am I, logout and back-channel logout.

==========================================  ============================================
``GET /api/auth/login[?next=/path]``        public: 302 to the provider (code + PKCE S256,
                                            state, nonce); the pending login is kept server
                                            side behind the signed ``visiona_login`` cookie
``GET /api/auth/callback``                  public: checks it all, starts a session, 302 to
                                            ``next``
``GET /api/auth/me``                        the user
``POST /api/auth/logout``                   ends the session; the provider's logout URL
``POST /api/auth/backchannel-logout``       public: OIDC back-channel logout
==========================================  ============================================
"""

from __future__ import annotations

import functools
import hmac
import html
import logging
from typing import Any
from urllib.parse import urlsplit

import quart
from quart_trio import QuartTrio

from ...common.http import ApiError, json_response, ok_envelope
from .. import audit
from ..auth.cookies import sign, unsign
from ..auth.oidc import Identity, OidcError, TokenRejected
from ..auth.sessions import (
    begin_login,
    complete_login,
    end_provider_sessions,
    end_session,
    take_pending_login,
)
from ..policy import SESSION_COOKIE, SESSION_PURPOSE, principal, public, rate_limited
from ..services import ApiServices, current_services
from .context import actor

__all__ = ["LOGIN_COOKIE", "LoginFailed", "error_page", "register", "safe_next_path"]

logger = logging.getLogger("visiona_services.api_server.auth")

LOGIN_COOKIE = "visiona_login"
LOGIN_PURPOSE = "login"
#: The login cookie is only sent where it is needed.
LOGIN_COOKIE_PATH = "/api/auth"
MAX_NEXT_LENGTH = 2048


def safe_next_path(value: str | None) -> str:
    """``value`` if it is a local path (``/...``, not ``//host`` or ``/\\host``), else
    ``/``: the login never redirects off site."""
    if not value or len(value) > MAX_NEXT_LENGTH or not value.startswith("/"):
        return "/"
    if value.startswith(("//", "/\\")) or any(ord(c) < 0x20 or c == "\\" for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def _redirect(location: str) -> quart.Response:
    return quart.Response("", status=302, headers={"Location": location})


def _set_cookie(
    response: quart.Response, services: ApiServices, name: str, value: str, **options: Any
) -> None:
    response.set_cookie(
        name,
        value,
        httponly=True,
        samesite="Lax",
        secure=services.config.secure_cookies,
        **options,
    )


def _clear_cookie(response: quart.Response, services: ApiServices, name: str, path: str) -> None:
    response.delete_cookie(
        name,
        path=path,
        httponly=True,
        samesite="Lax",
        secure=services.config.secure_cookies,
    )


class LoginFailed(ApiError):
    """A login that did not complete (audited); the answer clears the login cookie."""


async def _login_failed(services: ApiServices, error: ApiError | OidcError) -> LoginFailed:
    """Audit the failure; the error to raise."""
    detail = str(error)  # for the log: may name hosts or the failed check
    if isinstance(error, OidcError):
        status, code, message = error.status, error.code, error.public_message
    else:
        status, code, message = error.status, error.code, error.message
    await services.db.run(
        lambda db: audit.record(
            db, actor(), "auth:login_failed", outcome=audit.FAILURE, detail={"reason": code}
        )
    )
    logger.warning("login failed", extra={"reason": code, "detail": detail})
    return LoginFailed(status, code, message)


def register(app: QuartTrio) -> None:
    @app.get("/api/auth/login")
    @public
    @rate_limited("login")
    async def login() -> quart.Response:
        services = current_services()
        next_path = safe_next_path(quart.request.args.get("next"))
        try:
            await services.oidc.metadata()  # fail before keeping anything
        except OidcError as exc:
            raise await _login_failed(services, exc) from None
        login_id, state, nonce, verifier = await services.db.run(
            functools.partial(
                begin_login,
                next_path=next_path,
                policy=services.session_policy,
                now=services.clock(),
            )
        )
        url = await services.oidc.authorization_url(
            state=state, nonce=nonce, code_verifier=verifier
        )
        response = _redirect(url)
        _set_cookie(
            response,
            services,
            LOGIN_COOKIE,
            sign(services.config.session_secret, LOGIN_PURPOSE, login_id),
            path=LOGIN_COOKIE_PATH,
            max_age=int(services.config.login_timeout),
        )
        return response

    @app.get("/api/auth/callback")
    @public
    @rate_limited("login")
    async def callback() -> quart.Response:
        services = current_services()
        config = services.config
        try:
            next_path, identity = await _check_callback(services)
        except (ApiError, OidcError) as exc:
            raise await _login_failed(services, exc) from None
        previous = unsign(
            config.session_secret, SESSION_PURPOSE, quart.request.cookies.get(SESSION_COOKIE)
        )
        session_id = await services.db.run(
            functools.partial(
                complete_login,
                identity=identity,
                previous_session_id=previous,
                policy=services.session_policy,
                actor=actor(),
                now=services.clock(),
            )
        )
        response = _redirect(next_path)
        _clear_cookie(response, services, LOGIN_COOKIE, LOGIN_COOKIE_PATH)
        _set_cookie(
            response,
            services,
            SESSION_COOKIE,
            sign(config.session_secret, SESSION_PURPOSE, session_id),
            path="/",
            max_age=int(config.session_max_age),
        )
        return response

    @app.get("/api/auth/me")
    async def me() -> quart.Response:
        user = principal()
        return json_response(
            200,
            ok_envelope(
                {
                    "id": user.user_id,
                    "email": user.email,
                    "name": user.name,
                    "issuer": user.issuer,
                    "session_expires_at": audit.iso(user.session_expires_at),
                }
            ),
        )

    @app.post("/api/auth/logout")
    async def logout() -> quart.Response:
        services = current_services()
        user = principal()
        await services.db.run(
            functools.partial(end_session, principal=user, actor=actor(user.user_id))
        )
        end_session_url = await services.oidc.end_session_url(f"{services.config.public_url}/")
        response = json_response(
            200, ok_envelope({"logged_out": True, "end_session_url": end_session_url})
        )
        _clear_cookie(response, services, SESSION_COOKIE, "/")
        return response

    @app.post("/api/auth/backchannel-logout")
    @public
    @rate_limited("backchannel")
    async def backchannel_logout() -> quart.Response:
        services = current_services()
        form = await quart.request.form
        try:
            logout_token = form.get("logout_token")
            if not logout_token:
                raise TokenRejected("no logout_token form field")
            request = await services.oidc.verify_logout_token(logout_token)
        except OidcError as exc:
            logger.warning("back-channel logout refused", extra={"detail": str(exc)})
            await services.db.run(
                lambda db: audit.record(
                    db,
                    actor(),
                    "auth:backchannel_logout",
                    outcome=audit.FAILURE,
                    detail={"reason": "LOGOUT_TOKEN_INVALID"},
                )
            )
            raise ApiError(400, "LOGOUT_TOKEN_INVALID", "the logout token is not valid") from None
        ended = await services.db.run(
            functools.partial(
                end_provider_sessions,
                issuer=services.oidc.issuer,
                request=request,
                actor=actor(),
            )
        )
        logger.info("back-channel logout", extra={"sessions_ended": ended})
        return json_response(200, ok_envelope({"sessions_ended": ended}))


async def _check_callback(services: ApiServices) -> tuple[str, Identity]:
    """The pending login (taken: single use), the state, the issuer, the provider's
    answer, the code exchange and the ID token; returns where to go and who logged in.

    Raises:
        ApiError, OidcError: saying which check failed.
    """
    args = quart.request.args
    secret = services.config.session_secret
    login_id = unsign(secret, LOGIN_PURPOSE, quart.request.cookies.get(LOGIN_COOKIE))
    if login_id is None:
        raise ApiError(400, "LOGIN_STATE_INVALID", "no login in progress in this browser")
    pending = await services.db.run(functools.partial(take_pending_login, login_id=login_id))
    state = args.get("state", "")
    if pending is None or not hmac.compare_digest(state.encode(), pending.state.encode()):
        raise ApiError(400, "LOGIN_STATE_INVALID", "the login's state does not match")
    if pending.expires_at < services.clock():
        raise ApiError(400, "LOGIN_EXPIRED", "the login took too long; start again")
    await _check_issuer(services, args.get("iss"))
    if "error" in args:
        reason = args.get("error", "")[:64]
        raise ApiError(401, "LOGIN_DENIED", f"the provider refused the login ({reason})")
    code = args.get("code")
    if not code:
        raise ApiError(400, "LOGIN_STATE_INVALID", "the callback carries no code")
    tokens = await services.oidc.exchange_code(code, pending.code_verifier)
    identity = await services.oidc.verify_id_token(
        tokens["id_token"], nonce=pending.nonce, access_token=tokens.get("access_token")
    )
    return pending.next_path, identity


async def _check_issuer(services: ApiServices, iss: str | None) -> None:
    """RFC 9207: the ``iss`` the provider put in the redirect must be ours; a provider that
    announces the parameter must send it."""
    if iss is None:
        metadata = await services.oidc.metadata()
        if metadata.get("authorization_response_iss_parameter_supported") is True:
            raise ApiError(400, "LOGIN_ISSUER_INVALID", "the callback carries no issuer")
        return
    if iss.rstrip("/") != services.oidc.issuer:
        raise ApiError(400, "LOGIN_ISSUER_INVALID", "the callback comes from another issuer")


def error_page(status: int, code: str, message: str, request_id: str | None) -> str:
    """A small HTML page for a login that failed in a browser."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Login failed</title></head>"
        f"<body><h1>Login failed</h1><p>{html.escape(message)}</p>"
        f"<p><code>{html.escape(code)}</code> (HTTP {status}, request "
        f"<code>{html.escape(request_id or '-')}</code>)</p>"
        "<p><a href='/api/auth/login'>Try again</a></p></body></html>"
    )
