"""``ANY /internal/forward/{device_id}/{path}``: one HTTP request through a device's tunnel,
as a raw ASGI handler (Quart would buffer the upload and cut long downloads).

The caller's request goes to the agent as ``METHOD /{path}?{query} HTTP/1.1`` (the path
as the caller escaped it), with the caller's headers except hop-by-hop ones, ``Host``,
``Authorization`` (the internal secret), ``Expect`` (hypercorn already answered it) and
``X-Request-ID`` (replaced by this request's id). The body is streamed from ASGI
``receive()`` to the tunnel and the response from the tunnel to ASGI ``send()``, one
chunk at a time each way, so memory stays bounded and a slow side slows the other.

==================================================  =========================================
what happened                                        the caller gets
==================================================  =========================================
the service is draining                              503 ``SHUTTING_DOWN``
no tunnel for the device (or it is closing)          502 ``TUNNEL_DISCONNECTED``
the tunnel kept us waiting ``forward_timeout`` for   504 ``TUNNEL_TIMEOUT``
the response head (see below)
the tunnel stream broke before the response head     502 ``TUNNEL_ERROR``
the agent's response (its 502 for an unreachable     that response: status, headers minus
local server included)                               hop-by-hop ones, body
the tunnel broke mid-body                            the response ends abruptly (the
                                                     connection is closed; the caller
                                                     sees a short body)
==================================================  =========================================

``forward_timeout`` bounds how long the tunnel may keep us waiting: for the response head,
and for each chunk of the request body to be taken (the agent may answer before it has
read the whole body, and go on reading it while the response streams). The clock restarts
with each chunk and stops while the caller's next chunk is awaited, so a large (or slowly
sent) upload is not cut, while an agent that stops reading or answering is: before the
head with 504; after it -- when the response has not moved either for as long -- by ending
the response abruptly. With the request body sent, reading the response has no time limit.
(After the head, a stuck upload and a caller that neither reads nor sends look the same
from here; the bound also ends a forward whose caller vanished while hypercorn waits, in our
``send()``, for room in its request queue to report it.)

A caller that goes away (``http.disconnect``) ends the exchange: the tunnel stream is
reset, so the agent stops its local request. Whether the request has a body is taken
from its first ``http.request`` message, not from its headers (an HTTP/2 request may
have a body and neither ``Content-Length`` nor ``Transfer-Encoding``).

Once the upload stops reading the caller -- the body ended, the upload failed or was
abandoned -- a watcher task reads ``receive()`` until the exchange with the tunnel ends,
discarding what is left of the body. hypercorn's queue of request messages is bounded, and
it blocks (inside our ``send()``) to report a disconnect when the queue is full: somebody
must keep reading. The response's end (or the error answer) goes out after the watcher has
stopped, while the internal middleware drains the rest of the body (one reader at a time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable

import trio

from visiona_tunnel import yamux
from visiona_tunnel.httpstream import ForwardError, HttpResponse, without_hop_by_hop
from visiona_tunnel.relay import Tunnel

from ..common.http import (
    REQUEST_ID_HEADER,
    ApiError,
    Message,
    Receive,
    Scope,
    Send,
    current_request_id,
    send_error,
)
from .state import ProxyState

__all__ = ["forward_http_request", "forwarded_headers", "response_headers"]

logger = logging.getLogger("visiona_services.remote_proxy.forward")

#: Status counted in ``visiona_forward_requests_total`` when the caller left before the
#: response head (nginx's "client closed request").
CLIENT_CLOSED = 499

#: Request headers that are ours, not the device's.
_DROPPED_REQUEST_HEADERS = frozenset({b"host", b"authorization", b"expect", REQUEST_ID_HEADER})


def forwarded_headers(
    headers: Iterable[tuple[bytes, bytes]],
    request_id: str | None,
    *,
    drop: frozenset[bytes] = frozenset(),
) -> list[tuple[bytes, bytes]]:
    """The caller's headers as the device gets them (see the module docstring); names in
    ``drop`` (lower-case) go too. Order and case of the rest are kept."""
    dropped = _DROPPED_REQUEST_HEADERS | drop
    kept = [(name, value) for name, value in headers if name.lower() not in dropped]
    out = without_hop_by_hop(kept)
    if request_id is not None:
        out.append((b"X-Request-ID", request_id.encode()))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The agent's response headers minus hop-by-hop ones; ``Content-Length`` is kept, and
    without one hypercorn frames the body itself (chunked)."""
    return without_hop_by_hop(headers)


class _TunnelTimer:
    """``forward_timeout`` of waiting on the tunnel (see the module docstring): the deadline
    of :attr:`scope`, which covers the exchange with the tunnel."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope()
        #: Until the head, the tunnel owes us one; after it, only an upload chunk in flight.
        self.head_pending = True
        self.restart()

    def restart(self) -> None:
        self.scope.deadline = trio.current_time() + self.timeout

    def pause(self) -> None:
        self.scope.deadline = math.inf

    def head_arrived(self, upload_done: bool) -> None:
        self.head_pending = False
        if upload_done:
            self.pause()

    def upload_done(self) -> None:
        if not self.head_pending:
            self.pause()

    def response_moved(self) -> None:
        """After the head, a chunk of the response went out: an upload chunk in flight
        gets its time again (the agent may be waiting for the caller to read)."""
        if self.scope.deadline != math.inf:
            self.restart()


class _Caller:
    """The caller's side of the ASGI exchange: its request body, read for the upload (an
    async iterator of chunks), then its disconnect.

    ``receive()`` is read by one task at a time: the upload, until it stops reading (the
    body ended, or :meth:`aclose`/:meth:`release`), then :meth:`watch`, which discards
    what is left of the body. On ``http.disconnect`` the body iterator never returns (a
    short body must not reach the agent as a complete request): it calls
    ``on_disconnect``, which cancels the exchange.
    """

    def __init__(
        self,
        receive: Receive,
        first: Message,
        timer: _TunnelTimer,
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
        while not self.body_complete:
            self._timer.pause()  # waiting on the caller is not the tunnel's fault
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


async def forward_http_request(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, device_id: str, target: bytes
) -> None:
    """The raw ASGI handler: forward one request to ``device_id``'s agent as ``target``
    (``/path?query``, escaped). Never raises for what the tunnel or the caller did."""
    metrics = state.metrics
    if state.draining.is_set():
        metrics.forwards.inc(status="503")
        await send_error(send, 503, "SHUTTING_DOWN", "the remote-proxy is shutting down")
        return
    tunnel = state.tunnels.get(device_id)
    if tunnel is None:
        metrics.forwards.inc(status="502")
        await send_error(send, 502, "TUNNEL_DISCONNECTED", f"device {device_id!r} is not connected")
        return
    with state.inflight:
        status = await _Exchange(state, tunnel, scope, receive, send).run(target)
    metrics.forwards.inc(status=str(status))


class _Exchange:
    """One forward: the caller's request to the agent, its response back."""

    def __init__(
        self, state: ProxyState, tunnel: Tunnel, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.state = state
        self.tunnel = tunnel
        self.scope = scope
        self.receive = receive
        self.send = send
        #: What the caller got (or was getting when it left).
        self.status = CLIENT_CLOSED

    async def run(self, target: bytes) -> int:
        """Forward; returns the status to count."""
        metrics = self.state.metrics
        first: Message = await self.receive()
        if first["type"] == "http.disconnect":
            return self.status
        timer = _TunnelTimer(self.state.config.forward_timeout)
        ending: ApiError | bool = False
        async with trio.open_nursery() as nursery:
            caller = _Caller(
                self.receive,
                first,
                timer,
                on_disconnect=nursery.cancel_scope.cancel,
                on_bytes=lambda n: metrics.forward_bytes_in.inc(n),
            )
            nursery.start_soon(caller.watch)
            ending = await self._forward(target, caller, timer)
            nursery.cancel_scope.cancel()
        # The watcher is gone; the middleware reads the caller while the end goes out.
        if isinstance(ending, ApiError):
            self.status = ending.status
            await send_error(self.send, ending.status, ending.code, ending.message)
        elif ending:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        if caller.disconnected:
            logger.info(
                "caller went away", extra={"device": self.tunnel.key, "status": self.status}
            )
        return self.status

    async def _forward(
        self, target: bytes, caller: _Caller, timer: _TunnelTimer
    ) -> ApiError | bool:
        """The exchange with the tunnel, up to the response's end (not sent): the error to
        answer, True for a whole response, False for one cut short."""
        metrics = self.state.metrics
        whole = caller.whole_body()
        body: bytes | _Caller = caller if whole is None else whole
        outgoing = forwarded_headers(self.scope["headers"], current_request_id.get())
        start = trio.current_time()
        failure = ApiError(504, "TUNNEL_TIMEOUT", "the device did not answer in time")
        response: HttpResponse | None = None
        complete = False
        with timer.scope:
            try:
                response = await self.tunnel.forward_http(
                    self.scope["method"], target, outgoing, body
                )
            except (ForwardError, yamux.StreamReset, yamux.StreamsExhausted) as exc:
                logger.info("forward failed", extra={"device": self.tunnel.key, "error": repr(exc)})
                failure = ApiError(502, "TUNNEL_ERROR", "the tunnel failed before the response")
            except yamux.SessionClosed:
                failure = ApiError(502, "TUNNEL_DISCONNECTED", "the device's tunnel is closing")
            else:
                timer.head_arrived(upload_done=caller.body_complete)
                metrics.forward_seconds.observe(trio.current_time() - start)
                if whole:  # sent with the head (an iterated body counts as it goes)
                    metrics.forward_bytes_in.inc(len(whole))
                async with response:
                    complete = await self._stream_response(response, timer)
        # The upload has ended (forward_http or the response's aclose ended it); the
        # watcher reads the caller from here on.
        caller.release()
        if response is None:
            return failure
        if timer.scope.cancelled_caught:
            logger.warning(
                "the tunnel stopped taking the request body; response cut",
                extra={"device": self.tunnel.key, "timeout": timer.timeout},
            )
        return complete

    async def _stream_response(self, response: HttpResponse, timer: _TunnelTimer) -> bool:
        """The head and the body, not the end; False if the tunnel broke mid-body."""
        metrics = self.state.metrics
        self.status = response.status
        await self.send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response_headers(response.headers),
            }
        )
        try:
            async for chunk in response.body:
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
                metrics.forward_bytes_out.inc(len(chunk))
                timer.response_moved()
        except ForwardError as exc:
            # Too late for another status: leave the response unfinished; once the rest
            # of the request body is drained (see internal_app), hypercorn closes the
            # connection, so the caller sees a short body, never a whole one.
            logger.warning(
                "tunnel broke mid-response", extra={"device": self.tunnel.key, "error": repr(exc)}
            )
            return False
        # An upload still running ends here: the agent has answered in full.
        await response.aclose()
        return True
