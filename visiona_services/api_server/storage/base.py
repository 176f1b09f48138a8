"""The Store interface (S3 semantics, trio), its value types and errors, and the rules for
keys, metadata and byte ranges that every backend shares (docs/storage.md).

Every public method of ``Store`` validates its key here, once, before the backend sees it:
a backend's ``_put``/``_get``/... only ever receives a key that passed ``validate_key``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import ClassVar, Self

import attrs

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_LIST_LIMIT",
    "MAX_METADATA_BYTES",
    "MAX_SEGMENT_BYTES",
    "MAX_TTL",
    "RESERVED_METADATA_PREFIX",
    "ByteRange",
    "IncompleteUpload",
    "InvalidKey",
    "InvalidMetadata",
    "ListPage",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectReader",
    "ObjectSummary",
    "ObjectTooLarge",
    "PresignedUrl",
    "RangeNotSatisfiable",
    "Store",
    "StoreAccessDenied",
    "StoreError",
    "StoreUnavailable",
    "validate_key",
    "validate_metadata",
    "validate_prefix",
]

#: A key is 1..MAX_KEY_BYTES bytes of UTF-8 (S3's own limit).
MAX_KEY_BYTES = 1024
#: One ``/``-separated segment: a file name on LocalFS, with room for its one-byte suffix.
MAX_SEGMENT_BYTES = 254
#: User metadata, keys and values together (S3 allows 2 KiB of user-defined metadata).
MAX_METADATA_BYTES = 2048
#: Content types longer than this are refused.
MAX_CONTENT_TYPE_BYTES = 255
#: Metadata keys starting with this are the store's own (S3 keeps the sha256 under it).
RESERVED_METADATA_PREFIX = "visiona-"
#: ``list`` returns at most this many items per page (S3's ListObjectsV2 maximum).
MAX_LIST_LIMIT = 1000
#: The longest a presigned URL may live, in seconds (SigV4's limit: 7 days).
MAX_TTL = 7 * 24 * 3600

# A segment: the characters of the safe set, not starting with a dot (so no ``.``, ``..``,
# hidden files, or names of the store's own such as LocalFS's ``.tmp``).
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z", re.ASCII)
_PREFIX = re.compile(r"[A-Za-z0-9._/-]*\Z", re.ASCII)
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,63}\Z", re.ASCII)
# Printable ASCII without space at either end (HTTP header values lose it).
_PRINTABLE = re.compile(r"([\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?)?\Z", re.ASCII)
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(;[\x20-\x7e]*)?\Z")


# -- errors ---------------------------------------------------------------------------------


class StoreError(Exception):
    """Base of every error a Store raises. ``status`` and ``code`` say how an HTTP route
    would usually answer it (the routes may choose otherwise)."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "STORAGE_ERROR"


class ObjectNotFound(StoreError):
    status = 404
    code = "OBJECT_NOT_FOUND"

    def __init__(self, key: str) -> None:
        super().__init__(f"no object at {key!r}")
        self.key = key


class InvalidKey(StoreError):
    """The key (or list prefix) breaks the key rules, or on LocalFS its path crosses a
    symlink or something that is not a directory."""

    status = 400
    code = "INVALID_KEY"


class InvalidMetadata(StoreError):
    """A content type or user metadata outside what every backend can keep."""

    status = 400
    code = "INVALID_METADATA"


class ObjectTooLarge(StoreError):
    """The stream gave more bytes than its declared ``size`` or than ``max_size``; nothing
    was kept."""

    status = 413
    code = "OBJECT_TOO_LARGE"


class IncompleteUpload(StoreError):
    """The stream ended before its declared ``size``; nothing was kept."""

    status = 400
    code = "UPLOAD_INCOMPLETE"


class RangeNotSatisfiable(StoreError):
    """No byte of the range is in the object; ``size`` is the object's (for
    ``Content-Range: bytes */size``)."""

    status = 416
    code = "RANGE_NOT_SATISFIABLE"

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for an object of {size} bytes")
        self.size = size


class StoreUnavailable(StoreError):
    """The backend cannot be reached or answered with a server error."""

    status = 503
    code = "STORAGE_UNAVAILABLE"


class StoreAccessDenied(StoreUnavailable):
    """The S3 server refused our credentials (wrong key or secret, or no permission)."""


# -- keys and metadata ----------------------------------------------------------------------


def validate_key(key: object) -> str:
    """The key if it follows the rules, else ``InvalidKey``: 1..1024 bytes of UTF-8,
    ``/``-separated segments of ``[A-Za-z0-9._-]`` (each 1..254 bytes, not starting with
    ``.``); so no empty segment, no leading or trailing ``/``, no ``.`` or ``..``, no
    backslash, NUL, control or non-ASCII character."""
    if not isinstance(key, str):
        raise InvalidKey(f"a key is a str, not {type(key).__name__}")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey("the key is not valid UTF-8") from None
    if not 1 <= len(encoded) <= MAX_KEY_BYTES:
        raise InvalidKey(f"a key is 1 to {MAX_KEY_BYTES} bytes, not {len(encoded)}")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKey(f"{_shown(key)}: empty segment (leading, trailing or double /)")
        if len(segment) > MAX_SEGMENT_BYTES:
            raise InvalidKey(f"{_shown(key)}: a segment is at most {MAX_SEGMENT_BYTES} bytes")
        if not _SEGMENT.match(segment):
            raise InvalidKey(
                f"{_shown(key)}: segments are [A-Za-z0-9._-] and do not start with '.'"
            )
    return key


def validate_prefix(prefix: object) -> str:
    """A ``list`` prefix (or ``after``): empty, or the start of a key that follows the
    rules, at most 1024 bytes. It need not end at a segment boundary (``models/u1/yo``)."""
    if not isinstance(prefix, str):
        raise InvalidKey(f"a prefix is a str, not {type(prefix).__name__}")
    if len(prefix) > MAX_KEY_BYTES or not _PREFIX.match(prefix):
        raise InvalidKey(f"{_shown(prefix)}: a prefix is at most 1024 of [A-Za-z0-9._/-]")
    if prefix:
        *whole, last = prefix.split("/")
        if not all(_SEGMENT.match(segment) for segment in whole) or (
            last and not _SEGMENT.match(last)
        ):
            raise InvalidKey(f"{_shown(prefix)}: no key starts so")
    return prefix


def validate_metadata(content_type: str, metadata: Mapping[str, str]) -> dict[str, str]:
    """Checks what every backend can keep and returns the metadata as a plain dict:
    a content type ``type/subtype[; params]`` of printable ASCII (at most 255 bytes);
    metadata keys ``[a-z0-9][a-z0-9-]*`` (at most 64, lower case as S3 returns them, not
    starting with ``visiona-``), values printable ASCII (no space at either end), all of it
    at most 2 KiB."""
    if (
        not isinstance(content_type, str)
        or len(content_type) > MAX_CONTENT_TYPE_BYTES
        or not _CONTENT_TYPE.match(content_type)
    ):
        raise InvalidMetadata(f"not a usable content type: {_shown(str(content_type))}")
    result: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or not _METADATA_KEY.match(name):
            raise InvalidMetadata(f"metadata keys are [a-z0-9-] (at most 64): {_shown(name)}")
        if name.startswith(RESERVED_METADATA_PREFIX):
            raise InvalidMetadata(f"metadata keys starting {RESERVED_METADATA_PREFIX!r} are ours")
        if not isinstance(value, str) or not _PRINTABLE.match(value):
            raise InvalidMetadata(f"metadata values are printable ASCII: {name!r}")
        total += len(name) + len(value)
        result[name] = value
    if total > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata is at most {MAX_METADATA_BYTES} bytes, not {total}")
    return result


def _shown(text: str) -> str:
    """A bounded, escaped rendering of untrusted text for messages."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


# -- values ---------------------------------------------------------------------------------


@attrs.frozen
class ObjectInfo:
    """What a store knows of an object. ``etag`` is opaque and unquoted (LocalFS: the
    sha256 hex; S3: the server's); ``sha256`` is None when the backend does not know it
    (an S3 object uploaded with a known size, or by a presigned PUT)."""

    key: str
    size: int
    etag: str
    content_type: str
    metadata: Mapping[str, str]
    sha256: str | None
    last_modified: datetime


@attrs.frozen
class ObjectSummary:
    """One item of a listing (what S3's ListObjectsV2 gives: no content type, no metadata)."""

    key: str
    size: int
    etag: str
    last_modified: datetime


@attrs.frozen
class ListPage:
    """Up to ``limit`` objects sorted by key; ``next_after`` is the ``after`` of the next
    page, or None at the end."""

    items: list[ObjectSummary]
    next_after: str | None


@attrs.frozen
class PresignedUrl:
    """A URL that lets its holder do one kind of request until ``expires_at`` without other
    credentials. ``headers`` must be sent with it as they are (for a PUT: the signed
    ``Content-Type``; the ``Content-Length`` must be the signed size)."""

    url: str
    method: str
    headers: Mapping[str, str]
    expires_at: datetime


def _nonnegative(_: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value}")


@attrs.frozen
class ByteRange:
    """One HTTP byte range: ``ByteRange(start, end)`` is ``bytes=start-end`` (both
    inclusive), ``ByteRange(start)`` is ``bytes=start-``, ``ByteRange.last(n)`` is
    ``bytes=-n`` (the last n bytes)."""

    start: int | None = attrs.field(default=None, validator=_nonnegative)
    end: int | None = attrs.field(default=None, validator=_nonnegative)
    suffix: int | None = attrs.field(default=None, kw_only=True, validator=_nonnegative)

    def __attrs_post_init__(self) -> None:
        if self.suffix is not None:
            if self.start is not None or self.end is not None:
                raise ValueError("a suffix range has neither start nor end")
        elif self.start is None:
            raise ValueError("a range needs a start, or a suffix")
        elif self.end is not None and self.end < self.start:
            raise ValueError("a range's end is not before its start")

    @classmethod
    def last(cls, n: int) -> ByteRange:
        return cls(suffix=n)

    @classmethod
    def parse(cls, header: str) -> ByteRange:
        """A ``Range`` header of one byte range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``);
        ``ValueError`` for anything else, several ranges included (RFC 9110 lets a server
        ignore such a header and answer the whole object)."""
        unit, sep, spec = header.strip().partition("=")
        if not sep or unit.strip().lower() != "bytes" or "," in spec:
            raise ValueError(f"not a single byte range: {header!r}")
        first, dash, last = spec.strip().partition("-")
        if not dash or not (first or last):
            raise ValueError(f"not a byte range: {header!r}")
        for part in (first, last):
            if part and not (part.isascii() and part.isdigit() and len(part) <= 19):
                raise ValueError(f"not a byte range: {header!r}")
        if not first:
            return cls(suffix=int(last))
        return cls(int(first), int(last) if last else None)

    def to_header(self) -> str:
        if self.suffix is not None:
            return f"bytes=-{self.suffix}"
        return f"bytes={self.start}-{'' if self.end is None else self.end}"

    def resolve(self, size: int) -> tuple[int, int]:
        """The first and last byte (inclusive) this range selects in an object of ``size``
        bytes (RFC 9110 §14.1.2), or ``RangeNotSatisfiable``: a start at or past the end,
        a zero suffix, any range of an empty object."""
        if self.suffix is not None:
            if self.suffix == 0 or size == 0:
                raise RangeNotSatisfiable(size)
            return max(0, size - self.suffix), size - 1
        assert self.start is not None
        if self.start >= size:
            raise RangeNotSatisfiable(size)
        end = size - 1 if self.end is None else min(self.end, size - 1)
        return self.start, end


class ObjectReader(abc.ABC):
    """An open object: ``info`` (read when it was opened, and always about the bytes this
    reader gives), ``span`` (the first and last byte of a range request, inclusive; None
    for the whole object) and the bytes, in bounded chunks, by ``async for``.

    It holds a file or a connection: use it as ``async with await store.get(key) as obj``
    or call ``aclose``."""

    info: ObjectInfo
    span: tuple[int, int] | None

    @property
    def content_length(self) -> int:
        """How many bytes the iteration gives."""
        if self.span is None:
            return self.info.size
        return self.span[1] - self.span[0] + 1

    def content_range(self) -> str | None:
        """``Content-Range`` for a 206 answer (``bytes a-b/size``), or None."""
        if self.span is None:
            return None
        return f"bytes {self.span[0]}-{self.span[1]}/{self.info.size}"

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- the interface --------------------------------------------------------------------------


class Store(abc.ABC):
    """Object storage with S3 semantics. All methods are trio-async and never block the
    event loop; keys are checked by ``validate_key`` before any backend code runs.

    Backends implement the underscored methods."""

    async def put(
        self,
        key: str,
        stream: AsyncIterable[bytes],
        size: int | None,
        content_type: str,
        metadata: Mapping[str, str],
        *,
        max_size: int | None = None,
    ) -> ObjectInfo:
        """Stores the bytes of ``stream`` at ``key``, replacing any object there, and
        returns its info with the sha256 computed on the way. Memory stays bounded
        whatever the size. More bytes than ``size`` or ``max_size``: ``ObjectTooLarge``;
        fewer than ``size``: ``IncompleteUpload``; in both cases, on any other error and
        on cancellation nothing is kept and an earlier object at the key is untouched.
        ``stream`` is consumed and closed (its ``aclose``, when it has one)."""
        validate_key(key)
        meta = validate_metadata(content_type, metadata)
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0 or None, not {size}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0 or None, not {max_size}")
        if size is not None and max_size is not None and size > max_size:
            raise ObjectTooLarge(f"{size} bytes declared, at most {max_size} allowed")
        limit = size if max_size is None else max_size if size is None else min(size, max_size)
        return await self._put(key, stream, size, limit, content_type, meta)

    async def get(self, key: str, range: ByteRange | None = None) -> ObjectReader:
        """Opens the object (or one byte range of it): ``ObjectNotFound``,
        ``RangeNotSatisfiable``. ``async with await store.get(key) as obj: async for
        chunk in obj: ...``"""
        validate_key(key)
        return await self._get(key, range)

    async def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        return await self._stat(key)

    async def delete(self, key: str) -> None:
        """Removes the object; nothing there is fine (S3's DeleteObject)."""
        validate_key(key)
        await self._delete(key)

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = MAX_LIST_LIMIT
    ) -> ListPage:
        """The objects whose key starts with ``prefix`` and sorts after ``after``, at most
        ``limit`` (1..1000), sorted by key (bytewise, as S3)."""
        validate_prefix(prefix)
        if after is not None:
            validate_prefix(after)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit is 1..{MAX_LIST_LIMIT}, not {limit}")
        return await self._list(prefix, after, limit)

    async def presigned_get_url(self, key: str, ttl: float, *, public_url: str) -> PresignedUrl:
        """A URL for a plain GET (and HEAD) of the object, valid ``ttl`` seconds.
        ``public_url`` is the api-server's browser-facing origin: LocalFS's URLs point at
        its ``/storage/`` route; S3's point at the S3 server and ignore it."""
        validate_key(key)
        return await self._presigned_get_url(key, _checked_ttl(ttl), public_url)

    async def presigned_put_url(
        self, key: str, ttl: float, *, size: int, content_type: str, public_url: str
    ) -> PresignedUrl:
        """A URL for one PUT of exactly ``size`` bytes (S3 signs the length; LocalFS takes
        it as the upper bound) with this ``Content-Type``, valid ``ttl`` seconds."""
        validate_key(key)
        validate_metadata(content_type, {})
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        return await self._presigned_put_url(key, _checked_ttl(ttl), size, content_type, public_url)

    # -- what a backend implements (the key and arguments already checked) --

    @abc.abstractmethod
    async def _put(
        self,
        key: str,
        stream: AsyncIterable[bytes],
        size: int | None,
        limit: int | None,
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo: ...

    @abc.abstractmethod
    async def _get(self, key: str, range: ByteRange | None) -> ObjectReader: ...

    @abc.abstractmethod
    async def _stat(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    async def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def _list(self, prefix: str, after: str | None, limit: int) -> ListPage: ...

    @abc.abstractmethod
    async def _presigned_get_url(self, key: str, ttl: int, public_url: str) -> PresignedUrl: ...

    @abc.abstractmethod
    async def _presigned_put_url(
        self, key: str, ttl: int, size: int, content_type: str, public_url: str
    ) -> PresignedUrl: ...


def _checked_ttl(ttl: float) -> int:
    seconds = int(ttl)
    if not 1 <= seconds <= MAX_TTL:
        raise ValueError(f"ttl is 1..{MAX_TTL} seconds, not {ttl}")
    return seconds


# -- helpers for backends -------------------------------------------------------------------


async def metered_blocks(
    stream: AsyncIterable[bytes], size: int | None, limit: int | None, block_size: int
) -> AsyncGenerator[bytes, None]:
    """The stream's bytes regrouped into blocks of about ``block_size`` (fewer, larger
    writes), checked on the way: ``ObjectTooLarge`` as soon as more than ``limit`` bytes
    arrived (before they are passed on), ``IncompleteUpload`` if it ends short of ``size``.
    The stream is closed at the end (its ``aclose``, when it has one)."""
    try:
        received = 0
        parts: list[bytes] = []
        pending = 0
        async for chunk in stream:
            if not chunk:
                continue
            received += len(chunk)
            if limit is not None and received > limit:
                if size is not None and limit == size:
                    raise ObjectTooLarge(f"more than the declared {size} bytes")
                raise ObjectTooLarge(f"more than the allowed {limit} bytes")
            parts.append(bytes(chunk))
            pending += len(chunk)
            # The block that completes ``size`` waits until the stream has ended: a server that
            # has all the bytes it was promised may store them before we learn of one too many.
            if pending >= block_size and (size is None or received < size):
                yield parts[0] if len(parts) == 1 else b"".join(parts)
                parts.clear()
                pending = 0
        if size is not None and received < size:
            raise IncompleteUpload(f"the stream ended after {received} of {size} bytes")
        if parts:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        # The stream is ours to finish: an async generator stopped half-way is closed now,
        # not left to the garbage collector.
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
