"""Our relay (``serve_tunnel_listener`` + ``TunnelRegistry``) on loopback, and a caller's
view of it: send one request through a tunnel and get the response whole or hashed, or
give up half way.

``PyRelay`` can be stopped and started again on the same port, like a restarted relay
process (each start gets a fresh registry, as a new process would have).
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from visiona_tunnel.client import TUNNEL_YAMUX_CONFIG
from visiona_tunnel.httpstream import HttpResponse
from visiona_tunnel.listener import admit_with, serve_tunnel_listener
from visiona_tunnel.relay import Tunnel, TunnelRegistry

Headers = Iterable[tuple[bytes | str, bytes | str]]


class PyRelay:
    """``serve_tunnel_listener`` on 127.0.0.1 with a static token table."""

    def __init__(self, tokens: Mapping[str, str], port: int = 0) -> None:
        self.tokens = dict(tokens)
        self.port = port
        self.registry = TunnelRegistry()
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    @property
    def url(self) -> str:
        """What an agent dials (without the token)."""
        return f"ws://127.0.0.1:{self.port}/tunnel/connect"

    async def verify_token(self, token: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return self.tokens.get(token)

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (on ``port``, or a free one the first time) until :meth:`stop`."""
        assert self._scope is None, "already running"
        self.registry = TunnelRegistry()
        self._done = trio.Event()
        self._scope = await nursery.start(self._serve)

    async def stop(self) -> None:
        """Close the listener and every tunnel (their TCP connections), and wait for it."""
        assert self._scope is not None, "not running"
        self._scope.cancel()
        await self._done.wait()
        self._scope = None

    async def _serve(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    serve = partial(
                        serve_tunnel_listener,
                        self.registry,
                        admit_with(self.verify_token),
                        host="127.0.0.1",
                        port=self.port,
                    )
                    urls: list[str] = await nursery.start(serve)
                    self.port = int(urls[0].rsplit(":", 1)[1])
                    task_status.started(scope)
        finally:
            self._done.set()


async def start_py_relay(nursery: trio.Nursery, tokens: Mapping[str, str]) -> PyRelay:
    relay = PyRelay(tokens)
    await relay.start(nursery)
    return relay


# -- a caller of Tunnel.request ----------------------------------------------------------


@dataclass
class Fetched:
    """A whole response that came back through a tunnel."""

    status: int
    #: As received: order and case kept, repeated headers repeated.
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (any case), or None."""
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return values[-1] if values else None


@dataclass
class FetchedDigest:
    """A response whose body was hashed as it arrived, never held whole."""

    status: int
    headers: list[tuple[bytes, bytes]]
    size: int
    sha256: str


@asynccontextmanager
async def forward(
    tunnel: Tunnel,
    method: str,
    target: str,
    headers: Headers = (),
    body: bytes | AsyncIterable[bytes] = b"",
) -> AsyncIterator[HttpResponse]:
    """``Tunnel.request``; the exchange ends with the block (a reset if the response's
    body was not read to the end)."""
    async with tunnel.request(method, target, headers, body) as response:
        yield response


async def fetch(
    tunnel: Tunnel,
    method: str,
    target: str,
    headers: Headers = (),
    body: bytes | AsyncIterable[bytes] = b"",
) -> Fetched:
    async with forward(tunnel, method, target, headers, body) as response:
        data = bytearray()
        async for chunk in response.body:
            data += chunk
        return Fetched(response.status, response.headers, bytes(data))


async def hang_up_mid_body(tunnel: Tunnel, target: str, *, after: int = 1024 * 1024) -> None:
    """GET ``target`` through ``tunnel``, read ``after`` bytes of the body or more, then close
    the response while the rest is still coming: a caller that gives up."""
    async with forward(tunnel, "GET", target) as response:
        received = 0
        async for chunk in response.body:
            received += len(chunk)
            if received >= after:
                break


async def fetch_digest(
    tunnel: Tunnel,
    method: str,
    target: str,
    headers: Headers = (),
    body: bytes | AsyncIterable[bytes] = b"",
) -> FetchedDigest:
    async with forward(tunnel, method, target, headers, body) as response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in response.body:
            digest.update(chunk)
            size += len(chunk)
        return FetchedDigest(response.status, response.headers, size, digest.hexdigest())


#: Memory a 50-100 MiB transfer may take in one process holding relay, agent and local
#: server (and a caller): at most one full stream window (auto-tuned up to its cap while the
#: reader keeps up) plus a few buffers -- bounded by the window, not by the body.
MEMORY_BOUND = TUNNEL_YAMUX_CONFIG.max_stream_window_size + 8 * 1024 * 1024


@asynccontextmanager
async def traced_peak() -> AsyncIterator[list[int]]:
    """Yields a list that holds, afterwards, the peak of traced memory above the start
    (the whole process: relay, agent and local server when they share it)."""
    result: list[int] = []
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        yield result
        result.append(tracemalloc.get_traced_memory()[1] - start)
    finally:
        tracemalloc.stop()
