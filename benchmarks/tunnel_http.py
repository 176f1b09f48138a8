"""HTTP through the tunnel chain: direct vs our relay/agent vs the Go relay/agent (loopback).

Run it (from the repository root)::

    .venv/bin/python benchmarks/tunnel_http.py                         # 3 rounds, everything
    .venv/bin/python benchmarks/tunnel_http.py --size-scale 0.05 --rounds 1   # quick look
    .venv/bin/python benchmarks/tunnel_http.py --chains direct,py-relay+py-agent \\
        --workloads download --json /tmp/tunnel.json --log-dir /tmp/tunnel-logs
    .venv/bin/python benchmarks/tunnel_http.py --chains api     # the api-server's hop:
    # direct,proxy+py-agent,api+py-agent,proxy+go-agent,api+go-agent

Parties and chains
------------------
Every party is its own process, everything on 127.0.0.1:

* **server**: the local HTTP server the agent forwards to (this module, ``--role server``,
  trio + h11, keep-alive): ``GET /small`` (100-byte body, Content-Length),
  ``GET /bytes/N`` (N bytes with Content-Length, written in 256 KiB chunks) and
  ``POST /sink`` (reads the body, answers its length as text).
* **agent**: ``python -m visiona_tunnel.agent`` (py-agent) or the Go ``goagent``: with
  64 KiB WebSocket buffers (go-agent), or with gorilla's default 4 KiB ones like the seed's
  agent (seed-agent: every message over 4 KiB goes out as 4 KiB frames).
* **relay**: this module's ``--role pyrelay`` (``serve_tunnel_listener`` + ``TunnelRegistry``)
  or the Go ``gorelay``.
* **proxy**: the remote-proxy service, ``python -m visiona_services.remote_proxy``, configured
  by environment (tunnel and internal listeners on free ports of 127.0.0.1, picked by binding
  port 0 first; a random internal secret; ``VISIONA_PROXY_STATIC_TOKENS`` with the bench
  token; ``VISIONA_LOG_LEVEL=warning``); in the ``api+`` chains with
  ``VISIONA_API_INTERNAL_URL`` instead (device tokens verified by the api-server).
* **api**: the api-server, ``python -m visiona_services.api_server`` (``VISIONA_ENV=dev``,
  SQLite in a fresh ``VISIONA_DATA_DIR`` per run, its own free port, the proxy's internal URL
  and tunnel URL, a shared internal secret, ``VISIONA_FORWARD_PREFIXES=/small,/bytes/,/sink``
  so that the server's routes are forwarded at the same paths, ``VISIONA_LOG_LEVEL=warning``).
* **idp**: the dev identity provider the api-server logs users in with,
  ``node devidp/provider.mjs`` (``make devidp``) on a free port; idle while measured.
* **load**: where the requests come from.

Chains (``--chains``):

* ``direct``: load (``--role load``: trio + h11 client) -> server.
* ``hypercorn``: load -> hypercorn (``--role front``) with the remote-proxy's internal
  listener settings, answering the same routes itself from a raw ASGI app: the proxy's
  HTTP front with no tunnel behind it, an upper bound for the ``proxy+`` chains.
* ``py-relay+py-agent``, ``py-relay+go-agent``: the load runs **inside the Python relay
  process**, calling ``Tunnel.request`` (as the remote proxy will) -> agent -> server.
* ``go-relay+go-agent``, ``go-relay+py-agent``: load (h11 client) -> gorelay's HTTP front
  ``/forward/<device>/<path>`` -> agent -> server.
* ``proxy+py-agent``, ``proxy+go-agent``: load (h11 client, ``Authorization: Bearer
  <secret>``) -> the proxy's internal API ``/internal/forward/<device>/<path>`` (hypercorn,
  streamed both ways) -> agent (connected to the proxy's tunnel listener with the static
  token) -> server. The load starts once ``GET /internal/sessions/<device>`` answers 200.
* ``api+py-agent``, ``api+go-agent``: the browser's way. load (h11 client with the bench
  user's session cookie, and ``X-CSRF: 1`` on the POST) -> the api-server's forwarded paths
  ``/small``, ``/bytes/N``, ``/sink`` (hypercorn, raw ASGI forward) -> the proxy's
  ``/internal/forward/<device>/...`` -> agent -> server. Before the load, the orchestrator
  logs the user ``bench`` in at the provider headlessly (``examples.devbrowser``), asks for
  a pairing token (``POST /api/pairing/token``) and trades it at the exchange as an agent
  does (``visiona_tunnel.pairing.pair_device``); the agent dials the ``relay_url`` with the
  ``device_token`` it got, and the load starts once the proxy has the device's session.
  The column "vs proxy+<agent>" is the ratio to the ``proxy+`` chain with the same agent,
  in the same round: what the api-server's hop costs.

* ``gohop+py-agent``, ``gohop+go-agent``: the ``proxy+`` chain with one more HTTP hop in
  front of the proxy's internal API, written in Go (``gohop``: ``httputil.ReverseProxy``,
  keep-alive upstream, bodies streamed). A yardstick for the api-server's hop: what one
  more process in the chain costs on this machine with no Python in it. The column
  "vs proxy+<agent>" is filled in for these chains too.

``--chains api`` is the preset ``direct,proxy+py-agent,api+py-agent,proxy+go-agent,
api+go-agent``; ``--chains hop`` the api chains and the gohop chains beside the proxy
chains (``all``, the default: every chain).

Each (round, workload, chain) is one *run* with fresh processes. Runs are interleaved
round-robin (every round runs every workload on every chain, the chain order rotating each
round), and ratios are taken between runs of the *same round* (the machine is shared).

Workloads (``--workloads``)
---------------------------
* ``small``: requests/s for ``GET /small``; ``--concurrency`` (32) workers, each with its
  own keep-alive connection (h11 client; through the Python relay: one ``Tunnel.request``
  per request), share ``--requests`` (5000) requests. Each worker first makes
  ``--warmup`` (3) untimed requests. Latency p50/p99 per request is kept too.
* ``download``: MB/s (10^6 bytes/s) of one ``GET /bytes/N``, N = 256 MiB, from sending the
  request to the end of the response (the figure from the first body byte is in the JSON).
* ``upload``: MB/s of one ``POST /sink`` of 256 MiB (Content-Length, 256 KiB writes), from
  the first byte sent to the end of the response.

``--size-scale`` scales the byte counts and the request count (0.05 for a quick run).
Before the bulk workloads one untimed ``GET /small`` goes through the chain.

Integrity (cheap): every status must be 200; ``/small`` bodies must be the exact 100 bytes;
downloads must deliver exactly N bytes; an upload's answer must be N. A failed check makes
the run fail (it is never reported as a number).

CPU
---
The load process reads ``/proc/<pid>/stat`` (user + system time, all threads) of every
party just before and after its timed section; the table shows each party's CPU as % of one
core over that section (the clock ticks at 10 ms, so short runs are coarse). In the
py-relay chains the relay and the load are one process (``relay+load``). ``others`` is the
rest of the machine's busy time meanwhile (other jobs; /proc/stat), to spot interference:
the machine has 2 cores, so the parties plus ``others`` add up to at most 200%.
The ``api+`` chains list ``api`` and ``idp`` too, the ``gohop+`` chains ``hop``.

Failures and hangs
------------------
Every run has a hard limit (``--timeout``, 120 s): a few seconds before it, a watchdog in
each Python child prints the trio task tree and exits; the orchestrator then stops every
party (SIGTERM, SIGKILL after 3 s). A failed run prints the distinct exception lines of
every party's stderr; ``--log-dir DIR`` keeps every party's stdout/stderr, ``--json PATH``
every run's record.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import importlib
import importlib.metadata
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import h11
import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make visiona_tunnel and tests importable
    sys.path.insert(0, str(ROOT))

from benchmarks.procstat import cpu_seconds, machine_busy_seconds  # noqa: E402
from benchmarks.stream_throughput import (  # noqa: E402
    _dump_task_tree,
    _percentile,
    _result_line,
    _watchdog,
    exception_summary,
    task_dump,
)
from visiona_tunnel.listener import admit_with, serve_tunnel_listener  # noqa: E402
from visiona_tunnel.pairing import PairingResult, pair_device  # noqa: E402
from visiona_tunnel.relay import Tunnel, TunnelRegistry  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

HOST = "127.0.0.1"
CHAINS = (
    "direct",
    "hypercorn",
    "py-relay+py-agent",
    "py-relay+go-agent",
    "go-relay+go-agent",
    "go-relay+py-agent",
    "proxy+py-agent",
    "proxy+go-agent",
    "api+py-agent",
    "api+go-agent",
    "proxy+seed-agent",
    "go-relay+seed-agent",
    "py-relay+seed-agent",
    "gohop+py-agent",
    "gohop+go-agent",
)
#: ``--chains`` names for lists of chains.
PRESETS: dict[str, tuple[str, ...]] = {
    "all": CHAINS,
    "api": ("direct", "proxy+py-agent", "api+py-agent", "proxy+go-agent", "api+go-agent"),
    # The api-server's hop beside a Go reverse proxy's in the same place.
    "hop": (
        "proxy+py-agent",
        "api+py-agent",
        "gohop+py-agent",
        "proxy+go-agent",
        "api+go-agent",
        "gohop+go-agent",
    ),
    # The agents in the field: the seed's, gorilla's 4 KiB buffers (issue 14).
    "seed": ("go-relay+seed-agent", "proxy+seed-agent", "go-relay+go-agent", "proxy+go-agent"),
}
WORKLOADS = ("small", "download", "upload")
BASELINES = ("direct", "go-relay+go-agent", "go-relay+seed-agent")
TOKEN = "bench-token"
#: The load's environment variable with the remote-proxy's internal secret (proxy chains).
BEARER_ENV = "TUNNEL_HTTP_BEARER"
#: The load's environment variable with the bench user's session cookie (api chains).
SESSION_ENV = "TUNNEL_HTTP_SESSION"
#: The user the api chains log in, and the paths the api-server forwards to the server.
API_USER = "bench"
API_FORWARD_PREFIXES = "/small,/bytes/,/sink"
DEVIDP_DIR = ROOT / "devidp"
#: The dev provider's ready line (``oidc-provider listening on <issuer>``).
IDP_READY = "oidc-provider listening on "
SESSION_COOKIE = "visiona_session"
DEVICE = "bench-device"
#: The body of ``GET /small``.
SMALL_BODY = (b"0123456789abcdef" * 7)[:100]
#: Size of the writes of a download (server) and an upload (load).
CHUNK = 256 * KiB
#: ``receive_some`` size of the server and the h11 client.
RECV_SIZE = 256 * KiB
#: How long a stopped party gets between SIGTERM and SIGKILL.
STOP_GRACE = 3.0
H11_VERSION = importlib.metadata.version("h11")


# --------------------------------------------------------------------------------------------
# What a run does (shared by the orchestrator and the children)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    workload: str
    requests: int  # small: timed requests
    concurrency: int  # small: workers
    warmup: int  # small: untimed requests per worker
    size: int  # download / upload: bytes
    seed: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls(**json.loads(text))


def payload(seed: int) -> bytes:
    """The 256 KiB block that downloads and uploads repeat."""
    return random.Random(seed).randbytes(CHUNK)


def iter_chunks(total: int, block: bytes) -> Iterator[bytes]:
    """``total`` bytes as repeats of ``block`` (the last one cut short)."""
    full, rest = divmod(total, len(block))
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


async def aiter_chunks(total: int, block: bytes) -> AsyncIterator[bytes]:
    for chunk in iter_chunks(total, block):
        yield chunk


async def next_event(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> h11.Event:
    """The next h11 event, reading from ``stream`` as needed (EOF is passed to h11)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECV_SIZE)))
            continue
        if not isinstance(event, h11.Event):  # PAUSED
            raise h11.LocalProtocolError(f"unexpected h11 state {event!r}")
        return event


async def send_events(
    conn: h11.Connection, stream: trio.abc.SendStream, *events: h11.Event
) -> None:
    """Send ``events``; body data is passed through without a copy."""
    for event in events:
        for piece in conn.send_with_data_passthrough(event) or ():
            if piece:
                await stream.send_all(piece)


# --------------------------------------------------------------------------------------------
# The local HTTP server (--role server)
# --------------------------------------------------------------------------------------------


def _plain(conn: h11.Connection, status: int, body: bytes) -> bytes:
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    parts = [
        conn.send(h11.Response(status_code=status, headers=headers)),
        conn.send(h11.Data(data=body)) if body else b"",
        conn.send(h11.EndOfMessage()),
    ]
    return b"".join(part or b"" for part in parts)


async def _serve_request(
    conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, block: bytes
) -> None:
    method, target = request.method, request.target
    received = 0
    while not isinstance(event := await next_event(conn, stream), h11.EndOfMessage):
        if not isinstance(event, h11.Data):
            raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")
        received += len(event.data)
    if method == b"GET" and target == b"/small":
        await stream.send_all(_plain(conn, 200, SMALL_BODY))
    elif method == b"GET" and target.startswith(b"/bytes/") and target[7:].isdigit():
        size = int(target[7:])
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        await send_events(conn, stream, h11.Response(status_code=200, headers=headers))
        for chunk in iter_chunks(size, block):
            await send_events(conn, stream, h11.Data(data=chunk))
        await send_events(conn, stream, h11.EndOfMessage())
    elif method == b"POST" and target == b"/sink":
        await stream.send_all(_plain(conn, 200, str(received).encode()))
    else:
        await stream.send_all(_plain(conn, 404, b"not found\n"))


async def _serve_connection(block: bytes, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await next_event(conn, stream)
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise h11.RemoteProtocolError(f"unexpected {event!r}")
            await _serve_request(conn, stream, event, block)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _run_server(spec: RunSpec) -> None:
    async with trio.open_nursery() as nursery:
        handler = partial(_serve_connection, payload(spec.seed))
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)


# --------------------------------------------------------------------------------------------
# The proxy's HTTP front alone (--role front): hypercorn, the internal listener's settings
# --------------------------------------------------------------------------------------------


def _front_app(block: bytes) -> Callable[..., Any]:
    """A raw ASGI app with the server's routes, answered from memory."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]  # lifespan.startup / lifespan.shutdown
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.shutdown":
                    return
        received, more = 0, True
        while more:
            message = await receive()
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        method, path = scope["method"], scope["path"]
        size = int(path[7:]) if path.startswith("/bytes/") and path[7:].isdigit() else None
        if method == "GET" and path == "/small":
            status, body = 200, SMALL_BODY
        elif method == "GET" and size is not None:
            length = str(size).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/octet-stream"),
                        (b"content-length", length),
                    ],
                }
            )
            for chunk in iter_chunks(size, block):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        elif method == "POST" and path == "/sink":
            status, body = 200, str(received).encode()
        else:
            status, body = 404, b"not found\n"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def _run_front(spec: RunSpec) -> None:
    import hypercorn.trio

    from visiona_services.remote_proxy.config import ProxyConfig
    from visiona_services.remote_proxy.internal_app import internal_hypercorn_config

    config = ProxyConfig(internal_host=HOST, internal_port=0)
    hyper = internal_hypercorn_config(config)
    async with trio.open_nursery() as nursery:
        serve = partial(hypercorn.trio.serve, _front_app(payload(spec.seed)), hyper)
        urls: list[str] = await nursery.start(serve)
        print(f"PORT {urls[0].rsplit(':', 1)[1]}", flush=True)


# --------------------------------------------------------------------------------------------
# Load: requesters
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    size: int  # body bytes received
    head: bytes  # the first ``keep`` bytes of the body
    first_byte: float | None  # perf_counter() when the first body byte arrived


class Requester(Protocol):
    async def exchange(self, method: str, target: str, *, upload: int = 0, keep: int = 0) -> Reply:
        """One request (``upload`` > 0: POST body of that many bytes); the whole response."""
        ...

    async def aclose(self) -> None: ...


class H11Requester:
    """One keep-alive HTTP/1.1 connection (reopened if the server ends it); every request
    carries ``extra_headers``, a POST ``post_headers`` too."""

    def __init__(
        self,
        port: int,
        prefix: str,
        block: bytes,
        extra_headers: Sequence[tuple[str, str]] = (),
        post_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.port = port
        self.prefix = prefix
        self.block = block
        self.host = f"{HOST}:{port}"
        self.extra_headers = list(extra_headers)
        self.post_headers = list(post_headers)
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.connections = 0

    async def exchange(self, method: str, target: str, *, upload: int = 0, keep: int = 0) -> Reply:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(HOST, self.port)
            self.conn = h11.Connection(h11.CLIENT)
            self.connections += 1
        stream, conn = self.stream, self.conn
        headers = [("Host", self.host), *self.extra_headers]
        if method == "POST":
            headers += [*self.post_headers, ("Content-Length", str(upload))]
        request = h11.Request(method=method, target=self.prefix + target, headers=headers)
        await send_events(conn, stream, request)
        for chunk in iter_chunks(upload, self.block):
            await send_events(conn, stream, h11.Data(data=chunk))
        await send_events(conn, stream, h11.EndOfMessage())
        status, size, head, first = 0, 0, bytearray(), None
        while True:
            event = await next_event(conn, stream)
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if first is None:
                    first = time.perf_counter()
                size += len(event.data)
                if len(head) < keep:
                    head += event.data[: keep - len(head)]
            elif isinstance(event, h11.EndOfMessage):
                break
            elif not isinstance(event, h11.InformationalResponse):
                raise RuntimeError(f"unexpected {event!r} in the response")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return Reply(status, size, bytes(head), first)

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await trio.aclose_forcefully(stream)


class TunnelRequester:
    """Requests through ``Tunnel.request`` (one yamux stream each), in the relay."""

    def __init__(self, tunnel: Tunnel, block: bytes) -> None:
        self.tunnel = tunnel
        self.block = block

    async def exchange(self, method: str, target: str, *, upload: int = 0, keep: int = 0) -> Reply:
        if method == "POST":
            request = self.tunnel.request(
                method,
                target,
                [("Content-Length", str(upload))],
                aiter_chunks(upload, self.block),
            )
        else:
            request = self.tunnel.request(method, target)
        size, head, first = 0, bytearray(), None
        async with request as response:
            async for data in response.body:
                if first is None:
                    first = time.perf_counter()
                size += len(data)
                if len(head) < keep:
                    head += data[: keep - len(head)]
        return Reply(response.status, size, bytes(head), first)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


# --------------------------------------------------------------------------------------------
# Load: CPU of the parties
# --------------------------------------------------------------------------------------------

MACHINE = "(machine)"


def cpu_snapshot(parties: Mapping[str, int]) -> dict[str, float | None]:
    """CPU seconds so far of each party, and of the whole machine (key ``MACHINE``)."""
    snapshot = {name: cpu_seconds(pid) for name, pid in parties.items()}
    snapshot[MACHINE] = machine_busy_seconds()
    return snapshot


def cpu_usage(
    before: Mapping[str, float | None], after: Mapping[str, float | None], wall: float
) -> dict[str, dict[str, float]]:
    """Per party: CPU seconds over the timed section and % of one core; ``others``: what
    the rest of the machine used meanwhile (other jobs, kernel threads)."""
    out: dict[str, dict[str, float]] = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            used = end - start
            out[name] = {"cpu_s": used, "pct": 100 * used / wall if wall > 0 else 0.0}
    machine = out.pop(MACHINE, None)
    if machine is not None:
        used = max(0.0, machine["cpu_s"] - sum(v["cpu_s"] for v in out.values()))
        out["others"] = {"cpu_s": used, "pct": 100 * used / wall if wall > 0 else 0.0}
    return out


async def wait_for_pids(path: str, own: Mapping[str, int]) -> dict[str, int]:
    """The other parties' pids, written by the orchestrator once they are all started."""
    pids_file = trio.Path(path)
    while True:
        if await pids_file.exists():
            break
        await trio.sleep(0.01)
    parties = {k: int(v) for k, v in json.loads(await pids_file.read_text()).items()}
    parties.update(own)
    return parties


# --------------------------------------------------------------------------------------------
# Load: workloads
# --------------------------------------------------------------------------------------------


def _check(reply: Reply, what: str, size: int | None, head: bytes | None) -> list[str]:
    errors = []
    if reply.status != 200:
        errors.append(f"{what}: status {reply.status}")
    if size is not None and reply.size != size:
        errors.append(f"{what}: {reply.size} body bytes, expected {size}")
    if head is not None and reply.head != head:
        errors.append(f"{what}: body {reply.head[:40]!r} differs from the expected one")
    return errors


async def _small(
    make: Callable[[], Requester], spec: RunSpec, parties: Mapping[str, int]
) -> dict[str, Any]:
    clients = [make() for _ in range(spec.concurrency)]
    errors: list[str] = []
    keep = len(SMALL_BODY) + 1

    async def warm(client: Requester) -> None:
        for _ in range(spec.warmup):
            reply = await client.exchange("GET", "/small", keep=keep)
            errors.extend(_check(reply, "warm-up GET /small", len(SMALL_BODY), SMALL_BODY))

    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(warm, client)

    remaining = spec.requests
    latencies: list[int] = []
    clock = time.perf_counter_ns

    async def worker(client: Requester) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = clock()
            reply = await client.exchange("GET", "/small", keep=keep)
            latencies.append(clock() - start)
            if reply.status != 200 or reply.head != SMALL_BODY or reply.size != len(SMALL_BODY):
                errors.extend(_check(reply, "GET /small", len(SMALL_BODY), SMALL_BODY))

    cpu0 = cpu_snapshot(parties)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(worker, client)
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_snapshot(parties)
    for client in clients:
        await client.aclose()
    latencies.sort()
    return {
        "value": len(latencies) / elapsed,
        "unit": "req/s",
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "latency_p50_ms": _percentile(latencies, 50) / 1e6 if latencies else None,
        "latency_p99_ms": _percentile(latencies, 99) / 1e6 if latencies else None,
        "latency_max_ms": latencies[-1] / 1e6 if latencies else None,
        "connections": sum(getattr(c, "connections", 0) for c in clients),
        "cpu": cpu_usage(cpu0, cpu1, elapsed),
        "errors": errors[:20],
    }


async def _bulk(
    make: Callable[[], Requester], spec: RunSpec, parties: Mapping[str, int]
) -> dict[str, Any]:
    client = make()
    errors = _check(
        await client.exchange("GET", "/small", keep=len(SMALL_BODY) + 1),
        "warm-up GET /small",
        len(SMALL_BODY),
        SMALL_BODY,
    )
    cpu0 = cpu_snapshot(parties)
    t0 = time.perf_counter()
    if spec.workload == "download":
        reply = await client.exchange("GET", f"/bytes/{spec.size}")
        elapsed = time.perf_counter() - t0
        errors += _check(reply, f"GET /bytes/{spec.size}", spec.size, None)
    else:
        answer = str(spec.size).encode()
        reply = await client.exchange("POST", "/sink", upload=spec.size, keep=len(answer) + 1)
        elapsed = time.perf_counter() - t0
        errors += _check(reply, f"POST /sink ({spec.size} bytes)", len(answer), answer)
    cpu1 = cpu_snapshot(parties)
    await client.aclose()
    out: dict[str, Any] = {
        "value": spec.size / elapsed / 1e6,
        "unit": "MB/s",
        "bytes": spec.size,
        "elapsed_s": elapsed,
        "cpu": cpu_usage(cpu0, cpu1, elapsed),
        "errors": errors,
    }
    if spec.workload == "download" and reply.first_byte is not None:
        body_time = t0 + elapsed - reply.first_byte
        out["first_byte_s"] = reply.first_byte - t0
        out["body_mb_s"] = spec.size / body_time / 1e6 if body_time > 0 else None
    return out


async def run_workload(
    make: Callable[[], Requester], spec: RunSpec, parties: Mapping[str, int]
) -> dict[str, Any]:
    if spec.workload == "small":
        return await _small(make, spec, parties)
    return await _bulk(make, spec, parties)


# --------------------------------------------------------------------------------------------
# Child process entry
# --------------------------------------------------------------------------------------------


async def _load(args: argparse.Namespace, spec: RunSpec) -> dict[str, Any]:
    parties = await wait_for_pids(args.pids_file, {"load": os.getpid()})
    block = payload(spec.seed)
    # The remote-proxy's internal API wants its secret, the api-server a session (passed
    # by environment, not argv).
    secret = os.environ.get(BEARER_ENV)
    session = os.environ.get(SESSION_ENV)
    extra = [("Authorization", f"Bearer {secret}")] if secret else []
    post: list[tuple[str, str]] = []
    if session:
        extra.append(("Cookie", f"{SESSION_COOKIE}={session}"))
        post.append(("X-CSRF", "1"))  # as the browser sends it on unsafe methods
    return await run_workload(
        lambda: H11Requester(args.port, args.prefix, block, extra, post), spec, parties
    )


async def _pyrelay(args: argparse.Namespace, spec: RunSpec) -> dict[str, Any]:
    async def verify_token(token: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return DEVICE if token == TOKEN else None

    registry = TunnelRegistry()
    async with trio.open_nursery() as nursery:
        admit = admit_with(verify_token)
        serve = partial(serve_tunnel_listener, registry, admit, host=HOST, port=0)
        urls: list[str] = await nursery.start(serve)
        print(f"TUNNEL PORT {urls[0].rsplit(':', 1)[1]}", flush=True)
        tunnel = await registry.wait_for(DEVICE)
        print("AGENT CONNECTED", flush=True)
        parties = await wait_for_pids(args.pids_file, {"relay+load": os.getpid()})
        block = payload(spec.seed)
        result = await run_workload(lambda: TunnelRequester(tunnel, block), spec, parties)
        nursery.cancel_scope.cancel()
    return result


async def _dump_after(seconds: float, role: str) -> None:
    """The server's watchdog: it serves until it is killed, so it only shows its tasks."""
    await trio.sleep(seconds)
    print(f"WATCHDOG: {role} task dump at {seconds:.0f} s (not a failure):", file=sys.stderr)
    _dump_task_tree(sys.stderr)
    print("END OF TASK DUMP", file=sys.stderr, flush=True)


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    spec = RunSpec.from_json(args.spec)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        if args.role in ("server", "front"):
            nursery.start_soon(_dump_after, args.child_timeout, args.role)
        else:
            nursery.start_soon(_watchdog, args.child_timeout, args.role)
        try:
            if args.role == "server":
                await _run_server(spec)
            elif args.role == "front":
                await _run_front(spec)
            elif args.role == "load":
                out["result"] = await _load(args, spec)
            else:
                out["result"] = await _pyrelay(args, spec)
        except Exception as exc:
            if "result" not in out:
                raise
            out["teardown_error"] = "".join(traceback.format_exception(exc))
        nursery.cancel_scope.cancel()
    return out


def _run_child(args: argparse.Namespace) -> int:
    out = trio.run(_child, args)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Party:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""


class RunFailed(Exception):
    pass


class _Run:
    """The processes of one run; every wait is bounded by the run's deadline."""

    def __init__(self, args: argparse.Namespace, tag: str, workdir: Path) -> None:
        self.args = args
        self.tag = tag
        self.workdir = workdir
        self.deadline = time.monotonic() + args.timeout
        self.parties: list[Party] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), self.env.get("PYTHONPATH")])
        )

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Party:
        """Start party ``name``; ``env``: variables added to the run's environment."""
        out, err = self.workdir / f"{self.tag}-{name}.out", self.workdir / f"{self.tag}-{name}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            proc = subprocess.Popen(
                list(cmd),
                stdout=out_file,
                stderr=err_file,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**self.env, **env} if env else self.env,
            )
        party = Party(name, proc, out, err)
        self.parties.append(party)
        return party

    def python(self, role: str, spec: RunSpec, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.tunnel_http",
            "--role",
            role,
            "--spec",
            spec.to_json(),
            "--child-timeout",  # its watchdog fires a little before the run's deadline
            str(max(2.0, self.deadline - time.monotonic() - 3)),
            "--pids-file",
            str(self.pids_file),
            *extra,
        ]

    @property
    def pids_file(self) -> Path:
        return self.workdir / f"{self.tag}-pids.json"

    def write_pids(self, names: Sequence[str]) -> None:
        pids = {p.name: p.proc.pid for p in self.parties if p.name in names}
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, self.pids_file)

    def wait_line(self, party: Party, prefix: str) -> str:
        """The first stdout line of ``party`` that starts with ``prefix``."""
        while time.monotonic() < self.deadline:
            for line in party.stdout().splitlines():
                if line.startswith(prefix):
                    return line
            if party.proc.poll() is not None:
                raise RunFailed(f"{party.name} exited ({party.proc.returncode}) before {prefix!r}")
            time.sleep(0.01)
        raise RunFailed(f"timeout after {self.args.timeout:.0f} s waiting for {prefix!r}")

    def wait_http(self, party: Party, port: int, path: str, secret: str) -> None:
        """Poll ``GET path`` (with the bearer ``secret``) on ``port`` until it answers 200;
        ``party`` (the server behind it) exiting first fails the run."""
        last = "no answer"
        while time.monotonic() < self.deadline:
            if party.proc.poll() is not None:
                raise RunFailed(
                    f"{party.name} exited ({party.proc.returncode}) before GET {path} gave 200"
                )
            status = _http_status(port, path, secret)
            if status == 200:
                return
            last = "no answer" if status is None else f"status {status}"
            time.sleep(0.02)
        raise RunFailed(f"timeout after {self.args.timeout:.0f} s waiting for GET {path} ({last})")

    def start_proxy(self) -> tuple[Party, int, int, str]:
        """Start ``python -m visiona_services.remote_proxy`` on free ports (picked by binding
        port 0 first; retried if another process took one meanwhile) and wait until its
        internal API answers. Returns the party, its tunnel and internal ports, the secret."""
        secret = secrets.token_urlsafe(24)
        for attempt in range(3):
            tunnel_port, internal_port = _free_ports(2)
            tokens = {"VISIONA_PROXY_STATIC_TOKENS": f"{TOKEN}={DEVICE}"}
            started = len(self.parties)
            try:
                proxy = self._proxy(tunnel_port, internal_port, secret, tokens)
            except RunFailed:
                if attempt < 2 and self._lost_a_port(started):
                    continue
                raise
            return proxy, tunnel_port, internal_port, secret
        raise AssertionError("unreachable")

    def _proxy(
        self, tunnel_port: int, internal_port: int, secret: str, tokens: Mapping[str, str]
    ) -> Party:
        """The remote-proxy on these ports, once its internal API answers; ``tokens``: how it
        verifies device tokens (static ones, or the api-server's URL)."""
        env = {
            "VISIONA_TUNNEL_HOST": HOST,
            "VISIONA_TUNNEL_PORT": str(tunnel_port),
            "VISIONA_PROXY_INTERNAL_HOST": HOST,
            "VISIONA_PROXY_INTERNAL_PORT": str(internal_port),
            "VISIONA_INTERNAL_SECRET": secret,
            "VISIONA_ENV": "production",
            "VISIONA_LOG_LEVEL": "warning",
            # The run is over when the proxy is stopped: no need to wait for forwards.
            "VISIONA_PROXY_SHUTDOWN_GRACE": "1",
            **tokens,
        }
        proxy = self.start("proxy", [sys.executable, "-m", "visiona_services.remote_proxy"], env)
        self.wait_http(proxy, internal_port, "/internal/sessions", secret)
        return proxy

    def _lost_a_port(self, started: int) -> bool:
        """Whether a party started since ``len(self.parties) == started`` failed on a port
        another process took meanwhile; if so, stop and forget those parties (to retry)."""
        fresh = self.parties[started:]
        if not any("address already in use" in p.stderr().lower() for p in fresh):
            return False
        _stop(fresh)
        del self.parties[started:]
        return True

    def start_api_system(self) -> ApiSystem:
        """The dev identity provider, the remote-proxy (verifying device tokens with the
        api-server) and the api-server, on free ports (retried as :meth:`start_proxy`), once
        the api-server answers ``/healthz``."""
        node = shutil.which("node")
        if node is None:
            raise RunFailed("the api chains need node (and `make devidp`)")
        secret = secrets.token_urlsafe(24)
        for attempt in range(3):
            api_port, tunnel_port, internal_port = _free_ports(3)
            api_url = f"http://{HOST}:{api_port}"
            started = len(self.parties)
            try:
                idp = self.start("idp", [node, str(DEVIDP_DIR / "provider.mjs")], _idp_env(api_url))
                issuer = self.wait_line(idp, IDP_READY).removeprefix(IDP_READY).strip()
                tokens = {"VISIONA_API_INTERNAL_URL": api_url}
                proxy = self._proxy(tunnel_port, internal_port, secret, tokens)
                env = {
                    "VISIONA_ENV": "dev",
                    "VISIONA_DATA_DIR": str(self.workdir / f"{self.tag}-api-data"),
                    "VISIONA_DATABASE_URL": "",  # SQLite under the data dir
                    "VISIONA_API_HOST": HOST,
                    "VISIONA_API_PORT": str(api_port),
                    "VISIONA_PUBLIC_URL": api_url,
                    "VISIONA_OIDC_ISSUER": issuer,
                    "VISIONA_OIDC_CLIENT_ID": "visiona-web",
                    "VISIONA_OIDC_CLIENT_SECRET": "",
                    "VISIONA_SESSION_SECRET": secrets.token_urlsafe(32),
                    "VISIONA_INTERNAL_SECRET": secret,
                    "VISIONA_PROXY_INTERNAL_URL": f"http://{HOST}:{internal_port}",
                    "VISIONA_TUNNEL_PUBLIC_URL": f"ws://{HOST}:{tunnel_port}/tunnel/connect",
                    "VISIONA_FORWARD_PREFIXES": API_FORWARD_PREFIXES,
                    "VISIONA_LOG_LEVEL": "warning",
                }
                api = self.start("api", [sys.executable, "-m", "visiona_services.api_server"], env)
                self.wait_http(api, api_port, "/healthz", secret)
            except RunFailed:
                if attempt < 2 and self._lost_a_port(started):
                    continue
                raise
            return ApiSystem(api, api_url, proxy, internal_port, secret)
        raise AssertionError("unreachable")

    def pair(self, api_url: str) -> tuple[str, PairingResult]:
        """Log :data:`API_USER` in and pair a device through the real flow; returns the
        session cookie and the exchange's answer (``device_id``, ``device_token``,
        ``relay_url``)."""
        limit = max(1.0, self.deadline - time.monotonic())
        try:
            return trio.run(_login_and_pair, api_url, limit)
        except (Exception, trio.TooSlowError) as exc:
            raise RunFailed(f"login and pairing failed: {exc!r}") from exc

    def wait_exit(self, party: Party) -> None:
        """Wait for ``party`` to exit; another party exiting first fails the run (after a
        short grace period for ``party`` to notice)."""
        deadline = self.deadline
        while party.proc.poll() is None:
            if time.monotonic() >= deadline:
                others = [p.name for p in self.parties if p.proc.poll() is None]
                raise RunFailed(
                    f"timeout after {self.args.timeout:.0f} s; still running: {', '.join(others)}"
                )
            dead = [p for p in self.parties if p is not party and p.proc.poll() is not None]
            if dead and deadline == self.deadline:
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.01)
        dead = [p for p in self.parties if p is not party and p.proc.poll() is not None]
        if dead:
            raise RunFailed(", ".join(f"{p.name} exited early ({p.proc.returncode})" for p in dead))

    def stop_all(self) -> None:
        _stop(self.parties)


def _stop(parties: Sequence[Party]) -> None:
    """SIGTERM to those still running, SIGKILL after :data:`STOP_GRACE`."""
    running = [p for p in parties if p.proc.poll() is None]
    for party in running:
        with contextlib.suppress(ProcessLookupError):
            party.proc.send_signal(signal.SIGTERM)
    grace = time.monotonic() + STOP_GRACE
    for party in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            party.proc.wait(max(0.0, grace - time.monotonic()))
        if party.proc.poll() is None:
            party.proc.kill()
            party.proc.wait()


@dataclasses.dataclass(frozen=True)
class ApiSystem:
    """The api chains' services (the provider is a party of the run too)."""

    api: Party
    api_url: str
    proxy: Party
    proxy_internal_port: int
    secret: str

    @property
    def api_port(self) -> int:
        return int(self.api_url.rsplit(":", 1)[1])


def _idp_env(api_url: str) -> dict[str, str]:
    """``devidp/provider.mjs`` on a free port of 127.0.0.1 with one public client for the
    api-server at ``api_url`` (its other variables emptied: not inherited)."""
    env = dict.fromkeys(("ISSUER", "CLIENT_SECRET", "JWKS_FILE", "ID_TOKEN_TTL", "COOKIE_KEY"), "")
    env.update(
        PORT="0",
        HOST=HOST,
        CLIENT_ID="visiona-web",
        REDIRECT_URIS=f"{api_url}/api/auth/callback",
        POST_LOGOUT_REDIRECT_URIS=f"{api_url}/",
        BACKCHANNEL_LOGOUT_URI=f"{api_url}/api/auth/backchannel-logout",
    )
    return env


async def _login_and_pair(api_url: str, limit: float) -> tuple[str, PairingResult]:
    """As a person and an agent would: log in at the provider (headless), ask for a pairing
    token, trade it at the exchange."""
    import httpx

    from examples.devbrowser import login_at_provider

    with trio.fail_after(limit):
        async with httpx.AsyncClient(base_url=api_url) as browser:
            login = await browser.get("/api/auth/login")
            if login.status_code != 302:
                raise RuntimeError(f"GET /api/auth/login answered {login.status_code}")
            callback = await login_at_provider(browser, login.headers["location"], API_USER)
            back = await browser.get(callback)
            session = browser.cookies.get(SESSION_COOKIE)
            if back.status_code != 302 or not session:
                raise RuntimeError(f"the login callback answered {back.status_code}: {back.text}")
            created = await browser.post(
                "/api/pairing/token", json={"name": "bench device"}, headers={"X-CSRF": "1"}
            )
            if created.status_code != 201:
                raise RuntimeError(f"POST /api/pairing/token: {created.status_code} {created.text}")
            token = created.json()["data"]["token"]
        paired = await pair_device(api_url, token, backoff_base=0.1, backoff_cap=1.0)
    return session, paired


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel had free a moment ago (bound to port 0, closed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def _http_status(port: int, path: str, secret: str) -> int | None:
    """The status of ``GET path`` on ``HOST:port`` with the bearer ``secret``; None if the
    server does not answer (yet)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {secret}"})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _agent_cmd(
    kind: str, binaries: Any, relay_url: str, local_port: int, token: str = TOKEN
) -> list[str]:
    local = f"{HOST}:{local_port}"
    if kind in ("go-agent", "seed-agent"):
        # seed-agent: gorilla's default 4 KiB buffers, as the seed's agent; go-agent: 64 KiB.
        buffers = ["-ws-buffer", str(64 * KiB)] if kind == "go-agent" else []
        go = [str(binaries.agent), "-relay-url", relay_url, "-token", token, "-local", local]
        return [*go, *buffers]
    return [
        sys.executable,
        "-m",
        "visiona_tunnel.agent",
        "--relay-url",
        relay_url,
        "--token",
        token,
        "--local",
        local,
        "--log-level",
        "warning",
    ]


def _make_spec(args: argparse.Namespace, workload: str) -> RunSpec:
    scale: float = args.size_scale
    return RunSpec(
        workload=workload,
        requests=max(args.concurrency, round(args.requests * scale)),
        concurrency=args.concurrency,
        warmup=args.warmup,
        size=max(CHUNK, round(args.size * scale)),
        seed=random.getrandbits(62),
    )


def run_once(
    args: argparse.Namespace,
    chain: str,
    workload: str,
    round_no: int,
    workdir: Path,
    binaries: Any,
) -> dict[str, Any]:
    spec = _make_spec(args, workload)
    tag = f"r{round_no}-{workload}-{chain}"
    record: dict[str, Any] = {
        "round": round_no,
        "workload": workload,
        "chain": chain,
        "spec": dataclasses.asdict(spec),
        "ok": False,
    }
    run = _Run(args, tag, workdir)
    load: Party | None = None
    error: str | None = None
    try:
        role = "front" if chain == "hypercorn" else "server"
        server = run.start("server", run.python(role, spec))
        port = int(run.wait_line(server, "PORT ").split()[1])
        if chain in ("direct", "hypercorn"):
            run.write_pids(["server"])
            load = run.start("load", run.python("load", spec, "--port", str(port)))
        elif chain.startswith("proxy+"):
            agent_kind = chain.split("+")[1]
            proxy, tunnel_port, internal_port, secret = run.start_proxy()
            url = f"ws://{HOST}:{tunnel_port}/tunnel/connect"
            run.start("agent", _agent_cmd(agent_kind, binaries, url, port))
            run.wait_http(proxy, internal_port, f"/internal/sessions/{DEVICE}", secret)
            run.write_pids(["server", "proxy", "agent"])
            extra = ("--port", str(internal_port), "--prefix", f"/internal/forward/{DEVICE}")
            load = run.start("load", run.python("load", spec, *extra), {BEARER_ENV: secret})
        elif chain.startswith("gohop+"):
            agent_kind = chain.split("+")[1]
            proxy, tunnel_port, internal_port, secret = run.start_proxy()
            url = f"ws://{HOST}:{tunnel_port}/tunnel/connect"
            run.start("agent", _agent_cmd(agent_kind, binaries, url, port))
            upstream = f"http://{HOST}:{internal_port}"
            hop = run.start(
                "hop", [str(binaries.hop), "-listen", f"{HOST}:0", "-upstream", upstream]
            )
            hop_port = int(run.wait_line(hop, "HTTP LISTENING ").split()[2])
            run.wait_http(proxy, internal_port, f"/internal/sessions/{DEVICE}", secret)
            run.write_pids(["server", "proxy", "hop", "agent"])
            extra = ("--port", str(hop_port), "--prefix", f"/internal/forward/{DEVICE}")
            load = run.start("load", run.python("load", spec, *extra), {BEARER_ENV: secret})
        elif chain.startswith("api+"):
            agent_kind = chain.split("+")[1]
            system = run.start_api_system()
            session, paired = run.pair(system.api_url)
            cmd = _agent_cmd(agent_kind, binaries, paired.relay_url, port, paired.device_token)
            run.start("agent", cmd)
            sessions = f"/internal/sessions/{paired.device_id}"
            run.wait_http(system.proxy, system.proxy_internal_port, sessions, system.secret)
            run.write_pids(["server", "idp", "proxy", "api", "agent"])
            at_api = ("--port", str(system.api_port))
            load = run.start("load", run.python("load", spec, *at_api), {SESSION_ENV: session})
        else:
            relay_kind, agent_kind = chain.split("+")
            if relay_kind == "py-relay":
                relay = run.start("relay", run.python("pyrelay", spec))
                tunnel_port = int(run.wait_line(relay, "TUNNEL PORT ").split()[2])
            else:
                relay = run.start(
                    "relay",
                    [
                        str(binaries.relay),
                        "-listen",
                        f"{HOST}:0",
                        "-http",
                        f"{HOST}:0",
                        "-tokens",
                        f"{TOKEN}={DEVICE}",
                    ],
                )
                tunnel_port = int(run.wait_line(relay, "TUNNEL LISTENING ").split()[2])
                http_port = int(run.wait_line(relay, "HTTP LISTENING ").split()[2])
            url = f"ws://{HOST}:{tunnel_port}/tunnel/connect"
            run.start("agent", _agent_cmd(agent_kind, binaries, url, port))
            if relay_kind == "py-relay":
                run.write_pids(["server", "agent"])
                load = relay
            else:
                run.wait_line(relay, f"AGENT CONNECTED {DEVICE}")
                run.write_pids(["server", "relay", "agent"])
                extra = ("--port", str(http_port), "--prefix", f"/forward/{DEVICE}")
                load = run.start("load", run.python("load", spec, *extra))
        run.wait_exit(load)
    except RunFailed as exc:
        error = str(exc)
    finally:
        run.stop_all()

    out = _result_line(load.out) if load is not None else None
    result = out.get("result") if out else None
    record["result"] = result
    record["returncodes"] = {p.name: p.proc.returncode for p in run.parties}
    if out and out.get("teardown_error"):
        record["teardown_error"] = out["teardown_error"]
    if error is None and result is None:
        error = "the load produced no result"
    if error is None and result and result["errors"]:
        error = "integrity check failed: " + "; ".join(result["errors"][:5])
    if error is None and result:
        record["ok"] = True
        record["value"] = result["value"]
        record["unit"] = result["unit"]
        return record
    record["error"] = error
    for party in run.parties:
        text = party.stderr()
        record[f"{party.name}_exceptions"] = exception_summary(text)
        record[f"{party.name}_stderr"] = text[-20000:]
        dump = task_dump(text)
        if dump:
            record[f"{party.name}_task_dump"] = dump
            if party is load:
                record["error"] = f"{record['error']}; {party.name} HUNG (watchdog fired)"
    return record


def _print_run(record: dict[str, Any]) -> None:
    head = f"[round {record['round']}] {record['workload']:<8} {record['chain']:<18}"
    if not record["ok"]:
        print(f"{head} FAILED: {record['error']}", flush=True)
        for key, value in record.items():
            if key.endswith("_task_dump"):
                if key.startswith(("load", "relay")):  # where the load ran
                    print("    " + str(value)[:4000].replace("\n", "\n    "), flush=True)
                else:
                    print(f"    ({key.removesuffix('_task_dump')}'s task dump: see --json)")
            elif key.endswith("_exceptions") and value:
                print(f"    {key.removesuffix('_exceptions')}: distinct exception lines:")
                for line in value[:12]:
                    print(f"      {line}", flush=True)
        return
    result = record["result"]
    if record["workload"] == "small":
        text = (
            f"{result['value']:.0f} req/s, p50 {result['latency_p50_ms']:.2f} ms, "
            f"p99 {result['latency_p99_ms']:.2f} ms"
        )
    else:
        text = (
            f"{result['value']:.1f} MB/s ({result['bytes']} bytes in {result['elapsed_s']:.2f} s)"
        )
    print(f"{head} {text}; CPU {_cpu_text(result['cpu'])}", flush=True)
    if record.get("teardown_error"):
        last = record["teardown_error"].strip().splitlines()[-1]
        print(f"    note: teardown raised after the measurement: {last}", flush=True)


PARTY_ORDER = (
    "load",
    "relay+load",
    "relay",
    "api",
    "hop",
    "proxy",
    "agent",
    "server",
    "idp",
    "others",
)


def _cpu_text(cpu: Mapping[str, Mapping[str, float]]) -> str:
    return " / ".join(f"{n} {cpu[n]['pct']:.0f}%" for n in PARTY_ORDER if n in cpu)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            return f"{n / factor:g} {unit}"
    return f"{n} B"


def _describe(spec: Mapping[str, Any]) -> str:
    if spec["workload"] == "small":
        return f"small: GET 100 B x {spec['requests']}, {spec['concurrency']} in flight"
    if spec["workload"] == "download":
        return f"download: GET {_size(spec['size'])}"
    return f"upload: POST {_size(spec['size'])}"


def summarize(
    runs: Sequence[dict[str, Any]], chains: Sequence[str], workloads: Sequence[str]
) -> tuple[list[dict[str, Any]], str]:
    baselines = [b for b in BASELINES if b in chains]
    # An api or gohop chain is also compared with the proxy chain of the same agent: what
    # its extra hop costs.
    references = {
        chain: "proxy+" + agent
        for chain in chains
        for hop, _, agent in [chain.partition("+")]
        if hop in ("api", "gohop") and "proxy+" + agent in chains
    }
    head = "| workload | chain | result: median (min-max) | runs ok |"
    head += "".join(f" vs {b} (same round) |" for b in baselines)
    if references:
        head += " vs proxy+<same agent> (same round) |"
    head += " CPU, % of one core (median) |"
    lines = [head, "|" + "---|" * (5 + len(baselines) + bool(references))]
    per_round: list[str] = []
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        by_chain = {
            chain: [r for r in runs if r["workload"] == workload and r["chain"] == chain]
            for chain in chains
        }
        base_by_round = {
            b: {r["round"]: r for r in by_chain[b] if r["ok"] and r["value"]}
            for b in {*baselines, *references.values()}
        }
        for chain in chains:
            mine = by_chain[chain]
            ok = [r for r in mine if r["ok"]]
            row: dict[str, Any] = {"workload": workload, "chain": chain}
            row["runs"], row["runs_ok"] = len(mine), len(ok)
            label = _describe(mine[0]["spec"]) if mine else workload
            if ok:
                unit = ok[0]["unit"]
                values = [r["value"] for r in ok]
                row.update(
                    unit=unit,
                    median=statistics.median(values),
                    min=min(values),
                    max=max(values),
                )
                result = f"**{_fmt(row['median'])} {unit}** ({_fmt(row['min'])}-{_fmt(row['max'])})"
                if workload == "small":
                    p50 = statistics.median(r["result"]["latency_p50_ms"] for r in ok)
                    p99 = statistics.median(r["result"]["latency_p99_ms"] for r in ok)
                    row["latency_p50_ms"], row["latency_p99_ms"] = p50, p99
                    result += f"; p50 {p50:.1f} ms, p99 {p99:.1f} ms"
                cpu: dict[str, float] = {}
                for name in PARTY_ORDER:
                    pcts = [
                        r["result"]["cpu"][name]["pct"] for r in ok if name in r["result"]["cpu"]
                    ]
                    if pcts:
                        cpu[name] = statistics.median(pcts)
                row["cpu_pct"] = cpu
                cpu_text = " / ".join(f"{n} {p:.0f}" for n, p in cpu.items())
            else:
                result, cpu_text = "**failed**", "-"
            cells = []
            for base in baselines:
                if chain == base:
                    cells.append("(baseline)")
                    continue
                ratios = [
                    r["value"] / base_by_round[base][r["round"]]["value"]
                    for r in ok
                    if r["round"] in base_by_round[base]
                ]
                row[f"ratio_vs_{base}"] = ratios
                if ratios:
                    row[f"ratio_vs_{base}_median"] = statistics.median(ratios)
                    cells.append(
                        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                    )
                else:
                    cells.append("-")
            if references:
                reference = references.get(chain)
                if reference is None:
                    cells.append("(baseline)" if chain in references.values() else "")
                else:
                    pairs = [
                        (r["round"], r["value"] / base_by_round[reference][r["round"]]["value"])
                        for r in ok
                        if r["round"] in base_by_round[reference]
                    ]
                    ratios = [ratio for _, ratio in pairs]
                    row["ratio_vs_proxy"] = ratios
                    if ratios:
                        row["ratio_vs_proxy_median"] = statistics.median(ratios)
                        cells.append(
                            f"**{statistics.median(ratios):.2f}x** "
                            f"({min(ratios):.2f}-{max(ratios):.2f})"
                        )
                        each = ", ".join(f"r{n} {ratio:.2f}x" for n, ratio in pairs)
                        per_round.append(f"- {workload}, {chain} / {reference}: {each}")
                    else:
                        cells.append("-")
            rows.append(row)
            lines.append(
                f"| {label} | {chain} | {result} | {len(ok)}/{len(mine)} | "
                + "".join(f"{c} | " for c in cells)
                + f"{cpu_text} |"
            )
    if per_round:
        lines += ["", "Per round:", *per_round]
    return rows, "\n".join(lines)


def _orchestrate(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.chains.split(",") if s.strip()]
    chains = list(dict.fromkeys(c for name in names for c in PRESETS.get(name, (name,))))
    workloads = [s.strip() for s in args.workloads.split(",") if s.strip()]
    unknown = [c for c in chains if c not in CHAINS] + [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"unknown chain/workload: {unknown}; chains: {', '.join(CHAINS)}", file=sys.stderr)
        return 2
    binaries = None
    if any("go-" in chain or "seed-" in chain or "gohop" in chain for chain in chains):
        # Imported by name: mypy checks tests/ as its own root (and would meet gobuild.py
        # under two module names), and resolves tests.interop.tunnelpeers to the Go sources.
        gobuild = importlib.import_module("tests.interop.gobuild")
        peers = importlib.import_module("tests.interop.tunnelpeers")
        try:
            binaries = peers.build_tunnel_peers()
        except (gobuild.GoToolchainMissing, gobuild.GoBuildFailed) as exc:
            print(f"cannot build the Go peers ({exc}); leave out the go chains", file=sys.stderr)
            return 2
    if any(chain.startswith("api+") for chain in chains) and not (
        shutil.which("node") and (DEVIDP_DIR / "node_modules" / "oidc-provider").is_dir()
    ):
        print(
            "the api chains need node and the dev provider's modules (make devidp); "
            "leave out the api chains",
            file=sys.stderr,
        )
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    print(
        f"# tunnel_http: {started}, python {platform.python_version()}, trio {trio.__version__}, "
        f"h11 {H11_VERSION}, {os.cpu_count()} CPUs; chains {chains}, workloads {workloads}, "
        f"{args.rounds} rounds, size-scale {args.size_scale}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            workdir = Path(args.log_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunnel-http.")))
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(chains)
            for workload in workloads:
                for chain in chains[shift:] + chains[:shift]:
                    record = run_once(args, chain, workload, round_no, workdir, binaries)
                    runs.append(record)
                    _print_run(record)
    rows, table = summarize(runs, chains, workloads)
    print()
    print(table)
    if args.json:
        meta = {
            "started": started,
            "argv": sys.argv,
            "args": vars(args),
            "python": platform.python_version(),
            "trio": trio.__version__,
            "h11": H11_VERSION,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        }
        doc = {"meta": meta, "summary": rows, "table": table, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"\nraw results: {args.json}")
    return 0 if all(r["ok"] for r in runs) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "HTTP through the tunnel chain (loopback): direct vs Python/Go relay+agent "
            "and the remote-proxy service."
        )
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--chains",
        default="all",
        help="comma list of chains or presets; chains: "
        + ",".join(CHAINS)
        + "; presets: "
        + "; ".join(f"{name} = {','.join(chains)}" for name, chains in PRESETS.items()),
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="small,download,upload")
    p.add_argument("--size-scale", type=float, default=1.0, help="scale bytes and requests")
    p.add_argument("--requests", type=int, default=5000, help="small: timed requests")
    p.add_argument("--concurrency", type=int, default=32, help="small: requests in flight")
    p.add_argument("--warmup", type=int, default=3, help="small: untimed requests per worker")
    p.add_argument("--size", type=int, default=256 * MiB, help="download/upload bytes")
    p.add_argument("--timeout", type=float, default=120.0, help="per-run limit in seconds")
    p.add_argument("--json", metavar="PATH", help="write raw results here")
    p.add_argument("--log-dir", metavar="DIR", help="keep every party's stdout/stderr here")
    # Internal: the child processes.
    p.add_argument(
        "--role",
        choices=("orchestrator", "server", "front", "load", "pyrelay"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    p.add_argument("--pids-file", help=argparse.SUPPRESS)
    p.add_argument("--child-timeout", type=float, default=115.0, help=argparse.SUPPRESS)
    p.set_defaults(role="orchestrator")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "orchestrator":
        return _orchestrate(args)
    return _run_child(args)


if __name__ == "__main__":
    sys.exit(main())
