"""HTTP pieces every service shares: the JSON envelope, request ids, bearer secrets, and
raw-ASGI answers.

The envelope::

    {"success": true, "data": ...}
    {"success": false, "error": {"code": "SESSION_NOT_FOUND", "message": "...",
                                 "request_id": "..."}}

``code`` is an upper-case constant a client may branch on; ``message`` is for people.

Request ids: a caller's ``X-Request-ID`` is kept if it is sane (1-128 characters of
``[A-Za-z0-9._-]``), else one is generated. The middleware that picks it sets
:data:`current_request_id`; trio copies context variables into the tasks a request
starts, so logs (:mod:`visiona_services.common.logs`) and error envelopes find it.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextvars import ContextVar
from typing import Any

import quart
import trio
from werkzeug.datastructures import Headers as WerkzeugHeaders
from werkzeug.exceptions import HTTPException

__all__ = [
    "CLOSE_CONNECTION",
    "JSON_CONTENT_TYPE",
    "REQUEST_ID_HEADER",
    "ApiError",
    "AsgiApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "bearer_matches",
    "current_request_id",
    "error_envelope",
    "has_ambiguous_framing",
    "header_values",
    "install_json_error_handlers",
    "json_bytes",
    "json_response",
    "log_access",
    "new_request_id",
    "ok_envelope",
    "reject_websocket",
    "reject_websocket_api_error",
    "reject_websocket_error",
    "request_id_context",
    "request_id_header",
    "sane_request_id",
    "send_api_error",
    "send_error",
    "send_json",
]

logger = logging.getLogger("visiona_services.http")

# -- raw ASGI types (plain mappings: hypercorn's TypedDicts are too narrow for middleware) --

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

JSON_CONTENT_TYPE = "application/json"
#: Lower-case, as ASGI header names are compared.
REQUEST_ID_HEADER = b"x-request-id"

# -- request ids ----------------------------------------------------------------------------

#: The id of the request being handled in this context (None outside requests).
current_request_id: ContextVar[str | None] = ContextVar("visiona_request_id", default=None)

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def sane_request_id(value: bytes | str | None) -> str | None:
    """``value`` if it is a usable request id (1-128 of ``[A-Za-z0-9._-]``), else None."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text if _SANE_REQUEST_ID.fullmatch(text) else None


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


@contextlib.contextmanager
def request_id_context(headers: Headers) -> Iterator[str]:
    """The request's id -- its ``X-Request-ID`` if sane, else a new one -- as
    :data:`current_request_id` for the block."""
    supplied = header_values(headers, REQUEST_ID_HEADER)
    request_id = (sane_request_id(supplied[0]) if supplied else None) or new_request_id()
    token = current_request_id.set(request_id)
    try:
        yield request_id
    finally:
        current_request_id.reset(token)


def request_id_header() -> tuple[bytes, bytes]:
    """``X-Request-ID`` with the current request's id (a new one outside requests)."""
    return (REQUEST_ID_HEADER, (current_request_id.get() or new_request_id()).encode())


def header_values(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case), in order; names compared in any case."""
    return [value for key, value in headers if key.lower() == name]


def has_ambiguous_framing(headers: Headers) -> bool:
    """The request carries both ``Transfer-Encoding`` and ``Content-Length``: its body is
    chunked and the length is wrong (a broken client, or request smuggling). RFC 9112 6.1:
    the connection closes after the response (:data:`CLOSE_CONNECTION`)."""
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


#: Added to the response to a request with :func:`has_ambiguous_framing`: the server
#: (hypercorn's h11) then closes the connection after it instead of reading a next request.
CLOSE_CONNECTION = (b"connection", b"close")


def log_access(
    access_logger: logging.Logger, scope: Scope, status: int | None, started: float, **extra: Any
) -> None:
    """One access line for a finished request: method, path (never the query: it may hold
    codes or tokens), status, duration since ``started`` (``trio.current_time()``)."""
    method = scope.get("method", "WEBSOCKET")
    access_logger.info(
        "%s %s %s",
        method,
        scope.get("path"),
        status,
        extra={
            "method": method,
            "path": scope.get("path"),
            "status": status,
            "duration_ms": round((trio.current_time() - started) * 1000, 1),
            **extra,
        },
    )


# -- bearer secrets -------------------------------------------------------------------------


def bearer_matches(headers: Headers, secret: str) -> bool:
    """True if the one ``Authorization`` header is ``Bearer <secret>``.

    The comparison takes constant time (``hmac.compare_digest``). An empty ``secret``
    never matches, and neither do several ``Authorization`` headers.
    """
    values = header_values(headers, b"authorization")
    if not secret or len(values) != 1:
        return False
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), secret.encode())


# -- the envelope ---------------------------------------------------------------------------


def ok_envelope(data: object) -> dict[str, object]:
    return {"success": True, "data": data}


def error_envelope(code: str, message: str, request_id: str | None = None) -> dict[str, object]:
    """The error envelope; ``request_id`` defaults to :data:`current_request_id`."""
    if request_id is None:
        request_id = current_request_id.get()
    return {
        "success": False,
        "error": {"code": code, "message": message, "request_id": request_id},
    }


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class ApiError(Exception):
    """An error answered with the envelope: raised in a Quart route (see
    :func:`install_json_error_handlers`); the raw routes pass it to :func:`send_error` or
    :func:`reject_websocket_error`."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


# -- answers over raw ASGI ------------------------------------------------------------------


async def send_json(
    send: Send, status: int, payload: object, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON response on an ``http`` scope."""
    body = json_bytes(payload)
    start_headers = [
        (b"content-type", JSON_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """The error envelope as a whole response on an ``http`` scope."""
    await send_json(send, status, error_envelope(code, message), headers)


async def reject_websocket(
    scope: Scope,
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bool:
    """Answer a ``websocket`` scope, before ``websocket.accept``, with an HTTP response.

    Needs the server's ``websocket.http.response`` extension (hypercorn has it); without
    it the handshake is refused with ``websocket.close`` (the server's 403) and this
    returns False. ``headers`` should carry the content type; the length is added.
    """
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1011})
        return False
    start = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": start})
    await send({"type": "websocket.http.response.body", "body": body})
    return True


async def reject_websocket_error(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bool:
    """:func:`reject_websocket` with the error envelope (the handshake's twin of
    :func:`send_error`); ``headers`` are added to the content type."""
    body = json_bytes(error_envelope(code, message))
    start = [(b"content-type", JSON_CONTENT_TYPE.encode()), *headers]
    return await reject_websocket(scope, send, status, body, start)


def _header_bytes(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def send_api_error(send: Send, error: ApiError) -> int:
    """:func:`send_error` with ``error``'s status, code, message and headers; its status."""
    await send_error(send, error.status, error.code, error.message, _header_bytes(error.headers))
    return error.status


async def reject_websocket_api_error(scope: Scope, send: Send, error: ApiError) -> int:
    """:func:`reject_websocket_error` with ``error``'s status, code, message and headers;
    its status."""
    headers = _header_bytes(error.headers)
    await reject_websocket_error(scope, send, error.status, error.code, error.message, headers)
    return error.status


# -- Quart ----------------------------------------------------------------------------------


def json_response(
    status: int, payload: object, headers: Sequence[tuple[str, str]] = ()
) -> quart.Response:
    return quart.Response(
        json_bytes(payload),
        status=status,
        headers=WerkzeugHeaders(list(headers)),
        content_type=JSON_CONTENT_TYPE,
    )


def _http_error_code(status: int) -> str:
    codes = {
        400: "BAD_REQUEST",
        401: "UNAUTHORIZED",
        403: "FORBIDDEN",
        404: "NOT_FOUND",
        405: "METHOD_NOT_ALLOWED",
        413: "PAYLOAD_TOO_LARGE",
        429: "RATE_LIMITED",
    }
    return codes.get(status, "INTERNAL_ERROR" if status >= 500 else "HTTP_ERROR")


def install_json_error_handlers(app: quart.Quart, internal_code: str = "INTERNAL_ERROR") -> None:
    """Make every error of ``app`` an envelope: :class:`ApiError`, werkzeug's
    ``HTTPException`` (404, 405 ... with ``Allow`` kept), and any other exception (500
    ``internal_code``, logged with its traceback, nothing of it in the answer)."""

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> quart.Response:
        return json_response(error.status, error_envelope(error.code, error.message), error.headers)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> quart.Response:
        status = error.code or 500
        headers = [(name, value) for name, value in error.get_headers() if name == "Allow"]
        message = error.description or error.name
        return json_response(status, error_envelope(_http_error_code(status), message), headers)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> quart.Response:
        logger.error("unhandled error", exc_info=error)
        return json_response(500, error_envelope(internal_code, "internal error"))
