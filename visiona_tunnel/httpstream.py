"""The relay's end of a tunnel stream: send one HTTP/1.1 request, stream the response back.

::

    stream = await session.open_stream()
    async with http_exchange(stream, "POST", "/upload", headers, body) as response:
        status, headers = response.status, response.headers
        async for chunk in response.body:
            ...

The request body is uploaded by a task of the exchange's own nursery while the block reads
the response (a server may answer before the upload ends, and a large upload would fill the
agent's window otherwise), so the block starts as soon as the response head has arrived.
Leaving the block ends the exchange and both its directions: after a complete response (and
upload) the stream is closed; otherwise -- the caller stopped reading, failed or was
cancelled -- it is reset (an agent writing the rest of a response must not be left blocked
on a window nobody reads) and the upload stops. ``response.aclose()`` ends it earlier. The
stream belongs to the exchange from the call on. Timeouts are the caller's
(``trio.fail_after`` around the block).

A response that is missing, malformed or cut short (EOF or reset before its end) raises
:class:`ExchangeError`, as does a request body whose iterable fails (its error is the
cause); the agent's 502 and 400 answers are ordinary responses.

h11 parses the response head, and the body unless it is framed by ``Content-Length``: such
a body is read straight from the stream, up to its length, as it arrives (h11 would copy
each piece into its buffer and out again, and run its state machine per piece, for bytes
that need no parsing).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import NoReturn

import attrs
import h11
import trio

from .agent_stream import CHUNK_SIZE, MAX_HEAD_SIZE, abort_stream, header_tokens
from .tasks import open_owned_nursery

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "ExchangeError",
    "HttpResponse",
    "http_exchange",
    "request_headers",
    "without_hop_by_hop",
]

#: Dropped from the caller's request headers (RFC 9110 7.6.1), with the headers that
#: ``Connection`` names. A body of unknown length is still sent chunked.
HOP_BY_HOP_HEADERS: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


#: How long a piece of a body read from a yamux stream may wait for the rest of the read
#: (see ``_Exchange._receive``); trio's timers round it up to 1 ms.
GATHER_PATIENCE = 0.0005


class ExchangeError(trio.BrokenResourceError):
    """The response (the agent's, or whichever server answers the exchange) was missing,
    malformed or cut short, or the request body failed (see ``__cause__``)."""


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def without_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` minus the hop-by-hop ones and those that ``Connection`` names; order and
    case of the rest kept."""
    items = list(headers)
    drop = HOP_BY_HOP_HEADERS | header_tokens(items, b"connection")
    return [(name, value) for name, value in items if name.lower() not in drop]


def request_headers(
    headers: Iterable[tuple[bytes | str, bytes | str]],
    body: bytes | AsyncIterable[bytes],
    *,
    host: bytes,
) -> list[tuple[bytes, bytes]]:
    """The caller's headers as forwarded: hop-by-hop headers dropped, ``Host`` added if
    missing (first), and the body's framing: ``Content-Length`` for ``bytes`` (when not
    empty, or when the caller sent one), the caller's ``Content-Length`` for an
    iterable body if there is one, else ``Transfer-Encoding: chunked``."""
    out = without_hop_by_hop((_as_bytes(name), _as_bytes(value)) for name, value in headers)
    if not any(name.lower() == b"host" for name, _ in out):
        out.insert(0, (b"Host", host))
    has_length = any(name.lower() == b"content-length" for name, _ in out)
    if isinstance(body, bytes):
        out = [(name, value) for name, value in out if name.lower() != b"content-length"]
        if body or has_length:
            out.append((b"Content-Length", str(len(body)).encode()))
    elif not has_length:
        out.append((b"Transfer-Encoding", b"chunked"))
    return out


def _raw_body_length(head: h11.Response, method: bytes) -> int | None:
    """The length of a body framed by ``Content-Length`` (h11 has checked the header: at
    most one, digits only), if it has one and is not empty; None when h11 frames it
    (chunked, until EOF, or no body at all)."""
    if method in (b"HEAD", b"CONNECT") or head.status_code in (204, 304):
        return None
    length = None
    for name, value in head.headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length or None


class _Exchange:
    """The h11 client side of one request; the response body iterator."""

    def __init__(self, stream: trio.abc.Stream, read_size: int = CHUNK_SIZE) -> None:
        self.stream = stream
        self.read_size = read_size
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        #: A body framed by Content-Length, read without h11 (see the module docstring):
        #: its length, how much of it is still to come, what h11 had buffered of it, and
        #: whether the stream had ended there.
        self.raw_length: int | None = None
        self.raw_remaining = 0
        self.raw_buffered = b""
        self.raw_eof = False
        self.upload_scope = trio.CancelScope()
        self.upload_finished = trio.Event()
        self.upload_started = False
        self.uploaded = False
        #: Why the request body failed (its iterable raised, or did not match its length).
        self.upload_error: Exception | None = None
        self.complete = False
        self.closed = False

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def upload(self, body: bytes | AsyncIterable[bytes]) -> None:
        """The exchange's task. A failing ``body`` resets the stream (the agent must not
        see a complete request) and is reported where the caller is, reading the
        response: as the cause of its :class:`ExchangeError`. A broken stream ends the
        upload quietly (reading the response tells what happened). An async generator
        ``body`` is closed when the upload ends."""
        try:
            with self.upload_scope:
                try:
                    if isinstance(body, bytes):
                        for start in range(0, len(body), CHUNK_SIZE):
                            await self.send(h11.Data(data=body[start : start + CHUNK_SIZE]))
                    else:
                        chunks = aiter(body)
                        try:
                            async for chunk in chunks:
                                if chunk:
                                    await self.send(h11.Data(data=chunk))
                        finally:
                            aclose = getattr(chunks, "aclose", None)  # an async generator
                            if aclose is not None:
                                await aclose()
                    await self.send(h11.EndOfMessage())
                    self.uploaded = True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                except Exception as exc:
                    self.upload_error = exc
                    await abort_stream(self.stream)
        finally:
            self.upload_finished.set()

    async def next_event(self) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(self.read_size)
                    self.conn.receive_data(bytes(data))
                    continue
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._raise_broken(exc)
            except h11.RemoteProtocolError as exc:
                raise ExchangeError(f"bad response from the agent: {exc}") from exc
            if isinstance(event, h11.ConnectionClosed):
                raise ExchangeError("the agent closed the stream without a response")
            if not isinstance(event, h11.Event):
                raise ExchangeError(f"unexpected response from the agent: {event!r}")
            return event

    def _raise_broken(self, exc: Exception) -> NoReturn:
        """The stream broke (or was closed) while the response was read."""
        if self.closed:
            raise trio.ClosedResourceError("the response was closed") from exc
        if self.upload_error is not None:
            message = f"the request body failed: {self.upload_error!r}"
            raise ExchangeError(message) from self.upload_error
        raise ExchangeError(f"the tunnel stream broke: {exc!r}") from exc

    async def read_head(self, method: bytes) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                self.raw_length = _raw_body_length(event, method)
                if self.raw_length is not None:
                    buffered, self.raw_eof = self.conn.trailing_data
                    self.raw_buffered = buffered[: self.raw_length]
                    self.raw_remaining = self.raw_length
                return event
            if not isinstance(event, h11.InformationalResponse) or event.status_code == 101:
                raise ExchangeError(f"unexpected response from the agent: {event!r}")

    async def _receive(self, size: int) -> bytes:
        """A piece of the body, at most ``size`` bytes. From a yamux stream, a piece smaller
        than ``size`` waits up to :data:`GATHER_PATIENCE` for the rest of the read, or for
        what the peer's flow-control credit lets it send if that is less
        (``Stream.receive_at_least``): a gorilla agent's 4 KiB frames, handed on as they
        arrive, would each cost the caller's side as much as a large piece (an ASGI
        message, h11, a write). A fixed sleep instead stalled fast downloads: the peer out
        of credit early in the sleep, idle for the rest of it (40% of a run asleep)."""
        receive_at_least = getattr(self.stream, "receive_at_least", None)
        if receive_at_least is None:
            return bytes(await self.stream.receive_some(size))
        return bytes(await receive_at_least(size, size, GATHER_PATIENCE))

    async def _next_raw(self) -> bytes:
        """The next piece of a body read without h11."""
        if self.raw_remaining == 0:
            self.complete = True
            raise StopAsyncIteration
        if self.raw_buffered:
            data, self.raw_buffered = self.raw_buffered, b""
        elif self.raw_eof:
            data = b""
        else:
            try:
                size = min(self.read_size, self.raw_remaining)
                data = await self._receive(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._raise_broken(exc)
        if not data:  # as h11 would say it
            received = (self.raw_length or 0) - self.raw_remaining
            cause = h11.RemoteProtocolError(
                "peer closed connection without sending complete message body: "
                f"received {received} bytes, expected {self.raw_length}"
            )
            raise ExchangeError(f"bad response from the agent: {cause}") from cause
        self.raw_remaining -= len(data)
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("the response was closed")
        if self.complete:
            raise StopAsyncIteration
        if self.raw_length is not None:
            return await self._next_raw()
        event = await self.next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.complete = True
            raise StopAsyncIteration
        raise ExchangeError(f"unexpected event in the response body: {event!r}")

    async def aclose(self) -> None:
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        self.upload_scope.cancel()
        if self.upload_started:
            with trio.CancelScope(shield=True):
                await self.upload_finished.wait()
        if self.complete and self.uploaded:
            await trio.aclose_forcefully(self.stream)
        else:
            await abort_stream(self.stream)


@attrs.frozen
class HttpResponse:
    """The agent's response: head, streamed body, and the end of the exchange."""

    status: int
    reason: bytes
    #: As received: order and case kept, repeated headers repeated.
    headers: list[tuple[bytes, bytes]]
    _exchange: _Exchange = attrs.field(repr=False)

    @property
    def body(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk (``async for``); ends at the end of the response;
        :class:`ExchangeError` if the response is cut short. Iterate it once."""
        return self._exchange

    @property
    def complete(self) -> bool:
        """True once the body was read to its end."""
        return self._exchange.complete

    async def aclose(self) -> None:
        """End the exchange before the block does; resets the stream unless the response
        was read whole and the request body was sent whole. Idempotent."""
        await self._exchange.aclose()


@contextlib.asynccontextmanager
async def http_exchange(
    stream: trio.abc.Stream,
    method: bytes | str,
    target: bytes | str,
    headers: Iterable[tuple[bytes | str, bytes | str]] = (),
    body: bytes | AsyncIterable[bytes] = b"",
    *,
    host: bytes | str = b"localhost",
    read_size: int = CHUNK_SIZE,
) -> AsyncIterator[HttpResponse]:
    """Send one request down ``stream``; the response, once its head arrives, for the
    block (see the module docstring).

    ``target`` is sent byte for byte (keep it escaped); ``headers`` are prepared by
    :func:`request_headers` (``host`` is the ``Host`` used when there is none). The
    response is read ``read_size`` bytes at most at a time (a larger size means fewer,
    larger pieces when the stream is a fast one: fewer trips through the caller's code
    per byte).

    Raises:
        ExchangeError: no valid response head (the stream is reset by then).
    """
    exchange = _Exchange(stream, read_size)
    async with open_owned_nursery() as nursery:
        try:
            request = h11.Request(
                method=_as_bytes(method),
                target=_as_bytes(target),
                headers=request_headers(headers, body, host=_as_bytes(host)),
            )
            try:
                await exchange.send(request)
            except trio.BrokenResourceError as exc:
                raise ExchangeError(f"the tunnel stream broke: {exc}") from exc
            if isinstance(body, bytes) and not body:
                exchange.conn.send(h11.EndOfMessage())
                exchange.uploaded = True
            else:
                nursery.start_soon(exchange.upload, body)
                exchange.upload_started = True
            head = await exchange.read_head(request.method)
            yield HttpResponse(
                status=head.status_code,
                reason=bytes(head.reason),
                headers=head.headers.raw_items(),
                exchange=exchange,
            )
        finally:
            await exchange.aclose()
