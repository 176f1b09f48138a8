"""The api-server's outermost ASGI layer: request ids, CORS, security headers, access log.

It sees every ``http`` and ``websocket`` scope before Quart does:

* behind a trusted reverse proxy (``VISIONA_TRUSTED_PROXIES``), takes the client's
  address from ``X-Forwarded-For`` (the nearest hop that is not a trusted proxy);
* picks the request id (the caller's sane ``X-Request-ID`` or a new one), sets it for the
  logs and the error envelopes, and returns it on every response;
* answers CORS preflights: an allowed origin (``VISIONA_CORS_ALLOWED_ORIGINS``) gets 204
  with the CORS headers, any other 403 ``CORS_REJECTED``; responses to an allowed origin
  carry ``Access-Control-Allow-Origin`` and ``-Credentials``; nothing else gets CORS
  headers;
* adds ``X-Content-Type-Options: nosniff`` and, where the route set none,
  ``Cache-Control: no-store`` (API answers are personal);
* logs one JSON access line per request.
"""

from __future__ import annotations

import logging
from ipaddress import ip_address

import trio

from ..common.http import (
    CLOSE_CONNECTION,
    REQUEST_ID_HEADER,
    AsgiApp,
    Message,
    Receive,
    Scope,
    Send,
    has_ambiguous_framing,
    header_values,
    log_access,
    request_id_context,
    send_error,
)
from .config import ApiConfig

__all__ = ["ApiMiddleware"]

access_logger = logging.getLogger("visiona_services.api_server.access")

#: Request headers a cross-origin caller may send.
CORS_ALLOW_HEADERS = b"content-type, x-csrf, x-request-id, x-device-id"
CORS_ALLOW_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE"
CORS_EXPOSE_HEADERS = b"x-request-id, retry-after"
CORS_MAX_AGE = b"600"
_RESPONSE_STARTS = ("http.response.start", "websocket.http.response.start")


class ApiMiddleware:
    def __init__(self, app: AsgiApp, config: ApiConfig) -> None:
        self.app = app
        self.cors_origins = config.cors_origins
        self.trusted_proxies = config.trusted_proxy_networks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        headers = scope.get("headers", [])
        if self.trusted_proxies:
            scope["client"] = self._forwarded_client(scope)
        with request_id_context(headers) as request_id:
            origins = header_values(headers, b"origin")
            origin = origins[0].decode("latin-1").lower() if len(origins) == 1 else None
            cors = origin is not None and origin in self.cors_origins
            status: list[int] = []
            start = trio.current_time()
            closing = has_ambiguous_framing(headers)

            async def send_with_headers(message: Message) -> None:
                if message["type"] in _RESPONSE_STARTS:
                    status.append(int(message["status"]))
                    message["headers"] = self._response_headers(
                        message.get("headers", []), request_id, origin if cors else None
                    )
                    if closing:
                        message["headers"].append(CLOSE_CONNECTION)
                await send(message)

            try:
                if _is_preflight(scope, origin):
                    await self._preflight(send_with_headers, cors)
                else:
                    await self.app(scope, receive, send_with_headers)
            finally:
                client = (scope.get("client") or [None])[0]
                log_access(
                    access_logger, scope, status[0] if status else None, start, client=client
                )

    def _forwarded_client(self, scope: Scope) -> tuple[str, int] | None:
        """The client as the trusted proxies in front of us saw it."""
        client = scope.get("client")
        if not client:
            return None
        hops = [
            hop.strip()
            for value in header_values(scope.get("headers", []), b"x-forwarded-for")
            for hop in value.decode("latin-1").split(",")
        ]
        current = (str(client[0]), int(client[1]))
        for hop in [current[0], *reversed(hops)]:
            try:
                address = ip_address(hop)
            except ValueError:
                break  # a hop we cannot read: trust nothing beyond it
            if not any(address in network for network in self.trusted_proxies):
                return (str(address), 0) if hop != current[0] else current
        return current

    @staticmethod
    def _response_headers(
        headers: list[tuple[bytes, bytes]], request_id: str, cors_origin: str | None
    ) -> list[tuple[bytes, bytes]]:
        out = [(k, v) for k, v in headers if k.lower() != REQUEST_ID_HEADER]
        names = {k.lower() for k, _ in out}
        out.append((REQUEST_ID_HEADER, request_id.encode()))
        out.append((b"x-content-type-options", b"nosniff"))
        if b"cache-control" not in names:
            out.append((b"cache-control", b"no-store"))
        if cors_origin is not None:
            out += [
                (b"access-control-allow-origin", cors_origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-expose-headers", CORS_EXPOSE_HEADERS),
                (b"vary", b"Origin"),
            ]
        return out

    @staticmethod
    async def _preflight(send: Send, allowed: bool) -> None:
        if not allowed:
            await send_error(send, 403, "CORS_REJECTED", "this origin may not call the API")
            return
        headers = [
            (b"access-control-allow-methods", CORS_ALLOW_METHODS),
            (b"access-control-allow-headers", CORS_ALLOW_HEADERS),
            (b"access-control-max-age", CORS_MAX_AGE),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _is_preflight(scope: Scope, origin: str | None) -> bool:
    return (
        scope["type"] == "http"
        and scope.get("method") == "OPTIONS"
        and origin is not None
        and bool(header_values(scope.get("headers", []), b"access-control-request-method"))
    )
