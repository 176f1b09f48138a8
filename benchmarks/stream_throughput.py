"""Stream throughput and latency: raw trio TCP vs visiona_tunnel.yamux (loopback, two processes).

Run it (from the repository root)::

    .venv/bin/python benchmarks/stream_throughput.py                      # 5 rounds, everything
    .venv/bin/python benchmarks/stream_throughput.py --rounds 3 --json /tmp/bench.json
    .venv/bin/python benchmarks/stream_throughput.py --size-scale 0.1 --impls tcp
    .venv/bin/python benchmarks/stream_throughput.py --impls yamux --workloads single \\
        --rounds 1 --profile /tmp/prof                                    # pyinstrument, both sides

How a run works
---------------
Each (round, workload, implementation) is one *run* with two fresh child processes: this same
module re-invoked with ``--role server`` and ``--role client``. The server listens on
127.0.0.1 port 0 and prints the port; the client connects. The client is always the sender
(bulk) or the pinger; the server is the receiver or the echoer. Runs are interleaved
round-robin: every round runs every workload with every implementation, rotating the
implementation order each round, so that run *r* of two implementations were taken seconds
apart under the same machine load (compare them with the *same-round ratio*).

Workloads
---------
* ``single``: one stream carrying 1 GiB. ``multi``: 64 streams x 16 MiB concurrently (raw TCP:
  64 TCP connections). The sender writes with ``send_all`` of ``--chunk`` bytes (256 KiB) and
  then ``send_eof()``; the receiver reads with ``receive_some(--recv-size)`` (256 KiB) until
  EOF. Connections/streams are all opened *before* the clock starts. Raw TCP is very sensitive
  to the chunk size on loopback (measured here, single stream: 64 KiB ~3.3 GB/s, 128 KiB
  ~5 GB/s, 256 KiB ~8 GB/s, 1 MiB ~3.8 GB/s), so 256 KiB is the *strictest* baseline; the
  figures in docs/anchor-results were taken with a 64 KiB loop (``--chunk 65536
  --recv-size 65536`` to compare with them).
  **Result** = payload bytes / (time the receiver got its last byte - time it got its first
  byte), in MB/s (10^6 bytes/s), measured in the receiving process (for ``multi``: first byte
  on any stream to last byte on any stream). The sender-side figure (first ``send_all`` until
  every stream's acknowledgement has arrived) is kept in the JSON as ``sender_mb_s``.
* ``ping``: one stream; the client sends 100 bytes and waits for the 100-byte echo, 200 warm-up
  round trips and then 10,000 timed ones. **Result** = the run's median RTT in microseconds;
  p99 is reported too. Across runs the table shows the median of the per-run medians / p99s
  (as in docs/anchor-results).

Integrity
---------
Every stream's first and last chunk are unique (stream index + per-run random tag); the
receiver checks the exact byte count up to EOF, the CRC-32 of the first and last chunk and
that each stream index arrived exactly once, and acknowledges (index, count, CRCs), which the
sender checks too. ``--verify full`` additionally CRCs every byte on the receiver (~0.16 CPU
seconds per GiB: that roughly halves raw TCP's figure, so use it to validate a transport, not to
compare numbers). Ping checks every echo byte for byte. A run that fails any check is reported as
failed, never as a number.

CPU
---
Each process reports ``time.process_time()`` over its timed section (receiver: first byte to
the last acknowledgement; sender: first ``send_all`` to the last acknowledgement; ping client:
the timed loop; ping server: first to last byte, including the warm-up). The table shows CPU
seconds and % of one core (CPU seconds / that section's wall time). Loopback kernel work is
charged to both processes.

Transports (extensible)
-----------------------
A :class:`Transport` has ``dial(host, port, options)`` and ``listen(tcp_listener, options)``,
both async context managers yielding something with ``open_stream()`` / ``accept_stream()``
that return :class:`trio.abc.HalfCloseableStream`. Built in: ``tcp`` (each stream is its own
TCP connection) and ``yamux`` (one TCP connection, one yamux session). A muxer over another
byte transport is :func:`yamux_transport` with ``wrap_client`` / ``wrap_server`` adapters that
turn the accepted/dialed TCP stream into a ``trio.abc.Stream``; e.g. a future ``yamux-ws``::

    register_transport(yamux_transport("yamux-ws", "yamux over a WebSocket",
                                       wrap_client=ws_client_adapter,
                                       wrap_server=ws_server_adapter))

Put that in a module and pass ``--transport-module my.module`` (it is imported in the
orchestrator and in both children).

Failures and hangs
------------------
Every run has a hard limit (``--timeout``, 120 s): a few seconds before it, a watchdog in each
child prints the trio task tree (where every task is waiting) and exits; the orchestrator kills
whatever is left. Failed runs print the distinct exception lines of both children; the full
stderr is kept in ``--json`` and, with ``--log-dir DIR``, every child's output is kept there.

Profiling
---------
``--profile DIR`` profiles each child (sender and receiver) for the whole ``trio.run`` with
pyinstrument (sampling, async_mode disabled so trio's scheduler shows up too) or, with
``--profiler cprofile``, with cProfile. Profiling slows the runs: do not compare profiled numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import random
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make visiona_tunnel importable
    sys.path.insert(0, str(ROOT))

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

HOST = "127.0.0.1"
WORKLOADS = ("single", "multi", "ping")
ACK = struct.Struct("!QQII")  # stream index, byte count, crc32(first chunk), crc32(last chunk)
INDEX = struct.Struct("!Q")
TAG_BYTES = 32  # unique bytes at the start of the first and the end of the last chunk


# --------------------------------------------------------------------------------------------
# Transport registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    """Knobs handed to a transport's ``dial``/``listen``."""

    #: yamux ``max_stream_window_size`` (ignored by raw TCP).
    window: int = 256 * KiB
    #: Extra ``yamux.Config`` keyword arguments (``--yamux-config key=value``).
    yamux_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class StreamOpener(Protocol):
    async def open_stream(self) -> trio.abc.HalfCloseableStream: ...


class StreamAccepter(Protocol):
    async def accept_stream(self) -> trio.abc.HalfCloseableStream: ...


DialFn = Callable[[str, int, TransportOptions], AbstractAsyncContextManager[StreamOpener]]
ListenFn = Callable[
    [trio.SocketListener, TransportOptions], AbstractAsyncContextManager[StreamAccepter]
]
#: Turns a raw TCP connection into the byte stream a muxer runs over (e.g. a WebSocket adapter).
ConnWrapper = Callable[
    [trio.SocketStream, TransportOptions], AbstractAsyncContextManager[trio.abc.Stream]
]


@dataclasses.dataclass(frozen=True)
class Transport:
    name: str
    description: str
    #: Client side: connect to ``host:port``; yields an object whose ``open_stream()`` opens
    #: a new stream. Everything is torn down on exit.
    dial: DialFn
    #: Server side: given a bound TCP listener, yields an object whose ``accept_stream()``
    #: returns the next stream the client opened.
    listen: ListenFn


TRANSPORTS: dict[str, Transport] = {}


def register_transport(transport: Transport) -> Transport:
    TRANSPORTS[transport.name] = transport
    return transport


class _TcpOpener:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self.streams: list[trio.SocketStream] = []

    async def open_stream(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(self._host, self._port)  # TCP_NODELAY is on
        self.streams.append(stream)
        return stream


class _TcpAccepter:
    def __init__(self, listener: trio.SocketListener) -> None:
        self._listener = listener
        self.streams: list[trio.SocketStream] = []

    async def accept_stream(self) -> trio.SocketStream:
        stream = await self._listener.accept()
        self.streams.append(stream)
        return stream


async def _close_all(streams: Sequence[trio.abc.AsyncResource]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _tcp_dial(host: str, port: int, options: TransportOptions) -> AsyncIterator[StreamOpener]:
    opener = _TcpOpener(host, port)
    try:
        yield opener
    finally:
        await _close_all(opener.streams)


@asynccontextmanager
async def _tcp_listen(
    listener: trio.SocketListener, options: TransportOptions
) -> AsyncIterator[StreamAccepter]:
    accepter = _TcpAccepter(listener)
    try:
        yield accepter
    finally:
        await _close_all(accepter.streams)


@asynccontextmanager
async def plain_connection(
    conn: trio.SocketStream, options: TransportOptions
) -> AsyncIterator[trio.abc.Stream]:
    """The identity ``ConnWrapper``: the muxer runs directly over TCP."""
    yield conn


def _yamux_config(options: TransportOptions) -> Any:
    from visiona_tunnel.yamux import Config

    return Config(max_stream_window_size=options.window, **dict(options.yamux_config))


def yamux_transport(
    name: str,
    description: str,
    *,
    wrap_client: ConnWrapper = plain_connection,
    wrap_server: ConnWrapper = plain_connection,
) -> Transport:
    """A transport that runs one ``visiona_tunnel.yamux`` session over one wrapped TCP
    connection. Streams are yamux streams (client opens, server accepts)."""

    @asynccontextmanager
    async def dial(host: str, port: int, options: TransportOptions) -> AsyncIterator[StreamOpener]:
        from visiona_tunnel.yamux import open_session

        conn = await trio.open_tcp_stream(host, port)
        async with (
            wrap_client(conn, options) as transport,
            open_session(transport, client=True, config=_yamux_config(options)) as session,
        ):
            yield session

    @asynccontextmanager
    async def listen(
        listener: trio.SocketListener, options: TransportOptions
    ) -> AsyncIterator[StreamAccepter]:
        from visiona_tunnel.yamux import open_session

        conn = await listener.accept()
        async with (
            wrap_server(conn, options) as transport,
            open_session(transport, client=False, config=_yamux_config(options)) as session,
        ):
            yield session

    return Transport(name=name, description=description, dial=dial, listen=listen)


register_transport(
    Transport(
        name="tcp",
        description="raw trio TCP (one TCP connection per stream)",
        dial=_tcp_dial,
        listen=_tcp_listen,
    )
)
register_transport(yamux_transport("yamux", "visiona_tunnel.yamux over one trio TCP connection"))


@asynccontextmanager
async def websocket_client(
    conn: trio.SocketStream, options: TransportOptions
) -> AsyncIterator[trio.abc.Stream]:
    """Upgrade the dialed connection to a ``visiona_tunnel.wsconn.WebSocketStream``."""
    from visiona_tunnel.wsconn import client_handshake

    stream = await client_handshake(conn, "127.0.0.1", "/tunnel/connect")
    try:
        yield stream
    finally:
        await stream.aclose()


@asynccontextmanager
async def websocket_server(
    conn: trio.SocketStream, options: TransportOptions
) -> AsyncIterator[trio.abc.Stream]:
    from visiona_tunnel.wsconn import accept_websocket_stream

    stream = await accept_websocket_stream(conn)
    try:
        yield stream
    finally:
        await stream.aclose()


register_transport(
    yamux_transport(
        "yamux-ws",
        "visiona_tunnel.yamux over a visiona_tunnel.wsconn WebSocket",
        wrap_client=websocket_client,
        wrap_server=websocket_server,
    )
)


@asynccontextmanager
async def trio_websocket_client(
    conn: trio.SocketStream, options: TransportOptions
) -> AsyncIterator[trio.abc.Stream]:
    """The same over trio-websocket (64 KiB reads, 32 MiB messages), for comparison."""
    import trio_websocket

    from visiona_tunnel.trio_websocket_stream import TrioWebSocketStream
    from visiona_tunnel.wsconn import DEFAULT_MAX_MESSAGE_SIZE

    async with trio.open_nursery() as nursery:
        connection = await trio_websocket.wrap_client_stream(
            nursery,
            conn,
            "127.0.0.1",
            "/tunnel/connect",
            receive_buffer_size=65536,
            max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
        )
        try:
            yield TrioWebSocketStream(connection)
        finally:
            await connection.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def trio_websocket_server(
    conn: trio.SocketStream, options: TransportOptions
) -> AsyncIterator[trio.abc.Stream]:
    import trio_websocket

    from visiona_tunnel.trio_websocket_stream import TrioWebSocketStream
    from visiona_tunnel.wsconn import DEFAULT_MAX_MESSAGE_SIZE

    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(
            nursery, conn, receive_buffer_size=65536, max_message_size=DEFAULT_MAX_MESSAGE_SIZE
        )
        connection = await request.accept()
        try:
            yield TrioWebSocketStream(connection)
        finally:
            await connection.aclose()
            nursery.cancel_scope.cancel()


register_transport(
    yamux_transport(
        "yamux-tws",
        "visiona_tunnel.yamux over trio-websocket (TrioWebSocketStream)",
        wrap_client=trio_websocket_client,
        wrap_server=trio_websocket_server,
    )
)


class _WebSocketOpener(_TcpOpener):
    async def open_stream(self) -> trio.abc.HalfCloseableStream:  # type: ignore[override]
        from visiona_tunnel.wsconn import client_handshake

        conn = await super().open_stream()
        return _EofOnClose(await client_handshake(conn, "127.0.0.1", "/"))


class _WebSocketAccepter(_TcpAccepter):
    async def accept_stream(self) -> trio.abc.HalfCloseableStream:  # type: ignore[override]
        from visiona_tunnel.wsconn import accept_websocket_stream

        return _EofOnClose(await accept_websocket_stream(await super().accept_stream()))


class _EofOnClose(trio.abc.HalfCloseableStream):
    """A WebSocket has no half-close; the workloads' ``send_eof`` becomes a normal close."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def _ws_dial(host: str, port: int, options: TransportOptions) -> AsyncIterator[StreamOpener]:
    opener = _WebSocketOpener(host, port)
    try:
        yield opener
    finally:
        await _close_all(opener.streams)


@asynccontextmanager
async def _ws_listen(
    listener: trio.SocketListener, options: TransportOptions
) -> AsyncIterator[StreamAccepter]:
    accepter = _WebSocketAccepter(listener)
    try:
        yield accepter
    finally:
        await _close_all(accepter.streams)


register_transport(
    Transport(
        name="ws",
        description="visiona_tunnel.wsconn WebSocket per stream, no muxer (one-way workloads)",
        dial=_ws_dial,
        listen=_ws_listen,
    )
)


# --------------------------------------------------------------------------------------------
# Workload description shared by the orchestrator and the children
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    workload: str
    streams: int
    per_stream: int  # bytes per stream (bulk workloads); a multiple of ``chunk``
    chunk: int
    recv_size: int
    ping_count: int
    ping_warmup: int
    ping_size: int
    seed: int
    verify: str  # "ends" or "full"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls(**json.loads(text))

    @property
    def n_chunks(self) -> int:
        return self.per_stream // self.chunk

    @property
    def total_bytes(self) -> int:
        return self.per_stream * self.streams


class Blocks:
    """The payload: a random 'middle' chunk repeated, and per-stream unique first/last chunks."""

    def __init__(self, seed: int, chunk: int) -> None:
        self.seed = seed
        self.middle = random.Random(seed).randbytes(chunk)

    def _tag(self, kind: str, index: int, size: int) -> bytes:
        return hashlib.sha256(f"{self.seed}:{kind}:{index}".encode()).digest()[:size]

    def first(self, index: int) -> bytes:
        head = INDEX.pack(index) + self._tag("first", index, TAG_BYTES - INDEX.size)
        return head + self.middle[TAG_BYTES:]

    def last(self, index: int) -> bytes:
        return self.middle[:-TAG_BYTES] + self._tag("last", index, TAG_BYTES)

    def full_crc(self, index: int, n_chunks: int) -> int:
        crc = zlib.crc32(self.first(index))
        for _ in range(n_chunks - 2):
            crc = zlib.crc32(self.middle, crc)
        return zlib.crc32(self.last(index), crc)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def expect_eof(stream: trio.abc.ReceiveStream) -> None:
    data = await stream.receive_some()
    if data:
        raise AssertionError(f"expected EOF, got {len(data)} more bytes")


# --------------------------------------------------------------------------------------------
# Server (receiver / echoer)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _RecvState:
    first: float | None = None
    cpu0: float = 0.0
    last: float = 0.0
    bytes: int = 0
    seen: set[int] = dataclasses.field(default_factory=set)
    errors: list[str] = dataclasses.field(default_factory=list)


async def _recv_bulk_stream(
    stream: trio.abc.HalfCloseableStream,
    spec: RunSpec,
    expected: Mapping[int, tuple[int, int, int | None]],
    state: _RecvState,
) -> None:
    chunk = spec.chunk
    total = spec.per_stream
    tail_start = total - chunk
    full = spec.verify == "full"
    head = bytearray()
    tail = bytearray()
    crc = 0
    count = 0
    first: float | None = None
    last = 0.0
    receive = stream.receive_some
    size = spec.recv_size
    clock = time.perf_counter
    while True:
        data = await receive(size)
        if not data:
            break
        last = clock()
        if first is None:
            first = last
            if state.first is None:
                state.first = last
                state.cpu0 = time.process_time()
        end = count + len(data)
        if count < chunk:
            head += data[: chunk - count]
        if end > tail_start and count < total:
            tail += data[max(0, tail_start - count) : total - count]
        if full:
            crc = zlib.crc32(data, crc)
        count = end
    state.bytes += count
    state.last = max(state.last, last)

    index = INDEX.unpack_from(head)[0] if len(head) >= INDEX.size else -1
    crc_head = zlib.crc32(head)
    crc_tail = zlib.crc32(tail)
    problems = []
    if count != total:
        problems.append(f"received {count} bytes, expected {total}")
    if index not in expected:
        problems.append(f"bad stream index {index}")
    elif index in state.seen:
        problems.append(f"stream index {index} arrived twice")
    else:
        state.seen.add(index)
        exp_head, exp_tail, exp_full = expected[index]
        if crc_head != exp_head:
            problems.append("first-chunk CRC mismatch")
        if crc_tail != exp_tail:
            problems.append("last-chunk CRC mismatch")
        if full and crc != exp_full:
            problems.append("full-stream CRC mismatch")
    if problems:
        problem = f"stream index {index}: " + "; ".join(problems)
        state.errors.append(problem)
        # Also right away: if the session dies afterwards, this is the only trace left.
        print(f"INTEGRITY: {problem}", file=sys.stderr, flush=True)
    await stream.send_all(ACK.pack(max(index, 0), count, crc_head, crc_tail))
    await stream.aclose()


async def _server_bulk(accepter: StreamAccepter, spec: RunSpec) -> dict[str, Any]:
    blocks = Blocks(spec.seed, spec.chunk)
    expected = {
        i: (
            zlib.crc32(blocks.first(i)),
            zlib.crc32(blocks.last(i)),
            blocks.full_crc(i, spec.n_chunks) if spec.verify == "full" else None,
        )
        for i in range(spec.streams)
    }
    state = _RecvState()
    async with trio.open_nursery() as nursery:
        for _ in range(spec.streams):
            stream = await accepter.accept_stream()
            nursery.start_soon(_recv_bulk_stream, stream, spec, expected, state)
    end = time.perf_counter()
    cpu = time.process_time() - state.cpu0
    if state.first is None:
        state.errors.append("no data received")
        state.first = state.last = end
    if len(state.seen) != spec.streams and not state.errors:
        state.errors.append(f"only {len(state.seen)} of {spec.streams} stream indexes seen")
    elapsed = state.last - state.first
    return {
        "bytes": state.bytes,
        "elapsed_s": elapsed,
        "mb_s": state.bytes / elapsed / 1e6 if elapsed > 0 else None,
        "cpu_s": cpu,
        "cpu_wall_s": end - state.first,
        "errors": state.errors,
    }


async def _server_ping(accepter: StreamAccepter, spec: RunSpec) -> dict[str, Any]:
    stream = await accepter.accept_stream()
    size = spec.recv_size
    data = await stream.receive_some(size)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    count = 0
    while data:
        count += len(data)
        await stream.send_all(data)
        data = await stream.receive_some(size)
    t1 = time.perf_counter()
    cpu = time.process_time() - cpu0
    await stream.aclose()
    expected = (spec.ping_warmup + spec.ping_count) * spec.ping_size
    errors = [] if count == expected else [f"echoed {count} bytes, expected {expected}"]
    return {"bytes": count, "cpu_s": cpu, "cpu_wall_s": t1 - t0, "errors": errors}


# --------------------------------------------------------------------------------------------
# Client (sender / pinger)
# --------------------------------------------------------------------------------------------


async def _send_bulk_stream(
    stream: trio.abc.HalfCloseableStream, index: int, spec: RunSpec, blocks: Blocks
) -> list[str]:
    first = blocks.first(index)
    last = blocks.last(index)
    middle = blocks.middle
    send = stream.send_all
    await send(first)
    for _ in range(spec.n_chunks - 2):
        await send(middle)
    await send(last)
    await stream.send_eof()
    ack = ACK.unpack(await receive_exactly(stream, ACK.size))
    await expect_eof(stream)
    await stream.aclose()
    want = (index, spec.per_stream, zlib.crc32(first), zlib.crc32(last))
    return [] if ack == want else [f"stream {index}: ack {ack} != expected {want}"]


async def _client_bulk(opener: StreamOpener, spec: RunSpec) -> dict[str, Any]:
    blocks = Blocks(spec.seed, spec.chunk)
    streams = [await opener.open_stream() for _ in range(spec.streams)]
    errors: list[str] = []

    async def one(stream: trio.abc.HalfCloseableStream, index: int) -> None:
        errors.extend(await _send_bulk_stream(stream, index, spec, blocks))

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index, stream in enumerate(streams):
            nursery.start_soon(one, stream, index)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "bytes": spec.total_bytes,
        "elapsed_s": elapsed,
        "mb_s": spec.total_bytes / elapsed / 1e6,
        "cpu_s": cpu,
        "cpu_wall_s": elapsed,
        "errors": errors,
    }


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _client_ping(opener: StreamOpener, spec: RunSpec) -> dict[str, Any]:
    stream = await opener.open_stream()
    filler = random.Random(spec.seed).randbytes(spec.ping_size - INDEX.size)
    n = spec.ping_size
    rtts: list[int] = []
    errors: list[str] = []
    clock = time.perf_counter_ns
    cpu0 = 0.0
    t0 = 0.0
    for i in range(spec.ping_warmup + spec.ping_count):
        if i == spec.ping_warmup:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
        msg = INDEX.pack(i) + filler
        start = clock()
        await stream.send_all(msg)
        got = await receive_exactly(stream, n)
        rtt = clock() - start
        if got != msg:
            errors.append(f"echo {i} differs")
            break
        if i >= spec.ping_warmup:
            rtts.append(rtt)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await stream.send_eof()
    await expect_eof(stream)
    await stream.aclose()
    rtts.sort()
    return {
        "round_trips": len(rtts),
        "rtt_median_us": statistics.median(rtts) / 1000 if rtts else None,
        "rtt_p99_us": _percentile(rtts, 99) / 1000 if rtts else None,
        "rtt_min_us": rtts[0] / 1000 if rtts else None,
        "rtt_max_us": rtts[-1] / 1000 if rtts else None,
        "cpu_s": cpu,
        "cpu_wall_s": elapsed,
        "errors": errors,
    }


# --------------------------------------------------------------------------------------------
# Child process entry
# --------------------------------------------------------------------------------------------


def _dump_task_tree(out: TextIO) -> None:
    """Print every trio task and where it is waiting (for diagnosing hangs)."""

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        pad = "  " * depth
        print(f"{pad}task {task.name!r}", file=out)
        for frame, lineno in task.iter_await_frames():
            code = frame.f_code
            print(f"{pad}    {code.co_filename}:{lineno} in {code.co_name}", file=out)
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    out.flush()


async def _watchdog(seconds: float, role: str) -> None:
    await trio.sleep(seconds)
    print(f"WATCHDOG: {role} not finished after {seconds:.0f} s; trio tasks:", file=sys.stderr)
    _dump_task_tree(sys.stderr)
    print("END OF TASK DUMP", file=sys.stderr, flush=True)
    raise TimeoutError(f"{role}: watchdog fired after {seconds:.0f} s (see task dump above)")


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    spec = RunSpec.from_json(args.spec)
    options = TransportOptions(**json.loads(args.options))
    transport = TRANSPORTS[args.impl]
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watchdog, args.child_timeout, args.role)
        try:
            if args.role == "server":
                listener = (await trio.open_tcp_listeners(0, host=HOST))[0]
                port = listener.socket.getsockname()[1]
                print(f"PORT {port}", flush=True)
                async with listener, transport.listen(listener, options) as accepter:
                    if spec.workload == "ping":
                        out["result"] = await _server_ping(accepter, spec)
                    else:
                        out["result"] = await _server_bulk(accepter, spec)
            else:
                async with transport.dial(HOST, args.port, options) as opener:
                    if spec.workload == "ping":
                        out["result"] = await _client_ping(opener, spec)
                    else:
                        out["result"] = await _client_bulk(opener, spec)
        except Exception as exc:
            if "result" not in out:
                raise
            # The measurement finished; only closing the transport failed. Keep the number
            # but report the error.
            out["teardown_error"] = "".join(traceback.format_exception(exc))
        nursery.cancel_scope.cancel()
    return out


def _run_child(args: argparse.Namespace) -> int:
    for module in args.transport_module:
        importlib.import_module(module)

    def run() -> dict[str, Any]:
        return trio.run(_child, args)

    if not args.profile_out:
        out = run()
    elif args.profiler == "cprofile":
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        try:
            out = run()
        finally:
            profile.disable()
            profile.dump_stats(args.profile_out + ".pstats")
            with open(args.profile_out + ".txt", "w") as f:
                stats = pstats.Stats(profile, stream=f)
                stats.sort_stats("tottime").print_stats(40)
                stats.sort_stats("cumulative").print_stats(40)
    else:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
        try:
            out = run()
        finally:
            profiler.stop()
            Path(args.profile_out + ".txt").write_text(profiler.output_text(show_all=False))
            Path(args.profile_out + ".flat.txt").write_text(
                profiler.output_text(flat=True, flat_time="self")
            )
            Path(args.profile_out + ".html").write_text(profiler.output_html())
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------


def _make_spec(args: argparse.Namespace, workload: str, seed: int) -> RunSpec:
    chunk: int = args.chunk
    scale: float = args.size_scale

    def chunks_of(nbytes: float) -> int:
        return max(2, round(nbytes * scale / chunk)) * chunk

    if workload == "single":
        streams, per_stream = 1, chunks_of(GiB)
    elif workload == "multi":
        streams, per_stream = args.streams, chunks_of(16 * MiB)
    else:
        streams, per_stream = 1, 0
    return RunSpec(
        workload=workload,
        streams=streams,
        per_stream=per_stream,
        chunk=chunk,
        recv_size=args.recv_size,
        ping_count=max(100, round(10_000 * args.size_scale)),
        ping_warmup=200,
        ping_size=100,
        seed=seed,
        verify=args.verify,
    )


def _describe(spec: RunSpec) -> str:
    def size(n: int) -> str:
        for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if n >= factor:
                return f"{n / factor:g} {unit}"
        return f"{n} B"

    if spec.workload == "single":
        return f"single {size(spec.per_stream)}"
    if spec.workload == "multi":
        return f"multi {spec.streams} x {size(spec.per_stream)}"
    return f"ping {spec.ping_size} B x {spec.ping_count}"


def _child_cmd(
    args: argparse.Namespace, role: str, impl: str, spec: RunSpec, profile_out: str | None
) -> list[str]:
    options = TransportOptions(window=args.window, yamux_config=_parse_kv(args.yamux_config))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.stream_throughput",
        "--role",
        role,
        "--impl",
        impl,
        "--spec",
        spec.to_json(),
        "--options",
        json.dumps(dataclasses.asdict(options)),
        "--child-timeout",
        str(max(5.0, args.timeout - 5)),
        "--profiler",
        args.profiler,
    ]
    for module in args.transport_module:
        cmd += ["--transport-module", module]
    if profile_out:
        cmd += ["--profile-out", profile_out]
    return cmd


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


_EXCEPTION_LINE = re.compile(
    r"^[\s|+-]*("
    r"(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Reset|Closed|Timeout|Exhausted)\b.*"
    r"|WATCHDOG:.*|INTEGRITY:.*)$"
)


def task_dump(stderr: str) -> str:
    """The watchdog's trio task dump from a child's stderr ("" if it did not fire)."""
    start = stderr.find("WATCHDOG:")
    if start < 0:
        return ""
    end = stderr.find("END OF TASK DUMP", start)
    return stderr[start : end if end >= 0 else start + 20000].rstrip()


def exception_summary(stderr: str) -> list[str]:
    """The distinct exception (and watchdog/integrity) lines of a child's stderr, in order."""
    seen: dict[str, int] = {}
    for line in stderr.splitlines():
        match = _EXCEPTION_LINE.match(line)
        if match:
            key = match.group(1).strip()
            seen[key] = seen.get(key, 0) + 1
    return [f"{n}x {key}" if n > 1 else key for key, n in seen.items()]


def _result_line(path: Path) -> dict[str, Any] | None:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            parsed: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return parsed
    return None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_once(
    args: argparse.Namespace, impl: str, workload: str, round_no: int, workdir: Path
) -> dict[str, Any]:
    """One run: start a server and a client process, wait (bounded), collect their results."""
    seed = random.getrandbits(62)
    spec = _make_spec(args, workload, seed)
    tag = f"r{round_no}-{workload}-{impl}"
    record: dict[str, Any] = {
        "round": round_no,
        "workload": workload,
        "impl": impl,
        "spec": dataclasses.asdict(spec),
        "ok": False,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)

    def start(role: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
        out_path, err_path = workdir / f"{tag}-{role}.out", workdir / f"{tag}-{role}.err"
        prof = str(profile_dir / f"{tag}-{role}") if profile_dir else None
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                _child_cmd(args, role, impl, spec, prof) + extra,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
            )
        return proc, out_path, err_path

    deadline = time.monotonic() + args.timeout
    server, s_out, s_err = start("server", [])
    procs = [server]
    client: subprocess.Popen[bytes] | None = None
    c_out = c_err = workdir / "missing"
    error = None
    try:
        port = None
        while port is None and time.monotonic() < deadline and server.poll() is None:
            for line in s_out.read_text(errors="replace").splitlines():
                if line.startswith("PORT "):
                    port = int(line.split()[1])
            if port is None:
                time.sleep(0.01)
        if port is None:
            error = "server did not report its port"
        else:
            client, c_out, c_err = start("client", ["--port", str(port)])
            procs.append(client)
            # Wait for both; if one fails, give the other a short grace period.
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    deadline = min(deadline, time.monotonic() + 5)
                time.sleep(0.01)
            hung = [
                name
                for name, p in zip(("server", "client"), procs, strict=True)
                if p.poll() is None
            ]
            if hung:
                error = f"timeout after {args.timeout:.0f} s: {' and '.join(hung)} still running"
    finally:
        for proc in procs:
            _kill(proc)

    record["server_rc"] = server.returncode
    record["client_rc"] = client.returncode if client else None
    server_out = _result_line(s_out)
    client_out = _result_line(c_out) if client else None
    record["server"] = server_out.get("result") if server_out else None
    record["client"] = client_out.get("result") if client_out else None
    teardown = {
        role: out["teardown_error"]
        for role, out in (("server", server_out), ("client", client_out))
        if out and out.get("teardown_error")
    }
    if teardown:
        record["teardown_error"] = teardown
    errors = [
        f"{role}: {e}"
        for role, res in (("server", record["server"]), ("client", record["client"]))
        if res
        for e in res.get("errors", [])
    ]
    if error is None and (record["server"] is None or record["client"] is None):
        failed = [
            f"{role} exit code {p.returncode}"
            for role, p in (("server", server), ("client", client))
            if p is not None and p.returncode not in (0, None)
        ]
        error = "child process failed: " + (", ".join(failed) or "no result")
    if error is None and errors:
        error = "integrity check failed: " + "; ".join(errors[:5])
    if error is None:
        if workload == "ping":
            record["value"] = record["client"]["rtt_median_us"]
            record["p99"] = record["client"]["rtt_p99_us"]
        else:
            record["value"] = record["server"]["mb_s"]
            record["sender_mb_s"] = record["client"]["mb_s"]
        record["ok"] = record["value"] is not None
        for role, path in (("server", s_err), ("client", c_err)):
            text = path.read_text(errors="replace") if path.exists() else ""
            if text.strip():  # e.g. warnings: keep them, the run still counts
                record[f"{role}_stderr"] = text[-20000:]
    else:
        record["error"] = error
        for role, err_path in (("server", s_err), ("client", c_err if client else None)):
            text = err_path.read_text(errors="replace") if err_path and err_path.exists() else ""
            record[f"{role}_exceptions"] = exception_summary(text)
            record[f"{role}_stderr"] = text[-20000:]
            dump = task_dump(text)
            if dump:
                record[f"{role}_task_dump"] = dump
                record["error"] += f"; {role} HUNG (watchdog fired, task dump kept)"
    return record


def _fmt(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3g}x ({min(values):.3g}-{max(values):.3g})"


def summarize(
    runs: Sequence[dict[str, Any]], impls: Sequence[str], workloads: Sequence[str], baseline: str
) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    lines = [
        "| workload | impl | result: median (min-max) | runs ok "
        f"| same-round ratio vs {baseline} | CPU client / server: s (% of one core) |",
        "|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        unit = "us" if workload == "ping" else "MB/s"
        base = {r["round"]: r for r in runs if r["impl"] == baseline and r["workload"] == workload}
        for impl in impls:
            mine = [r for r in runs if r["impl"] == impl and r["workload"] == workload]
            ok = [r for r in mine if r["ok"]]
            row: dict[str, Any] = {"workload": workload, "impl": impl, "unit": unit}
            row["runs"], row["runs_ok"] = len(mine), len(ok)
            label = _describe(RunSpec(**mine[0]["spec"])) if mine else workload
            if ok:
                values = [r["value"] for r in ok]
                row["median"], row["min"], row["max"] = (
                    statistics.median(values),
                    min(values),
                    max(values),
                )
                result = (
                    f"**{_fmt(row['median'], unit)} {unit}** "
                    f"({_fmt(row['min'], unit)}-{_fmt(row['max'], unit)})"
                )
                if workload == "ping":
                    row["p99_median"] = statistics.median(r["p99"] for r in ok)
                    result += f"; p99 {_fmt(row['p99_median'], unit)} us"
                cpu_parts = []
                for role in ("client", "server"):
                    cpu = statistics.median(r[role]["cpu_s"] for r in ok)
                    pct = statistics.median(
                        100 * r[role]["cpu_s"] / r[role]["cpu_wall_s"]
                        for r in ok
                        if r[role]["cpu_wall_s"] > 0
                    )
                    row[f"{role}_cpu_s"], row[f"{role}_cpu_pct"] = cpu, pct
                    cpu_parts.append(f"{cpu:.2f} s ({pct:.0f}%)")
                cpu_text = " / ".join(cpu_parts)
            else:
                result, cpu_text = "**failed**", "-"
            ratios = [
                r["value"] / base[r["round"]]["value"]
                for r in ok
                if r["round"] in base and base[r["round"]]["ok"] and base[r["round"]]["value"]
            ]
            if impl == baseline:
                ratio_text = "(baseline)"
            elif ratios:
                row["ratio_median"] = statistics.median(ratios)
                row["ratios"] = ratios
                what = "RTT " if workload == "ping" else ""
                ratio_text = f"{what}{_ratio(ratios)} [{len(ratios)} rounds]"
            else:
                ratio_text = "-"
            rows.append(row)
            lines.append(
                f"| {label} | {impl} | {result} | {len(ok)}/{len(mine)} | {ratio_text} "
                f"| {cpu_text} |"
            )
    return rows, "\n".join(lines)


def _orchestrate(args: argparse.Namespace) -> int:
    for module in args.transport_module:
        importlib.import_module(module)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    workloads = [s.strip() for s in args.workloads.split(",") if s.strip()]
    unknown = [i for i in impls if i not in TRANSPORTS] + [
        w for w in workloads if w not in WORKLOADS
    ]
    if unknown:
        print(f"unknown impl/workload: {unknown}; impls: {sorted(TRANSPORTS)}", file=sys.stderr)
        return 2
    if args.chunk < 2 * TAG_BYTES:
        print("--chunk is too small", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    print(
        f"# stream_throughput: {started}, python {platform.python_version()}, "
        f"trio {trio.__version__}, {os.cpu_count()} CPUs; impls {impls}, workloads "
        f"{workloads}, {args.rounds} rounds, chunk {args.chunk}, recv {args.recv_size}, "
        f"yamux window {args.window}, size-scale {args.size_scale}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            workdir = Path(args.log_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench.")))
        for round_no in range(1, args.rounds + 1):
            for workload in workloads:
                shift = (round_no - 1) % len(impls)
                for impl in impls[shift:] + impls[:shift]:
                    record = run_once(args, impl, workload, round_no, workdir)
                    runs.append(record)
                    _print_run(record)
    rows, table = summarize(runs, impls, workloads, args.baseline)
    print()
    print(table)
    if args.json:
        meta = {
            "started": started,
            "argv": sys.argv,
            "args": vars(args),
            "python": platform.python_version(),
            "trio": trio.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        }
        doc = {"meta": meta, "summary": rows, "table": table, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"\nraw results: {args.json}")
    return 0 if all(r["ok"] for r in runs) else 1


def _print_run(record: dict[str, Any]) -> None:
    head = f"[round {record['round']}] {record['workload']:<6} {record['impl']:<8}"
    if record["ok"]:
        if record["workload"] == "ping":
            text = f"median RTT {record['value']:.1f} us, p99 {record['p99']:.1f} us"
        else:
            text = (
                f"{record['value']:.1f} MB/s (sender side {record['sender_mb_s']:.1f}; "
                f"{record['server']['bytes']} bytes)"
            )
        cpu = " / ".join(
            f"{record[role]['cpu_s']:.2f}" for role in ("client", "server") if record[role]
        )
        print(f"{head} {text}; CPU cli/srv {cpu} s", flush=True)
    else:
        print(f"{head} FAILED: {record['error']}", flush=True)
        for role in ("server", "client"):
            dump = record.get(f"{role}_task_dump")
            if dump:
                print("    " + dump[:4000].replace("\n", "\n    "), flush=True)
            summary = record.get(f"{role}_exceptions") or []
            if summary:
                print(f"    {role} stderr, distinct exception lines (first first):", flush=True)
                for line in summary[:12]:
                    print(f"      {line}", flush=True)
            elif record.get(f"{role}_stderr", "").strip():
                tail = record[f"{role}_stderr"].strip()[-1500:]
                print(f"    --- {role} stderr (tail) ---", flush=True)
                print("    " + tail.replace("\n", "\n    "), flush=True)
    if record["ok"]:
        for role in ("server", "client"):
            noise = record.get(f"{role}_stderr", "").strip()
            if noise:
                first = noise.splitlines()[0][:200]
                print(f"    note: {role} wrote to stderr ({len(noise)} chars): {first}", flush=True)
    for role, text in record.get("teardown_error", {}).items():
        last = text.strip().splitlines()[-1] if text.strip() else ""
        print(f"    note: {role} teardown raised after the measurement: {last}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Loopback stream throughput/latency: raw trio TCP vs visiona_tunnel.yamux.",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="single,multi,ping")
    p.add_argument("--impls", default="tcp,yamux", help="comma list of registered transports")
    p.add_argument("--baseline", default="tcp", help="impl the same-round ratios divide by")
    p.add_argument("--size-scale", type=float, default=1.0, help="scale sizes/counts (0.1=quick)")
    p.add_argument("--window", type=int, default=256 * KiB, help="yamux max_stream_window_size")
    p.add_argument(
        "--yamux-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra yamux Config field (VALUE parsed as JSON if possible); repeatable",
    )
    p.add_argument("--chunk", type=int, default=256 * KiB, help="send_all size for bulk data")
    p.add_argument("--recv-size", type=int, default=256 * KiB, help="receive_some max_bytes")
    p.add_argument("--streams", type=int, default=64, help="streams in the multi workload")
    p.add_argument("--verify", choices=("ends", "full"), default="ends")
    p.add_argument("--timeout", type=float, default=120.0, help="per-run limit in seconds")
    p.add_argument("--json", metavar="PATH", help="write raw results here")
    p.add_argument("--log-dir", metavar="DIR", help="keep every child's stdout/stderr here")
    p.add_argument("--profile", metavar="DIR", help="profile both child processes into DIR")
    p.add_argument("--profiler", choices=("pyinstrument", "cprofile"), default="pyinstrument")
    p.add_argument(
        "--transport-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it may register_transport() more transports); repeatable",
    )
    # Internal: the child processes.
    p.add_argument("--role", choices=("orchestrator", "server", "client"), default="orchestrator")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-timeout", type=float, default=115.0, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "orchestrator":
        return _orchestrate(args)
    return _run_child(args)


if __name__ == "__main__":
    # One registry even when run as a script: `--transport-module`s import this module by name.
    sys.modules.setdefault("benchmarks.stream_throughput", sys.modules[__name__])
    sys.exit(main())
