"""The tunnel client (agent side): dial the relay, serve the streams it opens.

Mirrors the Go client the project started from: dial ``ws(s)://relay/tunnel/connect`` with
the device token, run a yamux *client* session over the WebSocket, and answer each stream
the relay opens (one HTTP/1.1 request, or a WebSocket upgrade piped raw) from the local
server. Reconnects forever: with jittered backoff after a failed dial (never sooner than a
busy relay's ``Retry-After``), and after a session that was up ends within a random moment
(``redial_spread``), so that a fleet cut off together -- a relay restart -- comes back
spread out instead of in lock-step. When the relay says this connection was *replaced* by
a newer one for the same token (close code :data:`~visiona_tunnel.wsconn.CLOSE_REPLACED`)
or refuses the token (HTTP 401/403), it backs off, so two agents sharing a token cannot
flap.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlsplit

import attrs
import trio
from wsproto.frame_protocol import CloseReason

from . import yamux
from .agent_stream import serve_tunnel_stream
from .backoff import backoff
from .retry_after import parse_retry_after
from .wsconn import (
    CLOSE_REPLACED,
    DEFAULT_MAX_MESSAGE_SIZE,
    WebSocketRejected,
    WebSocketStream,
    connect_websocket_stream,
)

logger = logging.getLogger("visiona_tunnel.client")

#: The tunnel's yamux settings, at both ends: hashicorp's defaults with a 10 s keepalive
#: (3 missed = 30 s), and receive windows that auto-tune up to 16 MiB (go-yamux's cap), so
#: one large transfer is not held to one 256 KiB window per round trip. The window only grows
#: while the reader uses half of it within a few round trips, so a slow reader keeps 256 KiB.
TUNNEL_YAMUX_CONFIG = yamux.Config(
    keepalive_interval=10.0,
    keepalive_timeout=30.0,
    max_stream_window_size=16 * 1024 * 1024,
    auto_tune_window=True,
)


class ClientState(enum.StrEnum):
    """Compares equal to its value: ``client.state == "online"``."""

    CONNECTING = "connecting"
    ONLINE = "online"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


class TokenRefused(Exception):
    """The relay refused the token (HTTP 401 or 403 on the upgrade)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"the relay refused the token (HTTP {status_code})")
        self.status_code = status_code


class RelayBusy(trio.BrokenResourceError):
    """The relay answered the upgrade 429 or 503 (over a handshake cap, at capacity, or
    unable to check tokens now); ``retry_after``: the seconds its ``Retry-After`` asked."""

    def __init__(self, status_code: int, retry_after: float | None) -> None:
        super().__init__(f"relay answered HTTP {status_code}")
        self.status_code = status_code
        self.retry_after = retry_after


class Replaced(Exception):
    """The relay closed this tunnel because a newer one with the same token arrived."""


@attrs.frozen(kw_only=True)
class ClientHooks:
    """Callbacks on the client's life cycle; each runs in the client's task and must not block."""

    on_dial_attempt: Callable[[int], None] | None = None
    on_session_up: Callable[[], None] | None = None
    on_session_down: Callable[[BaseException | None], None] | None = None
    on_dial_failed: Callable[[int, BaseException], None] | None = None
    on_retry_scheduled: Callable[[int, float], None] | None = None


@attrs.frozen(kw_only=True)
class ClientConfig:
    yamux: yamux.Config = TUNNEL_YAMUX_CONFIG
    #: Backoff between failed dials: ``base * 2**(n-1)`` capped at ``cap``; ``jitter`` takes
    #: up to that fraction off each delay at random (or adds it to a busy relay's
    #: ``Retry-After``, which is never cut short).
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    backoff_jitter: float = 0.5
    #: After a session that was up ends, the first redial waits a random 0 to this many
    #: seconds (0: at once).
    redial_spread: float = 1.0
    #: The same when the relay closed the tunnel as *going away* (1001: it is restarting
    #: or shutting down): it needs time to come back, and every agent it had redials now.
    restart_spread: float = 10.0
    #: Dial plus WebSocket handshake must finish within this.
    connect_timeout: float = 10.0
    #: A forwarded request with no byte moving either way for this long is abandoned.
    stream_idle_timeout: float = 300.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: How a ``wss://`` relay is verified (the system's trust store when None).
    ssl_context: ssl.SSLContext | None = None


def parse_local_addr(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` (or ``"[::1]:8080"``) -> ``("127.0.0.1", 8080)``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_relay_url(url: str) -> None:
    """Raise ValueError unless ``url`` is ``ws://`` or ``wss://`` with a host. The message
    does not repeat the URL (it may hold a token)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:
        raise ValueError("the relay URL is not a valid URL") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("the relay URL must start with ws:// or wss://")
    if not parts.hostname:
        raise ValueError("the relay URL has no host")


class TunnelClient:
    """Keep a tunnel to ``relay_url`` up and serve it from ``local_addr``.

    Use ``async with TunnelClient(...) as client:`` (runs in the background until the block
    ends) or ``await client.run()`` (runs until :meth:`stop`). ``stop`` is idempotent.
    A ``relay_url`` that is not ``ws://`` or ``wss://`` is a ValueError here, not at the dial.
    """

    def __init__(
        self,
        relay_url: str,
        token: str,
        local_addr: tuple[str, int] | str,
        *,
        hooks: ClientHooks | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        check_relay_url(relay_url)
        self.relay_url = relay_url
        self.token = token
        self.local_addr = (
            parse_local_addr(local_addr) if isinstance(local_addr, str) else local_addr
        )
        self.hooks = hooks or ClientHooks()
        self.config = config or ClientConfig()
        #: The close code that ended the last session (None: no close frame).
        self._ended_by: int | None = None
        self._state = ClientState.CONNECTING
        self._stopped = False
        self._scope: trio.CancelScope | None = None
        self._session_scope: trio.CancelScope | None = None
        self._stack: AsyncExitStack | None = None
        self._state_changed = trio.Event()

    @property
    def state(self) -> ClientState:
        return self._state

    async def wait_state(self, state: ClientState | str) -> None:
        """Wait until the client is in ``state`` (a :class:`ClientState` or its value,
        ``"online"``: a value that is none raises ValueError at once)."""
        wanted = ClientState(state)
        await trio.lowlevel.checkpoint()
        while self._state is not wanted:
            await self._state_changed.wait()

    def stop(self) -> None:
        """Close the session (if any) and stop reconnecting. Safe to call any number of times."""
        self._stopped = True
        if self._session_scope is not None:
            # Online: end the session; the loop reports it down (with None) and returns.
            self._session_scope.cancel()
        elif self._scope is not None:
            self._scope.cancel()
        else:
            self._set_state(ClientState.STOPPED)

    async def __aenter__(self) -> Self:
        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(self.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        self.stop()
        assert self._stack is not None
        return await self._stack.__aexit__(exc_type, exc, traceback)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial, serve, redial; returns once :meth:`stop` is called."""
        if self._stopped:
            task_status.started()
            return
        try:
            with trio.CancelScope() as self._scope:
                task_status.started()
                await self._reconnect_forever()
        finally:
            self._scope = None
            self._set_state(ClientState.STOPPED)

    async def _reconnect_forever(self) -> None:
        attempt = 0  # failed dials (or replacements) since the last good session
        while True:
            attempt += 1
            if self._state is ClientState.ONLINE:
                self._set_state(ClientState.RECONNECTING)
            self._call(self.hooks.on_dial_attempt, attempt)
            try:
                with trio.fail_after(self.config.connect_timeout):
                    ws = await self._dial()
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, TokenRefused) as exc:
                self._call(self.hooks.on_dial_failed, attempt, exc)
                if isinstance(exc, TokenRefused):
                    logger.error("relay refused the token", extra={"status": exc.status_code})
                    delay = self.config.backoff_cap
                elif isinstance(exc, RelayBusy) and exc.retry_after is not None:
                    logger.warning(
                        "relay busy",
                        extra={"status": exc.status_code, "retry_after": exc.retry_after},
                    )
                    delay = self._busy_backoff(attempt, exc.retry_after)
                else:
                    logger.warning("dial failed", extra={"attempt": attempt, "error": repr(exc)})
                    delay = self._backoff(attempt)
                await self._retry_after(attempt, delay)
                continue
            error = await self._serve(ws)
            self._call(self.hooks.on_session_down, error)
            logger.info("session down", extra={"error": repr(error) if error else None})
            if self._stopped:
                return
            if isinstance(error, Replaced):
                # Another agent holds the same token: back off instead of taking it back.
                await self._retry_after(attempt, self._backoff(attempt))
                continue
            attempt = 0  # a session was up: redial soon, at a random moment
            spread = self.config.redial_spread
            if self._ended_by == CloseReason.GOING_AWAY:
                spread = self.config.restart_spread
            if spread:
                await self._retry_after(0, random.uniform(0.0, spread))

    async def _retry_after(self, attempt: int, delay: float) -> None:
        self._set_state(ClientState.RECONNECTING)
        self._call(self.hooks.on_retry_scheduled, attempt, delay)
        logger.info("retry scheduled", extra={"attempt": attempt, "delay": delay})
        await trio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        config = self.config
        return backoff(
            attempt, base=config.backoff_base, cap=config.backoff_cap, jitter=config.backoff_jitter
        )

    def _busy_backoff(self, attempt: int, retry_after: float) -> float:
        """Not before the relay's ``Retry-After`` (nor the backoff), spread by the jitter
        above it: a storm the relay turned away comes back over a window, not at once."""
        config = self.config
        delay = max(retry_after, backoff(attempt, base=config.backoff_base, cap=config.backoff_cap))
        return delay * (1.0 + random.uniform(0.0, config.backoff_jitter))

    async def _dial(self) -> WebSocketStream:
        separator = "&" if "?" in self.relay_url else "?"
        url = f"{self.relay_url}{separator}token={quote(self.token, safe='')}"
        try:
            return await connect_websocket_stream(
                url,
                max_message_size=self.config.max_message_size,
                ssl_context=self.config.ssl_context,
            )
        except WebSocketRejected as exc:
            if exc.status_code in (401, 403):
                raise TokenRefused(exc.status_code) from exc
            if exc.status_code in (429, 503):
                retry_after = parse_retry_after(_header(exc.headers, b"retry-after"))
                raise RelayBusy(exc.status_code, retry_after) from exc
            raise trio.BrokenResourceError(f"relay answered HTTP {exc.status_code}") from exc

    async def _serve(self, ws: WebSocketStream) -> BaseException | None:
        """Run one session until it ends; returns why it ended (None if we stopped it)."""
        with trio.CancelScope() as self._session_scope:
            if self._stopped:
                self._session_scope.cancel()
            async with (
                yamux.open_session(ws, client=True, config=self.config.yamux) as session,
                trio.open_nursery() as handlers,
            ):
                self._set_state(ClientState.ONLINE)
                self._call(self.hooks.on_session_up)
                logger.info("session up", extra={"relay": self.relay_url})
                with contextlib.suppress(yamux.SessionClosed):  # why: session.close_reason
                    async for stream in session:
                        handlers.start_soon(self._handle, stream)
                # The session is over: requests still waiting on the local server are moot.
                handlers.cancel_scope.cancel()
        self._session_scope = None
        self._ended_by = ws.close_code
        if self._stopped:
            return None
        if ws.close_code == CLOSE_REPLACED:
            return Replaced("the relay replaced this tunnel with a newer one for the same token")
        return session.close_reason

    async def _handle(self, stream: yamux.Stream) -> None:
        try:
            await serve_tunnel_stream(
                stream, self.local_addr, idle_timeout=self.config.stream_idle_timeout
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("stream %d ended: %r", stream.stream_id, exc)
        finally:
            await stream.aclose()

    def _set_state(self, state: ClientState) -> None:
        if state is not self._state:
            self._state = state
            logger.info("state", extra={"state": state.value})
            self._state_changed.set()
            self._state_changed = trio.Event()

    @staticmethod
    def _call(hook: Callable[..., None] | None, *args: object) -> None:
        if hook is not None:
            hook(*args)


__all__ = [
    "TUNNEL_YAMUX_CONFIG",
    "ClientConfig",
    "ClientHooks",
    "ClientState",
    "RelayBusy",
    "Replaced",
    "TokenRefused",
    "TunnelClient",
    "check_relay_url",
]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
