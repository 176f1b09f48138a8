"""One HTTP request from an ASGI caller to an upstream HTTP/1.1 exchange, and the response
back, streamed both ways: the remote-proxy's forward into a device's tunnel and the
api-server's forward to the remote-proxy are both :func:`forward_asgi_http`, told by an
:class:`HttpUpstream` how to open the exchange, how long to wait and what to answer when
the upstream fails.

The caller's request goes upstream with the caller's headers except hop-by-hop ones,
``Content-Length`` beside ``Transfer-Encoding`` (the body is chunked: the length is wrong),
``Host``, ``Authorization``, ``Expect`` (the ASGI server already answered it),
``X-Request-ID`` (replaced by this request's id) and the upstream's own
``drop_request_headers``. The body is streamed from ASGI ``receive()`` to the upstream and
the response from the upstream to ASGI ``send()``, one chunk at a time each way, so memory
stays bounded and a slow side slows the other.

==================================================  =========================================
what happened                                        the caller gets
==================================================  =========================================
the upstream kept us waiting ``timeout`` for the     ``upstream.timeout_error``
response head (see below)
opening the exchange failed, or the upstream broke   ``upstream.failure(exc)`` (an exception
before the response head                             it maps to None propagates)
the upstream's response                              status, headers minus hop-by-hop ones
                                                     (and ``drop_response_headers``), body
the upstream broke mid-body                          the response ends abruptly (the
                                                     connection is closed; the caller sees
                                                     a short body)
==================================================  =========================================

``timeout`` bounds how long the upstream may keep us waiting: for the response head, and
for each chunk of the request body to be taken (the upstream may answer before it has read
the whole body, and go on reading it while the response streams). The clock restarts with
each chunk and stops while the caller's next chunk is awaited, so a large (or slowly sent)
upload is not cut, while an upstream that stops reading or answering is: before the head
with the timeout error; after it -- when the response has not moved either for as long --
by ending the response abruptly. With the request body sent, reading the response has no
time limit. (After the head, a stuck upload and a caller that neither reads nor sends look
the same from here; the bound also ends a forward whose caller vanished while hypercorn
waits, in our ``send()``, for room in its request queue to report it.)

A caller that goes away (``http.disconnect``) ends the exchange: the upstream stream is
reset (or closed), so the upstream stops. Whether the request has a body is taken from its
first ``http.request`` message, not from its headers (an HTTP/2 request may have a body and
neither ``Content-Length`` nor ``Transfer-Encoding``).

Who reads ``receive()``: the exchange's upload task while it sends the body upstream; once
the upload stops reading the caller -- the body ended, the upload failed or was abandoned
-- a watcher task, until the exchange with the upstream ends, discarding what is left of
the body. hypercorn's queue of request messages is bounded, and it blocks (inside our
``send()``) to report a disconnect when the queue is full: somebody must keep reading. The
response's end (or the error answer) goes out after the watcher has stopped; the caller of
:func:`forward_asgi_http` must then discard the rest of the body itself
(:class:`~.raw_route.RequestBody`: one reader at a time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from visiona_tunnel.httpstream import ExchangeError, HttpResponse, without_hop_by_hop

from .http import (
    REQUEST_ID_HEADER,
    ApiError,
    Message,
    Receive,
    Scope,
    Send,
    current_request_id,
    has_ambiguous_framing,
    send_api_error,
)

__all__ = [
    "CLIENT_CLOSED",
    "ForwardHooks",
    "HttpUpstream",
    "OpenExchange",
    "forward_asgi_http",
    "forwarded_headers",
    "response_headers",
]

logger = logging.getLogger("visiona_services.forward")

#: The status counted when the caller left before the response head (nginx's "client
#: closed request").
CLIENT_CLOSED = 499

#: Request headers that are the forwarder's, not the upstream's.
_DROPPED_REQUEST_HEADERS = frozenset({b"host", b"authorization", b"expect", REQUEST_ID_HEADER})

Headers = list[tuple[bytes, bytes]]
#: ``async with open(method, headers, body) as response``: the exchange with the upstream
#: (``visiona_tunnel.httpstream.http_exchange`` does the work), its response once the
#: head is in; leaving the block ends it.
OpenExchange = Callable[
    [str, Headers, bytes | AsyncIterable[bytes]], AbstractAsyncContextManager[HttpResponse]
]


def forwarded_headers(
    headers: Iterable[tuple[bytes, bytes]],
    request_id: str | None,
    *,
    drop: frozenset[bytes] = frozenset(),
) -> Headers:
    """The caller's headers as the upstream gets them (see the module docstring); names in
    ``drop`` (lower-case) go too. Order and case of the rest are kept."""
    dropped = _DROPPED_REQUEST_HEADERS | drop
    items = list(headers)
    if has_ambiguous_framing(items):  # the body is chunked; its Content-Length is wrong
        dropped |= {b"content-length"}
    kept = [(name, value) for name, value in items if name.lower() not in dropped]
    out = without_hop_by_hop(kept)
    if request_id is not None:
        out.append((b"X-Request-ID", request_id.encode()))
    return out


def response_headers(
    headers: Iterable[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()
) -> Headers:
    """The upstream's response headers minus hop-by-hop ones and those in ``drop``;
    ``Content-Length`` is kept, and without one hypercorn frames the body itself
    (chunked)."""
    kept = without_hop_by_hop(headers)
    return [(name, value) for name, value in kept if name.lower() not in drop]


def _ignore(value: float) -> None:
    pass


@attrs.frozen
class ForwardHooks:
    """What a forward reports as it goes (for metrics); each call must not block."""

    #: Seconds from the request to the upstream's response head.
    head: Callable[[float], object] = _ignore
    #: Bytes of the request body sent upstream (counted as they go).
    request_bytes: Callable[[int], object] = _ignore
    #: Bytes of the response body passed to the caller.
    response_bytes: Callable[[int], object] = _ignore


@attrs.frozen(kw_only=True)
class HttpUpstream:
    """Where one forward goes, and how its failures are answered."""

    open: OpenExchange
    #: Seconds the upstream may keep us waiting (see the module docstring).
    timeout: float
    timeout_error: ApiError
    #: The answer to an exception of ``open`` (or of the response head); None: not ours,
    #: it propagates.
    failure: Callable[[Exception], ApiError | None]
    #: Request headers (lower-case names) the upstream never sees, beyond ours.
    drop_request_headers: frozenset[bytes] = frozenset()
    #: Response headers (lower-case names) the caller never sees, beyond hop-by-hop ones.
    drop_response_headers: frozenset[bytes] = frozenset()
    hooks: ForwardHooks = ForwardHooks()
    #: Added to every log line of the forward (``{"device": ...}``).
    log_extra: Mapping[str, object] = attrs.field(factory=dict)
    logger: logging.Logger = logger


class _UpstreamTimer:
    """``timeout`` of waiting on the upstream (see the module docstring), kept by
    :attr:`scope`, which covers the exchange with the upstream.

    Until a request body streams, the scope's deadline is the clock. Once one does
    (:meth:`body_streams`), the clock moves twice per chunk, and moving a cancel scope's
    deadline costs far more than the two attribute writes that the clock then is: a
    watchdog task in ``nursery`` cancels the scope once the clock has run ``timeout`` since
    it last restarted. (Always having the watchdog would cost a task per forward.)
    """

    def __init__(self, timeout: float, nursery: trio.Nursery) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope()
        self._nursery = nursery
        #: Until the head, the upstream owes us one; after it, only an upload chunk in flight.
        self.head_pending = True
        #: Whether the clock runs, and since when.
        self.running = True
        self.since = trio.current_time()
        self.scope.deadline = self.since + timeout
        #: Whether the watchdog keeps the clock (the scope's deadline is then infinite).
        self._watched = False

    def restart(self) -> None:
        self.since = trio.current_time()
        self.running = True
        if not self._watched:
            self.scope.deadline = self.since + self.timeout

    def pause(self) -> None:
        self.running = False
        if not self._watched:
            self.scope.deadline = math.inf

    def body_streams(self) -> None:
        """A request body is streamed: the watchdog keeps the clock from here on."""
        if not self._watched:
            self._watched = True
            self.scope.deadline = math.inf
            self._nursery.start_soon(self._watch)

    def head_arrived(self, upload_done: bool) -> None:
        self.head_pending = False
        if upload_done:
            self.pause()

    def upload_done(self) -> None:
        if not self.head_pending:
            self.pause()

    def response_moved(self) -> None:
        """After the head, a chunk of the response went out: an upload chunk in flight
        gets its time again (the upstream may be waiting for the caller to read)."""
        if self.running:
            self.restart()

    async def _watch(self) -> None:
        """Cancel :attr:`scope` when the time is up; while the clock is paused, look again
        every ``timeout`` (a restart can only move the end later than that)."""
        while True:
            now = trio.current_time()
            if not self.running:
                deadline = now + self.timeout
            elif now >= (deadline := self.since + self.timeout):
                self.scope.cancel()
                return
            await trio.sleep_until(deadline)


class _Caller:
    """The caller's side of the ASGI exchange: its request body, read for the upload (an
    async iterator of chunks), then its disconnect.

    ``receive()`` is read by one task at a time: the upload, until it stops reading (the
    body ended, or :meth:`aclose`/:meth:`release`), then :meth:`watch`, which discards
    what is left of the body. On ``http.disconnect`` the body iterator never returns (a
    short body must not reach the upstream as a complete request): it calls
    ``on_disconnect``, which cancels the exchange.
    """

    def __init__(
        self,
        receive: Receive,
        first: Message,
        timer: _UpstreamTimer,
        on_disconnect: Callable[[], object],
        on_bytes: Callable[[int], object],
    ) -> None:
        self._receive = receive
        self._timer = timer
        self._on_disconnect = on_disconnect
        self._on_bytes = on_bytes
        #: Set when the body iterator stops reading (its end, or the caller left).
        self._handed_over = trio.Event()
        self.disconnected = False
        #: The first ``http.request`` message's body, not yet handed out.
        self._pending: bytes = first.get("body", b"")
        self.body_complete = not first.get("more_body", False)
        if self.body_complete:
            self._handed_over.set()

    def whole_body(self) -> bytes | None:
        """The body, if the first message held all of it."""
        return self._pending if self.body_complete else None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            first, self._pending = self._pending, b""
            self._on_bytes(len(first))
            return first
        if not self.body_complete:
            self._timer.body_streams()
        while not self.body_complete:
            self._timer.pause()  # waiting on the caller is not the upstream's fault
            message = await self._receive()
            self._timer.restart()
            if message["type"] == "http.disconnect":
                self._gone()
                await trio.sleep_forever()  # cancelled with the exchange
            chunk: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                self.body_complete = True
                self._handed_over.set()
            if chunk:
                self._on_bytes(len(chunk))
                return chunk
        self._timer.upload_done()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """The upload's end, whatever the reason (httpstream calls it)."""
        self.release()
        await trio.lowlevel.checkpoint()

    def release(self) -> None:
        """The upload reads no more (it ended, or never started): :meth:`watch` takes
        ``receive()`` over."""
        self._handed_over.set()

    async def watch(self) -> None:
        """Once the upload stopped reading, discard the rest of the body and wait for the
        caller to leave."""
        await self._handed_over.wait()
        while not self.disconnected:
            message: Message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone()

    def _gone(self) -> None:
        self.disconnected = True
        self._handed_over.set()
        self._on_disconnect()


async def forward_asgi_http(
    scope: Scope, receive: Receive, send: Send, upstream: HttpUpstream
) -> int:
    """Forward the ``http`` scope's request to ``upstream`` and its response back; returns
    the status the caller got (:data:`CLIENT_CLOSED` if it left before the head). Never
    raises for what the upstream or the caller did."""
    return await _Exchange(upstream, scope, receive, send).run()


class _Exchange:
    """One forward: the caller's request upstream, the response back."""

    def __init__(self, upstream: HttpUpstream, scope: Scope, receive: Receive, send: Send) -> None:
        self.upstream = upstream
        self.scope = scope
        self.receive = receive
        self.send = send
        #: What the caller got (or was getting when it left).
        self.status = CLIENT_CLOSED
        #: Every byte of the upstream's response was passed on (a caller that hangs up
        #: after that has not gone away early: it is done).
        self.delivered = False

    async def run(self) -> int:
        first: Message = await self.receive()
        if first["type"] == "http.disconnect":
            return self.status
        upstream = self.upstream
        ending: ApiError | bool = False
        async with trio.open_nursery() as nursery:
            timer = _UpstreamTimer(upstream.timeout, nursery)
            caller = _Caller(
                self.receive,
                first,
                timer,
                on_disconnect=nursery.cancel_scope.cancel,
                on_bytes=upstream.hooks.request_bytes,
            )
            nursery.start_soon(caller.watch)
            ending = await self._forward(caller, timer)
            nursery.cancel_scope.cancel()
        # The watcher is gone; our caller drains the request while the end goes out.
        if isinstance(ending, ApiError):
            self.status = await send_api_error(self.send, ending)
        elif ending:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        if caller.disconnected and not self.delivered:
            upstream.logger.info(
                "caller went away", extra={**upstream.log_extra, "status": self.status}
            )
        return self.status

    async def _forward(self, caller: _Caller, timer: _UpstreamTimer) -> ApiError | bool:
        """The exchange with the upstream, up to the response's end (not sent): the error
        to answer, True for a whole response, False for one cut short."""
        upstream = self.upstream
        whole = caller.whole_body()
        body: bytes | _Caller = caller if whole is None else whole
        outgoing = forwarded_headers(
            self.scope["headers"], current_request_id.get(), drop=upstream.drop_request_headers
        )
        start = trio.current_time()
        failure = upstream.timeout_error
        opened = False
        complete = False
        with timer.scope:
            try:
                async with upstream.open(self.scope["method"], outgoing, body) as response:
                    opened = True
                    timer.head_arrived(upload_done=caller.body_complete)
                    upstream.hooks.head(trio.current_time() - start)
                    if whole:  # sent with the head (an iterated body counts as it goes)
                        upstream.hooks.request_bytes(len(whole))
                    complete = await self._stream_response(response, timer)
            except Exception as exc:
                mapped = None if opened else upstream.failure(exc)
                if mapped is None:
                    raise
                upstream.logger.info(
                    "forward failed", extra={**upstream.log_extra, "error": repr(exc)}
                )
                failure = mapped
        # The upload has ended with the exchange; the watcher reads the caller from here on.
        caller.release()
        if not opened:
            return failure
        if timer.scope.cancelled_caught:
            upstream.logger.warning(
                "the upstream stopped taking the request body; response cut",
                extra={**upstream.log_extra, "timeout": timer.timeout},
            )
        return complete

    async def _stream_response(self, response: HttpResponse, timer: _UpstreamTimer) -> bool:
        """The head and the body, not the end; False if the upstream broke mid-body."""
        upstream = self.upstream
        self.status = response.status
        headers = response_headers(response.headers, drop=upstream.drop_response_headers)
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        await self.send(start)
        try:
            async for chunk in response.body:
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
                upstream.hooks.response_bytes(len(chunk))
                timer.response_moved()
        except ExchangeError as exc:
            # Too late for another status: leave the response unfinished; once the rest
            # of the request body is drained, hypercorn closes the connection, so the
            # caller sees a short body, never a whole one.
            upstream.logger.warning(
                "upstream broke mid-response", extra={**upstream.log_extra, "error": repr(exc)}
            )
            return False
        self.delivered = True
        # An upload still running ends here: the upstream has answered in full.
        await response.aclose()
        return True
