"""``PUT``, ``GET`` and ``HEAD /storage/{token}``: the local store's presigned URLs
(docs/storage.md has the token), served as raw ASGI so bodies stream with backpressure and
bounded memory (Quart would buffer the upload and cut a long download).

The token is the authority (no session, no CSRF: it is a capability, like an S3 presigned
URL): it names the method, the key, the expiry and, for a PUT, the size limit and the
content type. With the S3 backend these URLs point at the S3 server instead, and this route
answers 404.

==========================================  ================================================
what happened                                the answer
==========================================  ================================================
a bad or tampered token                      403 ``SIGNATURE_INVALID``
an expired token                             403 ``URL_EXPIRED``
PUT with another Content-Type than signed    403 ``SIGNATURE_INVALID``
PUT over the signed size (declared, or       413 ``PAYLOAD_TOO_LARGE``; nothing kept
as it streams)
PUT whose body ends early / caller leaves    nothing kept (400 ``UPLOAD_INCOMPLETE`` if it
                                             can still be answered)
PUT done                                     200 ``{size, sha256, etag}``, ``ETag``
GET/HEAD                                     200, or 206 for one ``Range`` (416 with
                                             ``Content-Range: bytes */size`` when it cannot
                                             be met); ``ETag``, ``Content-Length``,
                                             ``Accept-Ranges: bytes``
no such object                               404 ``OBJECT_NOT_FOUND``
==========================================  ================================================
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import trio

from ..common.http import (
    ApiError,
    AsgiApp,
    Receive,
    Scope,
    Send,
    header_values,
    ok_envelope,
    send_api_error,
    send_json,
)
from ..common.raw_route import LINGER_IDLE, RequestBody, ResponseWatch
from .services import ApiServices
from .storage import (
    ByteRange,
    IncompleteUpload,
    LocalFSStore,
    ObjectTooLarge,
    RangeNotSatisfiable,
    SignedRequest,
    StoreError,
)

__all__ = ["STORAGE_METHODS", "STORAGE_PREFIX", "STORAGE_RULE", "StorageDispatcher"]

logger = logging.getLogger("visiona_services.api_server.storage")

STORAGE_PREFIX = "/storage/"
#: The route as a Quart-style rule, and its methods (for documentation and tests).
STORAGE_RULE = "/storage/<token>"
STORAGE_METHODS = ("GET", "HEAD", "PUT")
_INTERNAL = ApiError(500, "INTERNAL", "internal error")
_NOT_FOUND = ApiError(404, "NOT_FOUND", "no such route")


class _CallerLeft(Exception):
    """The caller disconnected before its upload's end."""


class StorageDispatcher:
    """ASGI: ``/storage/...`` here, everything else to ``app``."""

    def __init__(self, services: ApiServices, app: AsgiApp) -> None:
        self.services = services
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(STORAGE_PREFIX):
            await self.app(scope, receive, send)
            return
        body = RequestBody(receive)  # ours to read, and to drain when unread
        watch = ResponseWatch(send, body)
        try:
            await self._serve(scope, body.receive, watch.send)
        except ApiError as error:
            await watch.fail(scope, error)
        except StoreError as exc:  # signed URL refused, no such object ...
            await watch.fail(scope, ApiError(exc.status, exc.code, str(exc)))
        except Exception:
            logger.exception("storage request failed unexpectedly")
            await watch.fail(scope, _INTERNAL)
        await body.discard_rest(LINGER_IDLE)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        store = self.services.store
        if not isinstance(store, LocalFSStore):
            raise _NOT_FOUND  # S3's presigned URLs go to the S3 server
        method = scope["method"]
        if method not in STORAGE_METHODS:
            allow = [("Allow", "GET, HEAD, PUT")]
            raise ApiError(405, "METHOD_NOT_ALLOWED", "GET, HEAD or PUT", allow)
        token = scope["path"][len(STORAGE_PREFIX) :]
        signed = store.verify_signed_url(token, method)
        if method == "PUT":
            await self._put(scope, receive, send, store, signed)
        else:
            await self._get(scope, send, store, signed.key, head=method == "HEAD")

    async def _put(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        store: LocalFSStore,
        signed: SignedRequest,
    ) -> None:
        headers = scope.get("headers", [])
        content_type = _header(headers, b"content-type")
        if signed.content_type and content_type not in (None, signed.content_type):
            raise ApiError(403, "SIGNATURE_INVALID", "not the content type the URL was made for")
        length = _header(headers, b"content-length")
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None and signed.max_size is not None and size > signed.max_size:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"at most {signed.max_size} bytes")
        try:
            info = await store.put(
                signed.key,
                _request_chunks(receive),
                size,
                signed.content_type or content_type or "application/octet-stream",
                {},
                max_size=signed.max_size,
            )
        except _CallerLeft:
            logger.info("upload abandoned by the caller; nothing kept")
            return
        except IncompleteUpload as exc:
            raise ApiError(400, "UPLOAD_INCOMPLETE", str(exc)) from None
        except ObjectTooLarge:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"at most {signed.max_size} bytes") from None
        etag = f'"{info.etag}"'.encode()
        await send_json(
            send,
            200,
            ok_envelope({"size": info.size, "sha256": info.sha256, "etag": etag.decode()}),
            [(b"etag", etag)],
        )

    async def _get(
        self, scope: Scope, send: Send, store: LocalFSStore, key: str, *, head: bool
    ) -> None:
        requested = _header(scope.get("headers", []), b"range")
        byte_range: ByteRange | None = None
        if requested is not None:
            try:
                byte_range = ByteRange.parse(requested)
            except ValueError:
                byte_range = None  # RFC 9110: a range we do not serve is ignored
        try:
            reader = await store.get(key, byte_range)
        except RangeNotSatisfiable as exc:
            await send_api_error(
                send,
                ApiError(
                    416,
                    "RANGE_NOT_SATISFIABLE",
                    "the range is outside the object",
                    [("Content-Range", f"bytes */{exc.size}")],
                ),
            )
            return
        async with reader:
            info = reader.info
            headers = [
                (b"content-type", info.content_type.encode("latin-1")),
                (b"content-length", str(reader.content_length).encode()),
                (b"etag", f'"{info.etag}"'.encode()),
                (b"accept-ranges", b"bytes"),
                (b"cache-control", b"private, no-store"),
            ]
            content_range = reader.content_range()
            if content_range is not None:
                headers.append((b"content-range", content_range.encode()))
            status = 206 if content_range is not None else 200
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if not head:
                async for chunk in reader:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = header_values(headers, name)
    return values[0].decode("latin-1").strip() if values else None


async def _request_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk; a caller that leaves raises :class:`_CallerLeft`
    (the store then keeps nothing)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _CallerLeft
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
        await trio.lowlevel.checkpoint()
