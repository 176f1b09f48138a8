"""Store throughput: put and get of one large object on LocalFS and on S3 (rclone serve s3),
against a plain ``cp`` of the same file on the same disk. A measurement, not a test
(docs/storage.md, docs/performance.md).

    .venv/bin/python benchmarks/storage_throughput.py [--size-mib 256] [--dir DIR]
    .venv/bin/python benchmarks/storage_throughput.py --mode route --rounds 3 \\
        --size-mib 256,1024 [--clients lean,h11,httpx] [--no-s3] [--json PATH] \\
        [--compare-repo CHECKOUT] [--profile DIR]

``--mode store`` (the default) calls the Store in this process, with the process's peak
traced memory (tracemalloc) during each transfer. Every number is for data in the page
cache (the source was just written), dirty pages flushed before each run. ``cp`` copies in
the kernel (copy_file_range) and does not wait for the disk; ``cp + sync`` does; ``dd bs=1M
conv=fsync`` moves the bytes through user space in 1 MiB reads and writes and fsyncs, as any
streaming upload must (LocalFS's put fsyncs before its rename).

``--mode route`` goes through the api-server's ``PUT``/``GET /storage/{token}`` route, the
way a browser or a device uses a presigned URL. The api-server runs as its own process
(``python -m visiona_services.api_server``, ``VISIONA_ENV=dev``, SQLite, its data directory
on the same disk as the copies, a known ``VISIONA_STORAGE_SIGNING_SECRET``; no login: the
token is the authority), and this process makes the URLs with a ``LocalFSStore`` on the same
root and secret. The client uploads a random 1 MiB block repeated, from memory, and discards
what it downloads:

* ``lean`` (the default): h11 over trio, one connection per request; upload chunks passed
  through to ``send_all``; a download's head parsed by h11, its body counted with
  ``recv_into`` one reused buffer (the least CPU a client can spend: the machine's cores
  are shared with the server);
* ``h11``: the same, every byte through h11's events (as ``benchmarks/tunnel_http.py``);
* ``httpx``: httpx's AsyncClient streaming both ways.

Each round (after ``--warmup`` unrecorded ones: a VM's first touch of memory is slow) runs
the copies, each ``--copies`` times (the median counts; the copy is removed outside the
timing), then the route's PUT and GET of a fresh key (deleted after), then the same through
``rclone serve s3`` with S3's own presigned URLs, for comparison; ratios are taken within a
round. The upload's yardstick is ``dd bs=1M conv=fsync``: the route's answer comes after
the object is fsynced, and its bytes come through user space from a socket, which rules
out copy_file_range (``cp + sync`` is shown too). A download writes nothing durable: its
yardstick is ``cp``. For each transfer: MB/s (10^6 B/s) from the request's first byte to
the response's last; for an upload, the time from its last byte to the answer; the CPU
of the server, of this process (the client) and of the rest of the machine (% of one core,
from /proc; and CPU seconds per GB); the server's RSS before the transfer and its peak
during it (VmHWM, reset through /proc/<pid>/clear_refs). ``--compare-repo`` runs another
checkout's api-server in the same rounds (e.g. the code before a change); ``--profile``
samples this checkout's api-server with py-spy (slows it: not for the table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
import httpx
import trio

# Run as a script: the tests' support package and the benchmarks package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.rclone import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    find_rclone,
    rclone_serve_s3,
)

from benchmarks.procstat import cpu_seconds, machine_busy_seconds
from visiona_services.api_server.storage import LocalFSStore, S3Store, Store

MiB = 1024 * 1024
CHUNK = MiB


async def file_stream(path: Path) -> AsyncIterator[bytes]:
    """The file in 1 MiB chunks, read without blocking trio (what a route's request body
    would give, only faster)."""
    async with await trio.open_file(path, "rb") as source:
        while data := await source.read(CHUNK):
            yield data


#: Each transfer runs this many times; the table shows the median.
RUNS = 5


def median_row(label: str, size: int, runs: Sequence[tuple[float, int | None]]) -> list[str]:
    elapsed = sorted(seconds for seconds, _ in runs)[len(runs) // 2]
    peaks = [peak for _, peak in runs if peak is not None]
    peak = f"{max(peaks) / MiB:.1f}" if peaks else "-"
    return [label, f"{size / 1e6 / elapsed:.0f}", f"{elapsed:.2f}", peak]


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, int]:
    """Seconds and tracemalloc's peak for one run, dirty pages flushed before."""
    os.sync()
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    await fn()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def shell_timed(command: str) -> tuple[float, None]:
    os.sync()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", command], check=True)
    return time.perf_counter() - started, None


class Transfers:
    """Put and get of one key on a store, each run timed."""

    def __init__(self, name: str, store: Store, source: Path, size: int, expected: str) -> None:
        self.name, self.store, self.source, self.size = name, store, source, size
        self.expected = expected
        self.key = f"bench/{uuid.uuid4().hex}"
        self.puts: list[tuple[float, int | None]] = []
        self.gets: list[tuple[float, int | None]] = []

    async def put(self) -> None:
        stream = file_stream(self.source)
        info = await self.store.put(self.key, stream, self.size, "application/octet-stream", {})
        assert info.sha256 == self.expected

    async def get(self) -> None:
        received = 0
        async with await self.store.get(self.key) as obj:
            async for chunk in obj:
                received += len(chunk)
        assert received == self.size

    async def run_once(self) -> None:
        self.puts.append(await timed(self.put))
        self.gets.append(await timed(self.get))

    def rows(self) -> list[list[str]]:
        return [
            median_row(f"{self.name} put (sha256 on the way, fsync)", self.size, self.puts),
            median_row(f"{self.name} get", self.size, self.gets),
        ]


async def store_mode(args: argparse.Namespace, size_mib: int) -> None:
    """The Store itself, in this process (the original mode)."""
    size = size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="visiona-storage-bench-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        with source.open("wb") as out:
            for _ in range(size_mib):
                out.write(os.urandom(MiB))
            os.fsync(out.fileno())
        expected = hashlib.sha256(await trio.Path(source).read_bytes()).hexdigest()
        copy, synced = work / "copy1", work / "copy2"
        cp: list[tuple[float, int | None]] = []
        cp_sync: list[tuple[float, int | None]] = []
        dd: list[tuple[float, int | None]] = []
        local = Transfers(
            "LocalFS",
            LocalFSStore(work / "objects", signing_secret="b" * 40),
            source,
            size,
            expected,
        )
        # Interleaved, so that each sees the disk in the same mood (a shared VM's varies).
        for _ in range(RUNS):
            cp.append(shell_timed(f"cp '{source}' '{copy}' && rm '{copy}'"))
            cp_sync.append(
                shell_timed(f"cp '{source}' '{synced}' && sync '{synced}' && rm '{synced}'")
            )
            dd.append(
                shell_timed(
                    f"dd if='{source}' of='{synced}' bs=1M conv=fsync status=none && rm '{synced}'"
                )
            )
            await local.run_once()
        rows = [
            median_row("cp (same disk)", size, cp),
            median_row("cp + sync (the copy fsynced)", size, cp_sync),
            median_row("dd bs=1M conv=fsync (read/write, fsynced)", size, dd),
            *local.rows(),
        ]
        binary, reason = find_rclone()
        if binary is None:
            print(f"S3 skipped: {reason}", file=sys.stderr)
        else:
            with rclone_serve_s3(binary) as server:
                async with httpx.AsyncClient(timeout=60) as http:
                    s3 = S3Store(server.endpoint, "bench", REGION, ACCESS_KEY, SECRET_KEY, http)
                    await s3.ensure_bucket()
                    remote = Transfers("S3 (rclone serve s3)", s3, source, size, expected)
                    for _ in range(RUNS):
                        await remote.run_once()
                    rows += remote.rows()
    print(
        f"{size_mib} MiB object, page cache warm, dirty pages flushed before each run;"
        f" median of {RUNS}; peak = tracemalloc's peak during a run (MiB)\n"
    )
    print("| transfer | MB/s | seconds | peak MiB |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# --------------------------------------------------------------------------------------------
# --mode route: through the api-server's /storage/{token} route, in its own process
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KiB = 1024
#: The signing secret the api-server is started with (the bench signs its URLs with it).
SIGNING_SECRET = "visiona-storage-bench-signing-secret-0123456789"
CONTENT_TYPE = "application/octet-stream"
URL_TTL = 3600
#: How long the api-server may take to answer /healthz, and one transfer to finish.
START_TIMEOUT = 60.0
TRANSFER_TIMEOUT = 600.0


def status_mib(pid: int, field: str) -> float | None:
    """A ``kB`` line of /proc/<pid>/status (``VmRSS``, ``VmHWM``), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / KiB
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss(pid: int) -> None:
    """Resets the process's VmHWM to its current RSS (Linux >= 4.0)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def child_pid(command_part: bytes) -> int | None:
    """The pid of this process's child whose command line contains ``command_part``."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me and command_part in cmdline:
            return int(entry.name)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class ApiServer:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path


@dataclasses.dataclass(frozen=True)
class RouteUnderTest:
    """An api-server and the LocalFSStore on its root and secret that signs its URLs;
    ``tag`` tells it apart in the table (empty: this checkout's)."""

    tag: str
    server: ApiServer
    store: LocalFSStore


@contextlib.contextmanager
def api_server(data_dir: Path, log: Path, repo: Path = REPO) -> Iterator[ApiServer]:
    """``python -m visiona_services.api_server`` (the code of the checkout ``repo``) on a
    free port, ``data_dir`` its ``VISIONA_DATA_DIR`` (SQLite there), until the end (SIGTERM:
    a graceful stop)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONA_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")])),
        VISIONA_ENV="dev",
        VISIONA_DATA_DIR=str(data_dir),
        VISIONA_API_HOST=HOST,
        VISIONA_API_PORT=str(port),
        VISIONA_PUBLIC_URL=f"http://{HOST}:{port}",
        VISIONA_OIDC_ISSUER="http://127.0.0.1:9",  # never reached: no login here
        VISIONA_OIDC_CLIENT_ID="x",
        VISIONA_STORAGE_SIGNING_SECRET=SIGNING_SECRET,
        VISIONA_LOG_LEVEL="warning",
        # No remote-proxy: its event follower retries against the discard port, and never
        # reaches another run's proxy on the default 3801.
        VISIONA_PROXY_INTERNAL_URL="http://127.0.0.1:9",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "visiona_services.api_server"],
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the api-server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield ApiServer(proc, url, data_dir, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def py_spy(pid: int, output: Path) -> Iterator[None]:
    """``py-spy record`` attached to ``pid`` (all threads) until the end: collapsed
    stacks at ``output`` (``--format raw``, for flamegraph.pl or speedscope). The profiler
    slows its target: not for the table."""
    spy = Path(sys.executable).parent / "py-spy"
    proc = subprocess.Popen(
        [
            *(str(spy), "record", "--pid", str(pid), "--threads", "--rate", "250"),
            *("--output", str(output), "--format", "raw", "--nonblocking"),
        ],
        stdin=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def body_chunks(size: int, block: bytes) -> Iterator[bytes]:
    """``size`` bytes: ``block`` repeated, the last one cut."""
    full, rest = divmod(size, len(block))
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


def body_sha256(size: int, block: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in body_chunks(size, block):
        digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Exchange:
    status: int
    seconds: float  # the request's first byte to the response's last
    sent: float  # the request's first byte to its last (given to the kernel)
    received: int  # response body bytes
    body: bytes  # the response body when asked to keep it, else b""


class Client(Protocol):
    name: str

    async def exchange(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Iterable[bytes] | None,
        *,
        keep: bool,
    ) -> Exchange: ...

    async def aclose(self) -> None: ...


class H11Client:
    """h11 over a trio socket, one connection per request; body chunks are passed through
    to ``send_all`` without a copy, responses read ``recv_size`` at a time.

    ``lean``: h11 parses the response's head; a body it does not keep (a download) is then
    counted with ``recv_into`` one reused buffer, up to its Content-Length (h11 would copy
    every byte twice more, and allocate per read): the least CPU a client can spend on it,
    so that as much of the machine as possible is left to the server."""

    def __init__(self, recv_size: int, *, lean: bool = False) -> None:
        self.recv_size = recv_size
        self.lean = lean
        self.name = "lean" if lean else "h11"
        self.buffer = bytearray(recv_size)

    async def exchange(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Iterable[bytes] | None,
        *,
        keep: bool,
    ) -> Exchange:
        parts = urlsplit(url)
        host, port = parts.hostname or HOST, parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        stream = await trio.open_tcp_stream(host, port)
        try:
            conn = h11.Connection(h11.CLIENT)
            started = time.perf_counter()
            request = h11.Request(
                method=method, target=target, headers=[("Host", f"{host}:{port}"), *headers]
            )
            await self._send(conn, stream, request)
            for chunk in body or ():
                await self._send(conn, stream, h11.Data(data=chunk))
            await self._send(conn, stream, h11.EndOfMessage())
            sent = time.perf_counter() - started
            status, received, kept = 0, 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(self.recv_size))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    length = dict(event.headers).get(b"content-length")
                    if self.lean and not keep and length is not None:
                        received = await self._count_body(conn, stream, int(length))
                        break
                elif isinstance(event, h11.Data):
                    received += len(event.data)
                    if keep:
                        kept += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif not isinstance(event, h11.InformationalResponse):
                    raise RuntimeError(f"unexpected {event!r} in the response")
            return Exchange(status, time.perf_counter() - started, sent, received, bytes(kept))
        finally:
            await trio.aclose_forcefully(stream)

    async def _count_body(
        self, conn: h11.Connection, stream: trio.SocketStream, length: int
    ) -> int:
        """The body's bytes: those h11 already holds, then the rest read past it."""
        received = 0
        while isinstance(event := conn.next_event(), h11.Data):
            received += len(event.data)
        if isinstance(event, h11.EndOfMessage):
            return received
        sock, buffer = stream.socket, self.buffer
        while received < length:
            n = await sock.recv_into(buffer, min(len(buffer), length - received))
            if not n:
                raise RuntimeError(f"the response ended after {received} of {length} bytes")
            received += n
        return received

    @staticmethod
    async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
        for piece in conn.send_with_data_passthrough(event) or ():
            if piece:
                await stream.send_all(piece)

    async def aclose(self) -> None:
        pass


class HttpxClient:
    """httpx's AsyncClient (keep-alive pool), the body streamed from an async iterator,
    the response read with ``aiter_raw``."""

    name = "httpx"

    def __init__(self) -> None:
        self.http = httpx.AsyncClient(timeout=TRANSFER_TIMEOUT)

    async def exchange(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Iterable[bytes] | None,
        *,
        keep: bool,
    ) -> Exchange:
        sent = 0.0

        async def content(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
            nonlocal sent
            for chunk in chunks:
                yield chunk
            sent = time.perf_counter() - started

        started = time.perf_counter()
        request = self.http.build_request(
            method, url, headers=list(headers), content=None if body is None else content(body)
        )
        response = await self.http.send(request, stream=True)
        received, kept = 0, bytearray()
        try:
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if keep:
                    kept += chunk
        finally:
            await response.aclose()
        seconds = time.perf_counter() - started
        return Exchange(response.status_code, seconds, sent or seconds, received, bytes(kept))

    async def aclose(self) -> None:
        await self.http.aclose()


@dataclasses.dataclass
class Sample:
    """One timed transfer."""

    seconds: float
    mbps: float
    #: From the request's last byte to the response's last (for an upload: the server's
    #: work after the last byte arrived, the fsync among it).
    after_sent: float
    #: % of one core over the transfer, per party; ``others``: the rest of the machine.
    cpu: dict[str, float]
    #: Per watched process: RSS before the transfer and the peak during it (MiB).
    rss_before: dict[str, float]
    rss_peak: dict[str, float]


async def measured(
    size: int, pids: Mapping[str, int], run: Callable[[], Awaitable[Exchange]]
) -> Sample:
    """``run()`` (its exchange's own timing) with the CPU and peak RSS of the
    ``pids`` and of this process (``client``), dirty pages flushed before."""
    os.sync()
    for pid in pids.values():
        reset_peak_rss(pid)
    before_rss = {name: status_mib(pid, "VmRSS") for name, pid in pids.items()}
    parties = {**pids, "client": os.getpid()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in parties.items()}
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    done = await run()
    wall = time.perf_counter() - started
    busy_after = machine_busy_seconds()
    cpu: dict[str, float] = {}
    for name, pid in parties.items():
        first, last = cpu_before[name], cpu_seconds(pid)
        if first is not None and last is not None:
            cpu[name] = 100 * (last - first) / wall
    if busy_before is not None and busy_after is not None:
        cpu["others"] = max(0.0, 100 * (busy_after - busy_before) / wall - sum(cpu.values()))
    peaks = {name: status_mib(pid, "VmHWM") for name, pid in pids.items()}
    return Sample(
        seconds=done.seconds,
        mbps=size / 1e6 / done.seconds,
        after_sent=done.seconds - done.sent,
        cpu=cpu,
        rss_before={k: v for k, v in before_rss.items() if v is not None},
        rss_peak={k: v for k, v in peaks.items() if v is not None},
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def copy_sample(size: int, command: str, copy: Path, tries: int) -> Sample:
    """The median of ``tries`` runs of the shell ``command`` (which makes ``copy``, removed
    after each run, outside the timing), dirty pages flushed before each; its CPU is
    ``copy`` (the command's, from the children's rusage), ``others`` the rest of the
    machine's meanwhile."""
    samples: list[Sample] = []
    for _ in range(tries):
        os.sync()
        busy_before = machine_busy_seconds()
        children_before = _children_cpu()
        started = time.perf_counter()
        subprocess.run(["sh", "-c", command], check=True)
        seconds = time.perf_counter() - started
        busy_after = machine_busy_seconds()
        cpu = {"copy": 100 * (_children_cpu() - children_before) / seconds}
        copy.unlink()
        if busy_before is not None and busy_after is not None:
            machine = 100 * (busy_after - busy_before) / seconds
            cpu["others"] = max(0.0, machine - cpu["copy"])
        samples.append(Sample(seconds, size / 1e6 / seconds, 0.0, cpu, {}, {}))
    return sorted(samples, key=lambda sample: sample.seconds)[len(samples) // 2]


class RouteTransfers:
    """PUT then GET of a fresh key through presigned URLs: the api-server's /storage route
    (``store`` a LocalFSStore on its root and secret) or an S3 server (an S3Store)."""

    def __init__(
        self,
        store: Store,
        public_url: str,
        client: Client,
        pids: Mapping[str, int],
        block: bytes,
    ) -> None:
        self.store, self.public_url, self.client = store, public_url, client
        self.pids, self.block = pids, block

    async def put(self, key: str, size: int, expected: str) -> Sample:
        url = await self.store.presigned_put_url(
            key, URL_TTL, size=size, content_type=CONTENT_TYPE, public_url=self.public_url
        )
        headers = [*url.headers.items(), ("Content-Length", str(size))]
        assert url.method == "PUT"

        async def run() -> Exchange:
            with trio.fail_after(TRANSFER_TIMEOUT):
                done = await self.client.exchange(
                    "PUT", url.url, headers, body_chunks(size, self.block), keep=True
                )
            if done.status != 200:
                raise RuntimeError(f"PUT answered {done.status}: {done.body[:500]!r}")
            if isinstance(self.store, LocalFSStore):  # the route says what it stored
                data = json.loads(done.body)["data"]
                if (data["size"], data["sha256"]) != (size, expected):
                    raise RuntimeError(f"the route stored something else: {data}")
            return done

        return await measured(size, self.pids, run)

    async def get(self, key: str, size: int) -> Sample:
        url = await self.store.presigned_get_url(key, URL_TTL, public_url=self.public_url)

        async def run() -> Exchange:
            with trio.fail_after(TRANSFER_TIMEOUT):
                done = await self.client.exchange("GET", url.url, [], None, keep=False)
            if done.status != 200 or done.received != size:
                raise RuntimeError(f"GET answered {done.status} with {done.received} bytes")
            return done

        return await measured(size, self.pids, run)

    async def round(self, size: int, expected: str) -> tuple[Sample, Sample]:
        key = f"bench/{uuid.uuid4().hex}"
        try:
            put = await self.put(key, size, expected)
            if isinstance(self.store, S3Store):  # S3 answers an ETag, not a sha256
                info = await self.store.stat(key)
                if info.size != size:
                    raise RuntimeError(f"S3 stored {info.size} bytes, not {size}")
            get = await self.get(key, size)
        finally:
            await self.store.delete(key)
        return put, get


def _client(name: str, recv_size: int) -> Client:
    if name == "h11":
        return H11Client(recv_size)
    if name == "lean":
        return H11Client(recv_size, lean=True)
    if name == "httpx":
        return HttpxClient()
    raise SystemExit(f"unknown client {name!r} (lean, h11, httpx)")


#: Rows of the route mode's table: (label, what the ratio is taken against, or None).
UPLOAD_BASE, DOWNLOAD_BASE = "dd bs=1M conv=fsync", "cp"


async def route_mode(args: argparse.Namespace, sizes_mib: Sequence[int]) -> None:
    clients = [_client(name, args.recv_size) for name in args.clients.split(",")]
    block = os.urandom(MiB)  # random: nothing on the way can compress it
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "machine": _machine(),
        "sizes": {},
    }
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(dir=args.dir, prefix="visiona-storage-bench-")
        )
        work = Path(tmp)
        routes: list[RouteUnderTest] = []
        for number, repo in enumerate([REPO, *map(Path, args.compare_repo or ())]):
            tag = "" if number == 0 else f" [{repo.name}]"
            server = stack.enter_context(
                api_server(work / f"api-data{number}", work / f"api-server{number}.log", repo)
            )
            store = LocalFSStore(server.data_dir / "objects", signing_secret=SIGNING_SECRET)
            routes.append(RouteUnderTest(tag, server, store))
            print(f"api-server{tag} pid {server.proc.pid} at {server.url}", file=sys.stderr)
        print(f"data in {work}", file=sys.stderr)
        s3_endpoint: str | None = None
        if not args.no_s3:
            binary, reason = find_rclone()
            if binary is None:
                print(f"S3 skipped: {reason}", file=sys.stderr)
            else:
                s3_endpoint = stack.enter_context(rclone_serve_s3(binary)).endpoint
        if args.profile:
            await trio.Path(args.profile).mkdir(parents=True, exist_ok=True)
            stack.enter_context(
                py_spy(routes[0].server.proc.pid, Path(args.profile) / "api-server.py-spy.txt")
            )
        async with httpx.AsyncClient(timeout=60) as http:
            s3: S3Store | None = None
            rclone: int | None = None
            if s3_endpoint is not None:
                s3 = S3Store(s3_endpoint, "bench", REGION, ACCESS_KEY, SECRET_KEY, http)
                await s3.ensure_bucket()
                rclone = child_pid(b"serve\0s3")
            try:
                for size_mib in sizes_mib:
                    results["sizes"][str(size_mib)] = await _route_size(
                        args, work, size_mib, block, routes, s3, rclone, clients
                    )
            finally:
                for client in clients:
                    await client.aclose()
    if args.json:
        await trio.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    for size_mib in sizes_mib:
        print(route_table(results["sizes"][str(size_mib)], size_mib, args.rounds))


async def _route_size(
    args: argparse.Namespace,
    work: Path,
    size_mib: int,
    block: bytes,
    routes: Sequence[RouteUnderTest],
    s3: S3Store | None,
    rclone: int | None,
    clients: Sequence[Client],
) -> dict[str, list[dict[str, Any]]]:
    size = size_mib * MiB
    expected = body_sha256(size, block)
    source, copy = work / "source.bin", work / "copy.bin"
    with source.open("wb") as out:
        for chunk in body_chunks(size, block):
            out.write(chunk)
        os.fsync(out.fileno())
    rows: dict[str, list[dict[str, Any]]] = {}

    warm_up = True

    def record(label: str, sample: Sample) -> None:
        if not warm_up:
            rows.setdefault(label, []).append(dataclasses.asdict(sample))

    # Warm-up rounds first, not recorded: on a VM the first touch of memory the guest has
    # not used yet is slow (the host backs it lazily), and the page cache needs fresh pages.
    for number in range(1 - args.warmup, args.rounds + 1):
        warm_up = number < 1
        print(f"{size_mib} MiB, {'warm-up' if warm_up else f'round {number}'}", file=sys.stderr)
        # The copies first, then the route, then S3: each round sees the disk in one mood.
        # Each copy counts the median of --copies runs (one run of a copy varies more than
        # one of the route: the disk's flushes come and go).
        tries = args.copies
        record("cp", copy_sample(size, f"cp '{source}' '{copy}'", copy, tries))
        record(
            "cp + sync", copy_sample(size, f"cp '{source}' '{copy}' && sync '{copy}'", copy, tries)
        )
        dd = f"dd if='{source}' of='{copy}' bs=1M conv=fsync status=none"
        record(UPLOAD_BASE, copy_sample(size, dd, copy, tries))
        for client in clients:
            for under_test in routes:
                pids = {"server": under_test.server.proc.pid}
                url = under_test.server.url
                route = RouteTransfers(under_test.store, url, client, pids, block)
                put, get = await route.round(size, expected)
                record(f"PUT /storage ({client.name}){under_test.tag}", put)
                record(f"GET /storage ({client.name}){under_test.tag}", get)
        if s3 is not None:
            pids = {"server": rclone} if rclone is not None else {}
            remote = RouteTransfers(s3, routes[0].server.url, clients[0], pids, block)
            put, get = await remote.round(size, expected)
            record(f"S3 PUT, rclone ({clients[0].name})", put)
            record(f"S3 GET, rclone ({clients[0].name})", get)
    source.unlink()
    return rows


def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs, {model}, Python {sys.version.split()[0]}, trio {trio.__version__}"
    )


def _spread(values: Sequence[float], fmt: str) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return format(middle, fmt)
    return f"{middle:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _ratios(samples: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]]) -> str:
    ratios = [s["mbps"] / b["mbps"] for s, b in zip(samples, base, strict=True)]
    return f"**{statistics.median(ratios):.2f}x** (" + ", ".join(f"{r:.2f}" for r in ratios) + ")"


def route_table(rows: Mapping[str, Sequence[Mapping[str, Any]]], size_mib: int, rounds: int) -> str:
    """The markdown table: median (min-max) over the rounds; ratios per round."""
    lines = [
        f"{size_mib} MiB object, {rounds} rounds. MB/s = 10^6 B/s, median (min-max). Ratios"
        f" per round against `{UPLOAD_BASE}` (uploads; `cp + sync` after the semicolon) and"
        f" `{DOWNLOAD_BASE}` (downloads) of the same round. CPU: % of one core, then CPU"
        " seconds per GB moved (server: the api-server or rclone; for a copy, the copy's"
        " own). RSS: the server's before -> peak during the transfer (MiB).",
        "",
        "| transfer | MB/s | ratio per round | after last byte | server CPU | client CPU"
        " | others CPU | RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, samples in rows.items():
        ratio = "-"
        if "PUT" in label and UPLOAD_BASE in rows:
            ratio = _ratios(samples, rows[UPLOAD_BASE])
            if "cp + sync" in rows:
                ratio += "; " + _ratios(samples, rows["cp + sync"]).replace("**", "")
        elif "GET" in label and DOWNLOAD_BASE in rows:
            ratio = _ratios(samples, rows[DOWNLOAD_BASE])

        def cpu(
            *parties: str, samples: Sequence[Mapping[str, Any]] = samples, per_gb: bool = True
        ) -> str:
            values = [s["cpu"][p] for s in samples for p in parties if p in s["cpu"]]
            if not values:
                return "-"
            # % of a core x seconds / GB moved = CPU seconds per GB
            seconds = [
                s["cpu"][p] / 100 * s["seconds"] * 1000 / (s["mbps"] * s["seconds"])
                for s in samples
                for p in parties
                if p in s["cpu"]
            ]
            per = f", {statistics.median(seconds):.2f} s/GB" if per_gb else ""
            return f"{statistics.median(values):.0f}%{per}"

        rss = "-"
        before = [s["rss_before"]["server"] for s in samples if "server" in s["rss_before"]]
        peak = [s["rss_peak"]["server"] for s in samples if "server" in s["rss_peak"]]
        if before and peak:
            rss = f"{max(before):.0f} -> {max(peak):.0f}"
        tail = "-"
        if "PUT" in label:
            tail = _spread([1000 * s["after_sent"] for s in samples], ".0f") + " ms"
        mbps = _spread([s["mbps"] for s in samples], ".0f")
        lines.append(
            f"| {label} | {mbps} | {ratio} | {tail} | {cpu('server', 'copy')}"
            f" | {cpu('client')} | {cpu('others', per_gb=False)} | {rss} |"
        )
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("store", "route"), default="store")
    parser.add_argument(
        "--size-mib", default="256", help="object size in MiB; route mode: a list, 256,1024"
    )
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3, help="route mode: rounds")
    parser.add_argument(
        "--warmup", type=int, default=1, help="route mode: unrecorded rounds before"
    )
    parser.add_argument(
        "--copies", type=int, default=3, help="route mode: runs of each copy per round (median)"
    )
    parser.add_argument(
        "--clients", default="lean", help="route mode: lean, h11, httpx, comma-separated"
    )
    parser.add_argument(
        "--recv-size", type=int, default=256 * KiB, help="route mode: the h11 client's reads"
    )
    parser.add_argument("--no-s3", action="store_true", help="route mode: skip rclone")
    parser.add_argument(
        "--compare-repo",
        action="append",
        help="route mode: also the api-server of this checkout (e.g. before a change)",
    )
    parser.add_argument("--json", default=None, help="route mode: every sample, to this file")
    parser.add_argument(
        "--profile", default=None, help="route mode: py-spy the api-server, output in this dir"
    )
    args = parser.parse_args()
    sizes = [int(part) for part in args.size_mib.split(",")]
    if args.mode == "store":
        for size_mib in sizes:
            await store_mode(args, size_mib)
    else:
        await route_mode(args, sizes)


if __name__ == "__main__":
    trio.run(main)
