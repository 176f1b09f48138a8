"""S3Store: an S3-compatible server (AWS, MinIO, R2, rclone serve s3 ...) as the Store
(docs/storage.md, "S3").

botocore only signs: our own requests are signed with its ``S3SigV4Auth`` (header
authentication, ``UNSIGNED-PAYLOAD`` for streamed bodies) and sent by the caller's
``httpx.AsyncClient``, streaming both ways; presigned URLs come from boto3's
``generate_presigned_url``. Neither does I/O, so nothing blocks trio; sha256 runs in worker
threads. Path-style URLs: ``{endpoint}/{bucket}/{key}``.

An upload of known size streams with ``Content-Length`` (S3 refuses chunked uploads
without it); one of unknown size is spooled first to an anonymous temporary file (gone with
the process, whatever happens), then sent with its length. S3 keeps an object whole or not
at all, so an upload cut short (too many or too few bytes, cancelled) leaves nothing.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import IO, Any, TypeVar
from urllib.parse import quote

import boto3  # type: ignore[import-untyped]
import httpx
import trio
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from .base import (
    RESERVED_METADATA_PREFIX,
    ByteRange,
    IncompleteUpload,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectReader,
    ObjectSummary,
    ObjectTooLarge,
    PresignedUrl,
    Store,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
    metered_blocks,
)

__all__ = ["SHA256_METADATA", "S3Store"]

#: Where S3Store keeps an object's sha256 when it knows it before sending (spooled uploads).
SHA256_METADATA = f"{RESERVED_METADATA_PREFIX}sha256"
DEFAULT_CHUNK_SIZE = 1024 * 1024
#: Error and listing bodies are read up to this much.
MAX_XML_BYTES = 4 * 1024 * 1024
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)\Z")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)\Z")
_UNSIGNED_PAYLOAD = Config(s3={"payload_signing_enabled": False})
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
    "ExpiredToken",
    "InvalidToken",
}
_T = TypeVar("_T")


class S3Store(Store):
    """The bucket ``bucket`` at ``endpoint`` (``http(s)://host[:port]``; empty for AWS's
    ``https://s3.{region}.amazonaws.com``). ``public_endpoint``, when browsers and devices
    reach the S3 server by another address than the api-server does, is the one presigned
    URLs name (it is part of their signature). Call ``ensure_bucket`` once at start."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        http: httpx.AsyncClient,
        *,
        public_endpoint: str | None = None,
        spool_dir: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int = 4,
    ) -> None:
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(f"not an S3 bucket name: {bucket!r}")
        if not region:
            raise ValueError("an S3 region is needed (us-east-1 for most S3-compatible servers)")
        self.endpoint = endpoint.rstrip("/") or f"https://s3.{region}.amazonaws.com"
        self.bucket = bucket
        self.region = region
        self._credentials = Credentials(access_key, secret_key)
        self._http = http
        self._spool_dir = spool_dir
        self._chunk_size = chunk_size
        self._limiter = trio.CapacityLimiter(threads)
        self._public_endpoint = (public_endpoint or self.endpoint).rstrip("/")
        self._access_key = access_key
        self._secret_key = secret_key
        self._presigner_client: Any = None

    @property
    def _presigner(self) -> Any:
        """boto3's S3 client, made on first use (it loads botocore's models: ~0.1 s); it only
        ever signs, never sends."""
        if self._presigner_client is None:
            self._presigner_client = boto3.session.Session(
                aws_access_key_id=self._access_key,
                aws_secret_access_key=self._secret_key,
                region_name=self.region,
            ).client(
                "s3",
                endpoint_url=self._public_endpoint,
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
        return self._presigner_client

    def __repr__(self) -> str:
        return f"S3Store({self.endpoint!r}, bucket={self.bucket!r})"

    # -- requests --

    def _url(self, key: str | None = None, query: Mapping[str, str] | None = None) -> str:
        url = f"{self.endpoint}/{self.bucket}"
        if key is not None:
            url += "/" + quote(key, safe="/")
        if query:
            url += "?" + "&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
            )
        return url

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        data: bytes = b"",
        stream_body: AsyncIterable[bytes] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Signs with SigV4 (the payload's sha256 for ``data``, UNSIGNED-PAYLOAD for
        ``stream_body``) and sends; transport failures are ``StoreUnavailable``."""
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=data)
        if stream_body is not None:
            request.context["client_config"] = _UNSIGNED_PAYLOAD
        S3SigV4Auth(self._credentials, "s3", self.region).add_auth(request)
        signed = {name: value for name, value in request.headers.items()}
        content: bytes | AsyncIterable[bytes] = data if stream_body is None else stream_body
        outgoing = self._http.build_request(method, url, headers=signed, content=content)
        try:
            return await self._http.send(outgoing, stream=stream)
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"S3 at {self.endpoint}: {type(exc).__name__}") from exc

    async def _error(self, response: httpx.Response, key: str | None = None) -> StoreError:
        """The Store error for an S3 error answer (its body read, bounded, and closed)."""
        code, message = await _error_code(response)
        status = response.status_code
        detail = f"S3 {status} {code or response.reason_phrase}: {message}".rstrip(": ")
        if code == "NoSuchBucket":
            return StoreUnavailable(f"the bucket {self.bucket!r} does not exist ({detail})")
        if key is not None and (code == "NoSuchKey" or (status == 404 and not code)):
            return ObjectNotFound(key)
        if code == "EntityTooLarge":
            return ObjectTooLarge(detail)
        if code in ("IncompleteBody", "MissingContentLength"):
            return IncompleteUpload(detail)
        if code in _ACCESS_CODES or status in (401, 403):
            return StoreAccessDenied(detail)
        if status >= 500 or status == 429 or code in ("SlowDown", "ServiceUnavailable"):
            return StoreUnavailable(detail)
        return StoreError(detail)

    async def _hash(self, digest: Any, block: bytes) -> None:
        await trio.to_thread.run_sync(digest.update, block, limiter=self._limiter)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise StoreUnavailable(f"spool file: {exc.strerror or exc}") from exc

    # -- the bucket --

    async def ensure_bucket(self) -> None:
        """Creates the bucket unless it exists (ours). ``StoreAccessDenied`` for refused
        credentials, ``StoreUnavailable`` for a server that cannot be reached."""
        response = await self._send("GET", self._url(query={"list-type": "2", "max-keys": "1"}))
        if response.status_code == 200:
            await response.aclose()
            return
        if response.status_code != 404:
            raise await self._error(response)
        code, _ = await _error_code(response)
        if code != "NoSuchBucket":
            raise StoreError(f"S3 404 {code} for the bucket {self.bucket!r}")
        body = b""
        if self.region != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.region}</LocationConstraint>"
                "</CreateBucketConfiguration>"
            ).encode()
        response = await self._send("PUT", self._url(), data=body)
        if response.status_code == 200:
            return
        if response.status_code == 409:
            # Made meanwhile by another instance (BucketAlreadyOwnedByYou), or rclone's way
            # of saying so; a bucket of someone else's fails the next request with 403.
            await response.aclose()
            return
        raise await self._error(response)

    # -- objects --

    async def _put(
        self,
        key: str,
        stream: AsyncIterable[bytes],
        size: int | None,
        limit: int | None,
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo:
        headers = {"content-type": content_type}
        headers.update({f"x-amz-meta-{name}": value for name, value in metadata.items()})
        digest = hashlib.sha256()
        if size is None:
            return await self._put_spooled(
                key, stream, limit, headers, digest, content_type, metadata
            )
        headers["content-length"] = str(size)

        async def body() -> AsyncGenerator[bytes, None]:
            blocks = metered_blocks(stream, size, limit, self._chunk_size)
            async with aclosing(blocks):
                async for block in blocks:
                    await self._hash(digest, block)
                    yield block

        chunks = body()
        async with aclosing(chunks):
            response = await self._send("PUT", self._url(key), headers, stream_body=chunks)
        return await self._put_result(
            response, key, size, digest.hexdigest(), content_type, metadata
        )

    async def _put_spooled(
        self,
        key: str,
        stream: AsyncIterable[bytes],
        limit: int | None,
        headers: dict[str, str],
        digest: Any,
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo:
        spool: IO[bytes] = await self._run(
            tempfile.TemporaryFile, "w+b", -1, None, None, "", "", self._spool_dir
        )
        try:
            size = 0
            blocks = metered_blocks(stream, None, limit, self._chunk_size)
            async with aclosing(blocks):
                async for block in blocks:
                    await self._run(_write_hashed, spool, block, digest)
                    size += len(block)
            sha256 = digest.hexdigest()
            headers["content-length"] = str(size)
            headers[f"x-amz-meta-{SHA256_METADATA}"] = sha256
            await self._run(spool.seek, 0)

            async def body() -> AsyncGenerator[bytes, None]:
                while data := await self._run(spool.read, self._chunk_size):
                    yield data

            chunks = body()
            async with aclosing(chunks):
                response = await self._send("PUT", self._url(key), headers, stream_body=chunks)
            return await self._put_result(response, key, size, sha256, content_type, metadata)
        finally:
            spool.close()

    async def _put_result(
        self,
        response: httpx.Response,
        key: str,
        size: int,
        sha256: str,
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo:
        if response.status_code != 200:
            raise await self._error(response, key)
        return ObjectInfo(
            key=key,
            size=size,
            etag=_unquote_etag(response.headers.get("etag", "")),
            content_type=content_type,
            metadata=dict(metadata),
            sha256=sha256,
            last_modified=datetime.now(UTC).replace(microsecond=0),
        )

    async def _get(
        self, key: str, range: ByteRange | None, *, retry_range: bool = True
    ) -> ObjectReader:
        headers = {} if range is None else {"range": range.to_header()}
        response = await self._send("GET", self._url(key), headers, stream=True)
        try:
            if response.status_code == 416:
                await response.aclose()
                found = _UNSATISFIED_RANGE.match(response.headers.get("content-range", ""))
                size = int(found.group(1)) if found else (await self._stat(key)).size
                assert range is not None
                first, last = range.resolve(size)  # RangeNotSatisfiable when it is so
                if not retry_range:
                    raise StoreError(f"S3 refused the satisfiable range {first}-{last}")
                # Satisfiable by RFC 9110 but refused (rclone refuses a suffix longer than
                # the object): ask for the bytes it means.
                return await self._get(key, ByteRange(first, last), retry_range=False)
            if response.status_code not in (200, 206):
                raise await self._error(response, key)
            content_range = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            skip = 0
            span: tuple[int, int] | None = None
            if content_range is not None:
                first, last, total = (int(group) for group in content_range.groups())
                span = (first, last)
            else:
                total = int(response.headers.get("content-length", "-1"))
                if total < 0:
                    raise StoreError("S3 answered a GET without Content-Length")
                if range is not None:
                    # The server ignored the Range header: take the slice ourselves.
                    span = range.resolve(total)
                    skip = span[0]
            if range is not None and span is not None and span != range.resolve(total):
                raise StoreError(f"S3 answered the range {span} for {range.to_header()}")
            info = _info(key, response.headers, total)
            return _S3Reader(response, info, span, skip)
        except BaseException:
            await response.aclose()
            raise

    async def _stat(self, key: str) -> ObjectInfo:
        response = await self._send("HEAD", self._url(key))
        if response.status_code != 200:
            raise await self._error(response, key)
        return _info(key, response.headers, int(response.headers.get("content-length", "0")))

    async def _delete(self, key: str) -> None:
        response = await self._send("DELETE", self._url(key))
        if response.status_code in (200, 204):
            return
        error = await self._error(response, key)
        if not isinstance(error, ObjectNotFound):
            raise error

    async def _list(self, prefix: str, after: str | None, limit: int) -> ListPage:
        query = {"list-type": "2", "max-keys": str(limit)}
        if prefix:
            query["prefix"] = prefix
        if after is not None:
            query["start-after"] = after
        response = await self._send("GET", self._url(query=query), stream=True)
        if response.status_code != 200:
            raise await self._error(response)
        try:
            root = _parse_xml(await _read_bounded(response, MAX_XML_BYTES))
        except ElementTree.ParseError as exc:
            raise StoreError(f"S3 listing: {exc}") from None
        finally:
            await response.aclose()
        items = []
        for entry in _children(root, "Contents"):
            key, size, etag = _text(entry, "Key"), _text(entry, "Size"), _text(entry, "ETag")
            modified = _text(entry, "LastModified")
            if key is None or size is None or modified is None:
                raise StoreError("S3 listing: an entry without Key, Size or LastModified")
            items.append(
                ObjectSummary(
                    key=key,
                    size=int(size),
                    etag=_unquote_etag(etag or ""),
                    last_modified=datetime.fromisoformat(modified),
                )
            )
        truncated = (_text(root, "IsTruncated") or "").lower() == "true"
        return ListPage(items, items[-1].key if truncated and items else None)

    # -- presigned URLs --

    async def _presigned_get_url(self, key: str, ttl: int, public_url: str) -> PresignedUrl:
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        url = self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl
        )
        return PresignedUrl(str(url), "GET", {}, expires_at.replace(microsecond=0))

    async def _presigned_put_url(
        self, key: str, ttl: int, size: int, content_type: str, public_url: str
    ) -> PresignedUrl:
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        url = self._presigner.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ContentType": content_type,
                "ContentLength": size,
            },
            ExpiresIn=ttl,
        )
        return PresignedUrl(
            str(url), "PUT", {"content-type": content_type}, expires_at.replace(microsecond=0)
        )


class _S3Reader(ObjectReader):
    """The body of one GET response, in the chunks the connection gives (at most 64 KiB
    from httpx), cut to the span."""

    def __init__(
        self,
        response: httpx.Response,
        info: ObjectInfo,
        span: tuple[int, int] | None,
        skip: int,
    ) -> None:
        self.info = info
        self.span = span
        self._response = response
        self._chunks = response.aiter_raw()
        self._skip = skip
        self._remaining = self.content_length
        self._exhausted = False

    def __aiter__(self) -> _S3Reader:
        return self

    async def _next_raw(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._exhausted = True
            return None
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"reading {self.info.key!r}: {type(exc).__name__}") from exc

    async def __anext__(self) -> bytes:
        while self._remaining > 0:
            chunk = await self._next_raw()
            if chunk is None:
                raise StoreUnavailable(f"the S3 answer for {self.info.key!r} ended early")
            if self._skip:
                dropped = min(self._skip, len(chunk))
                chunk = chunk[dropped:]
                self._skip -= dropped
            chunk = chunk[: self._remaining]
            if chunk:
                self._remaining -= len(chunk)
                return chunk
        # Read the response to its end (nothing is left of it normally), so that httpx's
        # chain of async generators finishes rather than being left to the GC.
        while not self._exhausted and await self._next_raw() is not None:
            pass
        raise StopAsyncIteration

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            await self._response.aclose()


# -- helpers ---------------------------------------------------------------------------------


def _write_hashed(spool: IO[bytes], block: bytes, digest: Any) -> None:
    digest.update(block)
    spool.write(block)


def _unquote_etag(etag: str) -> str:
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def _info(key: str, headers: httpx.Headers, size: int) -> ObjectInfo:
    metadata = {
        name[len("x-amz-meta-") :]: value
        for name, value in headers.items()
        if name.lower().startswith("x-amz-meta-")
    }
    sha256 = metadata.pop(SHA256_METADATA, None)
    for name in [name for name in metadata if name.startswith(RESERVED_METADATA_PREFIX)]:
        del metadata[name]
    modified = headers.get("last-modified")
    try:
        last_modified = parsedate_to_datetime(modified) if modified else datetime.now(UTC)
    except (TypeError, ValueError):
        last_modified = datetime.now(UTC)
    return ObjectInfo(
        key=key,
        size=size,
        etag=_unquote_etag(headers.get("etag", "")),
        content_type=headers.get("content-type", "application/octet-stream"),
        metadata=metadata,
        sha256=sha256,
        last_modified=last_modified.astimezone(UTC),
    )


async def _error_code(response: httpx.Response) -> tuple[str, str]:
    """S3's error ``Code`` and ``Message`` (empty when the answer has no XML body, as for
    HEAD); the response is closed."""
    try:
        body = await _read_bounded(response, 64 * 1024)
    except (httpx.HTTPError, StoreError):
        body = b""
    finally:
        await response.aclose()
    if not body:
        return "", ""
    try:
        root = _parse_xml(body)
    except (ElementTree.ParseError, StoreError):
        return "", ""
    return _text(root, "Code") or "", _text(root, "Message") or ""


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    try:
        return response.content[: limit + 1]  # read already (not a streamed request)
    except httpx.ResponseNotRead:
        pass
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) > limit:
            raise StoreError(f"S3 answered more than {limit} bytes where XML was expected")
    return bytes(data)


def _parse_xml(body: bytes) -> ElementTree.Element:
    """S3's XML, refusing any DTD (no entity expansion, however the parser is built)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise StoreError("S3 answered XML with a DTD")
    return ElementTree.fromstring(body)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ElementTree.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return None
