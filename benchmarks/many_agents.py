"""Many agents on one remote-proxy (loopback): memory, idle CPU, connect and restart storms.

Run it (from the repository root)::

    .venv/bin/python benchmarks/many_agents.py --agents 1000,3000
    .venv/bin/python benchmarks/many_agents.py --agents 10000 --loads 4 --json /tmp/many.json

Parties, each its own process on 127.0.0.1:

* **proxy**: ``python -m visiona_services.remote_proxy``, its device tokens in a file
  (``VISIONA_PROXY_STATIC_TOKENS_FILE``, one ``token=device`` line per agent), its handshake
  caps raised for agents that all come from one address
  (``VISIONA_TUNNEL_MAX_HANDSHAKES_PER_ADDRESS`` = ``VISIONA_TUNNEL_MAX_HANDSHAKES``).
* **loads** (``--loads``, 2): this module with ``--role agents``, each running its share of
  the N agents as ``TunnelClient`` s (the library's defaults: jittered backoff, spread
  redials) in one trio process, and a small local HTTP server the forwards reach. Each
  prints one JSON line a second: agents online, dial attempts so far.

The orchestrator raises its descriptor limit to the hard limit (the children inherit it)
and reports it. For each N:

1. **cold connect**: the loads start at once, every agent dialling; the time until the
   proxy's ``/internal/health`` counts N tunnels.
2. **idle**: after 5 s, the proxy's RSS (``VmRSS``) against its RSS before the first agent,
   per tunnel, and its CPU over 10 s (% of one core).
3. **forwards**: ``--forwards`` (500) ``GET /internal/forward/<device>/small`` to random
   devices, one after another on a kept-alive connection: p50, p99, max latency.
4. **restart storm** (unless ``--no-restart``): SIGTERM the proxy, start a new one on the
   same ports, and time from the new one's internal API answering until all N are back;
   the dial attempts the agents made meanwhile (per agent); and the slowest answer of
   ``/internal/health``, polled every 100 ms throughout.
5. **garbage collection**: the longest collection of the first proxy, and its generation
   (``visiona_gc_longest_pause_seconds``, read after the forwards): the event loop stands
   still for that long.

Nothing here is a test: no assertion on speed; the table goes to docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import random
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import h11
import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.procstat import cpu_seconds  # noqa: E402
from visiona_services.common.lifecycle import GC_THRESHOLDS  # noqa: E402
from visiona_tunnel.client import ClientConfig, ClientHooks, TunnelClient  # noqa: E402

HOST = "127.0.0.1"
#: The body of the local server's ``GET /small``.
SMALL_BODY = b"x" * 100
#: How many forwards are in flight at once in the latency step (one: latency, not load).
FORWARD_CONCURRENCY = 1


# -- the load processes ---------------------------------------------------------------------


async def _serve_local(stream: trio.SocketStream) -> None:
    """The agents' local server: ``GET /small`` -> 100 bytes, keep-alive."""
    conn = h11.Connection(h11.SERVER)
    with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = h11.Response(status_code=200, headers=[("Content-Length", "100")])
                await stream.send_all(
                    conn.send(head)
                    + conn.send(h11.Data(data=SMALL_BODY))
                    + conn.send(h11.EndOfMessage())
                )
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            else:
                return


async def run_agents(relay_url: str, first: int, count: int, restart_spread: float) -> None:
    """``count`` agents, tokens ``token-<first>`` ..., until stdin closes."""
    logging.getLogger("visiona_tunnel").setLevel(logging.CRITICAL)  # thousands of agents
    # The agents stand for thousands of separate devices: this process's own collector
    # must not pause them all at once and pass for the proxy's latency (the services'
    # settings, for the same reason).
    gc.set_threshold(*GC_THRESHOLDS)
    dials = 0
    online = 0

    def dialled(attempt: int) -> None:
        nonlocal dials
        dials += 1

    def up() -> None:
        nonlocal online
        online += 1

    def down(error: BaseException | None) -> None:
        nonlocal online
        online -= 1

    hooks = ClientHooks(on_dial_attempt=dialled, on_session_up=up, on_session_down=down)
    config = ClientConfig(restart_spread=restart_spread)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _serve_local, 0, host=HOST)
        )
        local = (HOST, listeners[0].socket.getsockname()[1])
        for n in range(first, first + count):
            client = TunnelClient(relay_url, f"token-{n}", local, hooks=hooks, config=config)
            nursery.start_soon(client.run)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with trio.open_nursery() as reporting:

            async def report() -> None:
                while True:
                    print(json.dumps({"online": online, "dials": dials}), flush=True)
                    await trio.sleep(1)

            reporting.start_soon(report)
            while await stdin.receive_some():  # closed by the orchestrator: stop
                pass
            reporting.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


# -- the orchestrator -----------------------------------------------------------------------


class Load:
    """A load process and its latest status line."""

    def __init__(self, relay_url: str, first: int, count: int, restart_spread: float) -> None:
        command = [
            sys.executable,
            "-m",
            "benchmarks.many_agents",
            "--role",
            "agents",
            "--relay-url",
            relay_url,
            "--first",
            str(first),
            "--count",
            str(count),
            "--restart-spread",
            str(restart_spread),
        ]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "VISIONA_LOG_LEVEL": "critical"},
        )
        self.status: dict[str, int] = {"online": 0, "dials": 0}
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[str] | None) -> None:
        assert stdout is not None
        for line in stdout:
            with contextlib.suppress(ValueError):
                self.status = json.loads(line)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Proxy:
    def __init__(self, tunnel_port: int, internal_port: int, tokens_file: str) -> None:
        self.internal_port = internal_port
        self.secret = secrets.token_urlsafe(24)
        self.env = {
            **os.environ,
            "VISIONA_TUNNEL_HOST": HOST,
            "VISIONA_TUNNEL_PORT": str(tunnel_port),
            "VISIONA_PROXY_INTERNAL_HOST": HOST,
            "VISIONA_PROXY_INTERNAL_PORT": str(internal_port),
            "VISIONA_INTERNAL_SECRET": self.secret,
            "VISIONA_ENV": "production",
            "VISIONA_LOG_LEVEL": "error",
            "VISIONA_PROXY_SHUTDOWN_GRACE": "1",
            "VISIONA_PROXY_STATIC_TOKENS_FILE": tokens_file,
            # Every agent comes from 127.0.0.1 here.
            "VISIONA_TUNNEL_MAX_HANDSHAKES_PER_ADDRESS": "256",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = self.internal_client(timeout=30)

    def internal_client(self, *, timeout: float) -> httpx.Client:
        """A client of the internal API (kept-alive connections, the secret sent)."""
        return httpx.Client(
            base_url=f"http://{HOST}:{self.internal_port}",
            headers={"Authorization": f"Bearer {self.secret}"},
            timeout=timeout,
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visiona_services.remote_proxy"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while self.tunnels() is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the remote-proxy did not start")
            time.sleep(0.05)

    def tunnels(self) -> int | None:
        """Live tunnels (``/internal/health``), None if it does not answer."""
        try:
            answer = self.client.get("/internal/health", timeout=5).json()
            return int(answer["data"]["tunnels"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def gc_pauses(self) -> dict[str, float]:
        """The garbage collector's longest pause and total pause so far, by generation
        (``/metrics``), in seconds: ``{"longest 0": ..., "total 2": ...}``."""
        found: dict[str, float] = {}
        names = {
            "visiona_gc_longest_pause_seconds": "longest",
            "visiona_gc_pause_seconds_total": "total",
        }
        for line in self.client.get("/metrics").text.splitlines():
            name, _, rest = line.partition('{generation="')
            if name in names and rest:
                found[f"{names[name]} {rest[0]}"] = float(line.split()[-1])
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def _dials(loads: Sequence[Load]) -> int:
    return sum(load.status["dials"] for load in loads)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind((HOST, 0))
        return [each.getsockname()[1] for each in sockets]
    finally:
        for each in sockets:
            each.close()


def _wait_for(proxy: Proxy, count: int, limit: float, loads: Sequence[Load]) -> float | None:
    """Seconds until the proxy holds ``count`` tunnels, None after ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if any(load.proc.poll() is not None for load in loads):
            raise RuntimeError("a load process exited")
        if (proxy.tunnels() or 0) >= count:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _forwards(proxy: Proxy, agents: int, count: int) -> dict[str, float]:
    """Latency of ``count`` small forwards to random devices, in ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    todo = iter(range(count))

    def worker() -> None:
        with proxy.internal_client(timeout=30) as client:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                device = f"device-{random.randrange(agents)}"
                start = time.perf_counter()
                response = client.get(f"/internal/forward/{device}/small")
                elapsed = (time.perf_counter() - start) * 1000
                if response.status_code == 200 and response.content == SMALL_BODY:
                    with lock:
                        latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(FORWARD_CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "ok": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": max(latencies),
    }


@contextlib.contextmanager
def _health_poller(proxy: Proxy) -> Iterator[list[float]]:
    """The latency (ms) of ``/internal/health`` every 100 ms while the block runs; a
    request that fails counts as its time to fail."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with proxy.internal_client(timeout=10) as client:
            while not done.wait(0.1):
                start = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/internal/health")
                latencies.append((time.perf_counter() - start) * 1000)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        done.set()
        thread.join()


def measure(args: argparse.Namespace, agents: int) -> dict[str, Any]:
    loads, forwards, restart, limit = args.loads, args.forwards, not args.no_restart, args.limit
    record: dict[str, Any] = {
        "agents": agents,
        "loads": loads,
        "restart_spread": args.restart_spread,
    }
    tunnel_port, internal_port = _free_ports(2)
    with tempfile.TemporaryDirectory() as workdir:
        tokens_file = Path(workdir) / "tokens"
        tokens_file.write_text("".join(f"token-{n}=device-{n}\n" for n in range(agents)))
        tokens_file.chmod(0o600)
        proxy = Proxy(tunnel_port, internal_port, str(tokens_file))
        proxy.start()
        relay_url = f"ws://{HOST}:{tunnel_port}/tunnel/connect"
        running: list[Load] = []
        try:
            time.sleep(1)
            rss_before = proxy.rss_bytes()
            share = -(-agents // loads)
            running = [
                Load(relay_url, first, min(share, agents - first), args.restart_spread)
                for first in range(0, agents, share)
            ]
            record["connect_s"] = _wait_for(proxy, agents, limit, running)
            if record["connect_s"] is None:
                record["connected"] = proxy.tunnels()
                return record
            time.sleep(5)  # the loads' status lines have caught up too
            record["connect_dials_per_agent"] = _dials(running) / agents
            record["rss_per_tunnel_kb"] = (proxy.rss_bytes() - rss_before) / agents / 1024
            record["rss_mb"] = proxy.rss_bytes() / 2**20
            cpu_start, wall_start = cpu_seconds(proxy.pid), time.monotonic()
            time.sleep(10)
            cpu_end = cpu_seconds(proxy.pid)
            if cpu_start is not None and cpu_end is not None:
                record["idle_cpu_pct"] = (
                    100 * (cpu_end - cpu_start) / (time.monotonic() - wall_start)
                )
            record["forwards"] = _forwards(proxy, agents, forwards)
            record["gc"] = pauses = proxy.gc_pauses()
            longest = max((pauses.get(f"longest {n}", 0.0), n) for n in range(3))
            record["gc_longest_pause_ms"], record["gc_longest_generation"] = (
                1000 * longest[0],
                longest[1],
            )
            if restart:
                dials_before = _dials(running)
                proxy.stop()
                with _health_poller(proxy) as latencies:
                    proxy.start()
                    back = _wait_for(proxy, agents, limit, running)
                    time.sleep(1)
                record["restart_back_s"] = back
                record["restart_dials_per_agent"] = (_dials(running) - dials_before) / agents
                # From the new proxy's start on (it answers by then): the slowest answer.
                record["restart_health_max_ms"] = max(latencies, default=None)
        finally:
            for load in running:
                load.stop()
            proxy.stop()
    return record


def _row(record: dict[str, Any]) -> str:
    def num(key: str, digits: int = 1) -> str:
        value = record.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    forwards = record.get("forwards") or {}
    latency = (
        f"{forwards['p50_ms']:.1f} / {forwards['p99_ms']:.1f} / {forwards['max_ms']:.1f}"
        if forwards
        else "-"
    )
    cells = [
        f"{record['agents']:,}",
        f"{num('connect_s')} s ({num('connect_dials_per_agent', 2)} dials per agent)",
        f"{num('rss_mb', 0)} MB",
        f"{num('rss_per_tunnel_kb')} KB",
        f"{num('idle_cpu_pct')}%",
        latency,
        f"{num('restart_back_s')} s",
        num("restart_dials_per_agent", 2),
        f"{num('restart_health_max_ms', 0)} ms",
        f"{num('gc_longest_pause_ms', 0)} ms (generation {record.get('gc_longest_generation')})",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["orchestrator", "agents"], default="orchestrator")
    parser.add_argument("--agents", default="1000,3000", help="comma list of N")
    parser.add_argument("--loads", type=int, default=2, help="load processes")
    parser.add_argument("--forwards", type=int, default=500)
    parser.add_argument("--no-restart", action="store_true")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds to wait for all")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--relay-url", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--restart-spread",
        type=float,
        default=ClientConfig().restart_spread,
        help="the agents' ClientConfig.restart_spread (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.role == "agents":
        trio.run(run_agents, args.relay_url, args.first, args.count, args.restart_spread)
        return 0
    print(
        f"# many_agents: {time.strftime('%Y-%m-%d %H:%M:%S %z')}, {os.cpu_count()} CPUs, "
        f"descriptors {hard} (soft was {soft}), {args.loads} load processes",
        flush=True,
    )
    print(
        "| agents | cold connect | proxy RSS | RSS per tunnel | idle CPU | forward p50 / p99 / "
        "max (ms) | restart: all back | dials per agent | slowest /internal/health | "
        "longest GC pause |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    records = []
    for agents in (int(n) for n in args.agents.split(",")):
        record = measure(args, agents)
        records.append(record)
        print(_row(record), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
