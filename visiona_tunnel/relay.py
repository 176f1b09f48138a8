"""The relay side: accept tunnels, keep one live tunnel per device, send traffic down them.

A :class:`TunnelRegistry` owns the live tunnels by key (the device id). ``await
registry.serve(key, ws)`` runs one tunnel, a yamux *server* session over an accepted
WebSocket, until it ends; a newer tunnel for the same key replaces the older one, which is
closed with :data:`~visiona_tunnel.wsconn.CLOSE_REPLACED`. Agents reach it through
:func:`visiona_tunnel.listener.serve_tunnel_listener`. Callers reach the agent through
:meth:`Tunnel.request` (one HTTP/1.1 request per yamux stream) or :meth:`Tunnel.open_stream`
(a stream for an upgrade they drive themselves).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Protocol

import attrs
import trio

from . import yamux
from .client import TUNNEL_YAMUX_CONFIG
from .httpstream import HttpResponse, http_exchange
from .wsconn import CLOSE_REPLACED

logger = logging.getLogger("visiona_tunnel.relay")


#: The most of a response body :meth:`Tunnel.request` hands on at once: large pieces cost
#: the caller far less per byte (an ASGI message and a write each), and a stream's window
#: holds 256 KiB at first anyway (docs/performance.md, issue 14).
READ_SIZE = 256 * 1024


class TunnelTransport(Protocol):
    """What a tunnel runs over: a byte stream whose close carries a WebSocket close code
    (:class:`~visiona_tunnel.wsconn.WebSocketStream`, or an ASGI WebSocket adapter)."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
    async def send_all_vectored(self, parts: list[bytes | memoryview]) -> None: ...
    async def wait_send_all_might_not_block(self) -> None: ...
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...
    async def aclose(self, code: int = 1000, reason: str = "") -> None: ...


class _CountingStream(trio.abc.Stream):
    """Counts the bytes a tunnel moves each way, and closes the WebSocket with the code the
    tunnel ends with (:meth:`Tunnel.close`'s, or one for why its session ended)."""

    def __init__(self, inner: TunnelTransport) -> None:
        self.inner = inner
        self.bytes_in = 0
        self.bytes_out = 0
        self.session: yamux.Session | None = None
        #: Set by :meth:`Tunnel.close`; else :func:`close_code_of` the session's end.
        self.close_code: int | None = None
        self.close_reason = ""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.bytes_out += len(data)

    async def send_all_vectored(self, parts: list[bytes | memoryview]) -> None:
        await self.inner.send_all_vectored(parts)
        self.bytes_out += sum(len(part) for part in parts)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.bytes_in += len(data)
        return data

    async def aclose(self) -> None:
        code, reason = self.close_code, self.close_reason
        if code is None:
            code, reason = close_code_of(
                None if self.session is None else self.session.close_reason
            )
        await self.inner.aclose(code, reason)


def close_code_of(reason: BaseException | None) -> tuple[int, str]:
    """The WebSocket close code a tunnel whose session ended for ``reason`` is closed with:
    1002 after a protocol error (its GoAway(1) went first), else 1000."""
    if isinstance(reason, yamux.ProtocolError):
        return 1002, "yamux protocol error"
    return 1000, ""


@attrs.frozen
class TunnelStats:
    key: str
    connected_since: float  # Unix time
    remote_address: str | None
    open_streams: int
    rtt: float | None
    bytes_in: int
    bytes_out: int


class Tunnel:
    """One live agent connection. Get it from :meth:`TunnelRegistry.get`."""

    def __init__(
        self,
        key: str,
        session: yamux.Session,
        ws: TunnelTransport,
        counter: _CountingStream,
        remote_address: str | None,
        dialed_at: float,
    ) -> None:
        self.key = key
        self.session = session
        self.remote_address = remote_address
        self.connected_since = time.time()
        #: When the agent asked for this tunnel (trio's clock): the newer of two wins.
        self.dialed_at = dialed_at
        #: Set when a newer tunnel for the same key took this one's place.
        self.replaced = False
        self._ws = ws
        self._counter = counter

    def stats(self) -> TunnelStats:
        return TunnelStats(
            key=self.key,
            connected_since=self.connected_since,
            remote_address=self.remote_address,
            open_streams=self.session.num_streams,
            rtt=self.session.rtt,
            bytes_in=self._counter.bytes_in,
            bytes_out=self._counter.bytes_out,
        )

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: bytes | str,
        target: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]] = (),
        body: bytes | AsyncIterable[bytes] = b"",
    ) -> AsyncIterator[HttpResponse]:
        """One HTTP/1.1 request to the agent's local server, on a stream of its own; the
        response, once its head arrives, for the block (see
        :func:`visiona_tunnel.httpstream.http_exchange`: the body is uploaded by a task of
        the exchange; leaving the block ends both directions, resetting the stream unless
        the exchange was complete)::

            async with tunnel.request("GET", "/status") as response:
                async for chunk in response.body: ...

        Raises:
            yamux.SessionClosed: the tunnel is gone. httpstream.ExchangeError: the agent's
                answer was missing, malformed or cut short.
        """
        stream = await self.session.open_stream()
        exchange = http_exchange(stream, method, target, headers, body, read_size=READ_SIZE)
        async with exchange as response:
            yield response

    async def open_stream(self) -> yamux.Stream:
        """A new stream to the agent, for a protocol upgrade the caller drives."""
        return await self.session.open_stream()

    async def ping(self) -> float:
        return await self.session.ping()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the tunnel: GoAway(0), then the WebSocket close frame with ``code``, then the
        TCP close, in that order on the wire (bounded; see ``Session.aclose``)."""
        if self._counter.close_code is None and not self.session.is_closed:
            self._counter.close_code, self._counter.close_reason = code, reason
        await self.session.aclose()


@attrs.frozen
class TunnelUp:
    key: str
    tunnel: Tunnel


@attrs.frozen
class TunnelDown:
    key: str
    tunnel: Tunnel
    reason: BaseException | None
    replaced: bool


TunnelEvent = TunnelUp | TunnelDown


class TunnelRegistry:
    """Live tunnels by key. Observers (``add_observer``) get :class:`TunnelUp` and
    :class:`TunnelDown` events, synchronously, from the tunnel's task: an observer must
    not block or raise. A :class:`TunnelUp` comes once the tunnel is in the registry; its
    :class:`TunnelDown` once it has left it and its connection is closed, so a newer
    tunnel's :class:`TunnelUp` may come before an older one's :class:`TunnelDown`."""

    def __init__(self, *, config: yamux.Config = TUNNEL_YAMUX_CONFIG) -> None:
        self.config = config
        self._tunnels: dict[str, Tunnel] = {}
        self._observers: list[Callable[[TunnelEvent], None]] = []
        self._changed = trio.Event()

    def get(self, key: str) -> Tunnel | None:
        return self._tunnels.get(key)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))

    def __len__(self) -> int:
        return len(self._tunnels)

    @property
    def observers(self) -> tuple[Callable[[TunnelEvent], None], ...]:
        """The observers now, in the order they get events."""
        return tuple(self._observers)

    def add_observer(self, observer: Callable[[TunnelEvent], None]) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[TunnelEvent], None]) -> None:
        """Stop sending events to ``observer`` (one added with :meth:`add_observer`; if
        it was not, or was removed already, nothing happens). An observer may remove
        itself, or another, while it handles an event: the event still reaches every
        observer that was there when it happened."""
        with contextlib.suppress(ValueError):
            self._observers.remove(observer)

    async def wait_for(self, key: str) -> Tunnel:
        """Wait until a tunnel for ``key`` is up."""
        while (tunnel := self._tunnels.get(key)) is None:
            await self._changed.wait()
        return tunnel

    async def serve(
        self,
        key: str,
        ws: TunnelTransport,
        *,
        remote_address: str | None = None,
        dialed_at: float | None = None,
        task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the tunnel of ``key`` over ``ws`` until it ends (or is replaced).

        A newer connection replaces the tunnel of the same key; ``dialed_at`` (trio's clock:
        when the agent asked for the tunnel, default now) says which is newer. A tunnel
        dialed before the live one -- a handshake that took long, its agent meanwhile back
        by another connection -- never replaces it: it is closed at once as replaced."""
        dialed_at = trio.current_time() if dialed_at is None else dialed_at
        counter = _CountingStream(ws)
        previous = self._tunnels.get(key)
        if previous is not None and previous.dialed_at > dialed_at:
            logger.info("stale tunnel refused", extra={"key": key, "remote": remote_address})
            counter.close_code = CLOSE_REPLACED
            counter.close_reason = "a newer connection holds this tunnel"
            await counter.aclose()
            return
        async with yamux.open_session(counter, client=False, config=self.config) as session:
            counter.session = session
            tunnel = Tunnel(key, session, ws, counter, remote_address, dialed_at)
            previous = self._tunnels.get(key)
            self._tunnels[key] = tunnel
            self._notify(TunnelUp(key, tunnel))
            logger.info("tunnel up", extra={"key": key, "remote": remote_address})
            task_status.started(tunnel)
            if previous is not None:
                previous.replaced = True
                await previous.close(CLOSE_REPLACED, "replaced by a newer connection")
            try:
                # Agents do not open streams; refuse any they try to.
                with contextlib.suppress(yamux.SessionClosed):  # why: session.close_reason
                    async for stream in session:
                        await stream.reset()
            finally:
                if self._tunnels.get(key) is tunnel:
                    del self._tunnels[key]
        reason = session.close_reason
        self._notify(TunnelDown(key, tunnel, reason, tunnel.replaced))
        logger.info(
            "tunnel down", extra={"key": key, "reason": repr(reason), "replaced": tunnel.replaced}
        )

    def _notify(self, event: TunnelEvent) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for observer in tuple(self._observers):  # observers may remove themselves
            observer(event)


class VerifierUnavailable(Exception):
    """A token verifier cannot answer now (not the token's fault): the upgrade gets 503."""


class TokenVerifier(Protocol):
    """``await verifier(token)``: the device id the token belongs to, or None.

    Raises:
        VerifierUnavailable: the verifier cannot answer now (not the token's fault).
    """

    async def __call__(self, token: str) -> str | None: ...


__all__ = [
    "TokenVerifier",
    "Tunnel",
    "TunnelDown",
    "TunnelEvent",
    "TunnelRegistry",
    "TunnelStats",
    "TunnelUp",
    "VerifierUnavailable",
    "close_code_of",
]
