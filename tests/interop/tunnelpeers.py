"""The Go tunnel peers (``tunnelpeers/``): build them, run them under trio, read their events.

``goagent`` mirrors the seed's Go tunnel client; ``gorelay`` is a Go relay with a plain
HTTP front. Their command lines and the stdout lines they print are documented at the
top of ``tunnelpeers/cmd/goagent/main.go`` and ``tunnelpeers/cmd/gorelay/main.go``.

A peer is started in a nursery the caller owns (``start_go_relay``, ``start_go_agent``).
Its task ends when the process exits; when the nursery is cancelled first, it sends
SIGTERM (SIGKILL after ``STOP_TIMEOUT``). The peer's stderr is printed when its task ends,
so pytest shows it for a failed test. Tests wait for stdout lines instead of sleeping;
every wait here is bounded by ``LINE_TIMEOUT``.
"""

from __future__ import annotations

import functools
import math
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .gobuild import BUILD_DIR, GORILLA_SOURCE, INTEROP_DIR, YAMUX_SOURCE, go_build

TUNNEL_PEERS_SOURCE = INTEROP_DIR / "tunnelpeers"
#: How long one wait for a stdout line may take.
LINE_TIMEOUT = 10.0
#: How long a peer gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0
#: The relay's close code for "replaced by a newer connection for the same token".
CLOSE_REPLACED = 4001


@dataclass(frozen=True)
class TunnelPeerBinaries:
    agent: Path
    relay: Path
    #: A Go reverse proxy: the benchmarks' yardstick for one more HTTP hop.
    hop: Path


@functools.cache
def build_tunnel_peers(build_dir: Path = BUILD_DIR) -> TunnelPeerBinaries:
    """Build ``goagent``, ``gorelay`` and ``gohop`` once (per process), offline.

    Raises ``gobuild.GoToolchainMissing`` or ``gobuild.GoBuildFailed``.
    """
    output = build_dir / "tunnelpeers"
    go_build(
        TUNNEL_PEERS_SOURCE,
        output,
        ["./cmd/..."],
        required_sources=[YAMUX_SOURCE, GORILLA_SOURCE],
        build_dir=build_dir,
    )
    return TunnelPeerBinaries(
        agent=output / "goagent", relay=output / "gorelay", hop=output / "gohop"
    )


class PeerProcess:
    """A running Go peer: its stdout as a queue of lines, its stderr kept whole."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        #: Every stdout line so far, including those a wait skipped.
        self.history: list[str] = []
        self._lines_in, self._lines_out = trio.open_memory_channel[str](math.inf)
        self._stderr = bytearray()

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    async def next_line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next stdout line, without the newline."""
        with trio.fail_after(timeout):
            try:
                return await self._lines_out.receive()
            except trio.EndOfChannel:
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}); stdout: {self.history}"
                ) from None

    async def expect(self, line: str, timeout: float = LINE_TIMEOUT) -> None:
        """The next stdout line must be ``line``."""
        got = await self.next_line(timeout)
        assert got == line, f"{self.name} printed {got!r}, expected {line!r}"

    async def wait_for(self, prefix: str, timeout: float = LINE_TIMEOUT) -> str:
        """Skip stdout lines until one starts with ``prefix``; return it."""
        with trio.fail_after(timeout):
            while not (line := await self.next_line(math.inf)).startswith(prefix):
                pass
        return line

    async def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit; return the exit status (0 is a clean exit)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.process.wait()

    # The pumps are shielded so that they read to EOF, which comes once the process has
    # exited; _supervise makes sure it does.

    async def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        with trio.CancelScope(shield=True):
            async with self.process.stdout as pipe, self._lines_in:
                while chunk := await pipe.receive_some():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace")
                        self.history.append(line)
                        self._lines_in.send_nowait(line)

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        with trio.CancelScope(shield=True):
            async with self.process.stderr as pipe:
                while chunk := await pipe.receive_some():
                    self._stderr += chunk

    async def _stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def _supervise(
    name: str,
    command: Sequence[str],
    *,
    task_status: trio.TaskStatus[PeerProcess] = trio.TASK_STATUS_IGNORED,
) -> None:
    process = await trio.lowlevel.open_process(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peer = PeerProcess(name, process)
    try:
        async with trio.open_nursery() as pumps:
            pumps.start_soon(peer._pump_stdout)
            pumps.start_soon(peer._pump_stderr)
            task_status.started(peer)
            try:
                await process.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await peer._stop()
    finally:
        print(
            f"--- {name} ({' '.join(command)}) exited {process.returncode}; stderr:\n{peer.stderr}",
            file=sys.stderr,
        )


async def start_peer(nursery: trio.Nursery, name: str, command: Sequence[str]) -> PeerProcess:
    """Run ``command`` in ``nursery``; stopped (SIGTERM) when the nursery is cancelled."""
    peer: PeerProcess = await nursery.start(functools.partial(_supervise, name, command))
    return peer


class GoRelay:
    """A running ``gorelay``: its ports and its ``AGENT CONNECTED/DISCONNECTED`` events."""

    def __init__(self, peer: PeerProcess, tunnel_port: int, http_port: int) -> None:
        self.peer = peer
        self.tunnel_port = tunnel_port
        self.http_port = http_port

    @property
    def tunnel_url(self) -> str:
        """What an agent dials (without the token)."""
        return f"ws://127.0.0.1:{self.tunnel_port}/tunnel/connect"

    async def next_event(self, timeout: float = LINE_TIMEOUT) -> tuple[str, str]:
        """The next ``AGENT CONNECTED|DISCONNECTED <device>`` line as (kind, device)."""
        line = await self.peer.next_line(timeout)
        agent, kind, device = line.split(" ")
        assert agent == "AGENT" and kind in {"CONNECTED", "DISCONNECTED"}, line
        return kind, device

    async def expect_connected(self, device: str, timeout: float = LINE_TIMEOUT) -> None:
        await self.peer.expect(f"AGENT CONNECTED {device}", timeout)

    async def expect_disconnected(self, device: str, timeout: float = LINE_TIMEOUT) -> None:
        await self.peer.expect(f"AGENT DISCONNECTED {device}", timeout)


async def start_go_relay(
    nursery: trio.Nursery,
    binaries: TunnelPeerBinaries,
    tokens: Mapping[str, str],
    *,
    tunnel_port: int = 0,
) -> GoRelay:
    """Start ``gorelay`` on loopback; ``tokens`` maps token -> device id. The tunnel
    listener takes ``tunnel_port`` (e.g. a restarted relay's old one), free by default;
    the HTTP front a free port."""
    command = [
        str(binaries.relay),
        "-listen",
        f"127.0.0.1:{tunnel_port}",
        "-http",
        "127.0.0.1:0",
        "-tokens",
        ",".join(f"{token}={device}" for token, device in tokens.items()),
    ]
    peer = await start_peer(nursery, "gorelay", command)
    tunnel_line = await peer.next_line()
    http_line = await peer.next_line()
    assert tunnel_line.startswith("TUNNEL LISTENING "), tunnel_line
    assert http_line.startswith("HTTP LISTENING "), http_line
    return GoRelay(peer, int(tunnel_line.split()[2]), int(http_line.split()[2]))


@dataclass(frozen=True)
class Retry:
    """An ``AGENT RETRY <attempt> <delay> <why>`` line."""

    attempt: int
    delay: str  # a Go duration: "1s", "30s", "1m0s"
    why: str  # dial-failed, replaced or unauthorized


class GoAgent:
    """A running ``goagent``: its ``AGENT ONLINE/OFFLINE/RETRY`` events, in order."""

    def __init__(self, peer: PeerProcess) -> None:
        self.peer = peer

    async def expect_online(self, timeout: float = LINE_TIMEOUT) -> None:
        await self.peer.expect("AGENT ONLINE", timeout)

    async def expect_offline(self, timeout: float = LINE_TIMEOUT) -> str:
        """Wait for the next line, which must be ``AGENT OFFLINE <reason>``; return reason."""
        line = await self.peer.next_line(timeout)
        assert line.startswith("AGENT OFFLINE "), f"expected AGENT OFFLINE, got {line!r}"
        return line.removeprefix("AGENT OFFLINE ")

    async def expect_retry(self, timeout: float = LINE_TIMEOUT) -> Retry:
        line = await self.peer.next_line(timeout)
        agent, retry, attempt, delay, why = line.split(" ")
        assert (agent, retry) == ("AGENT", "RETRY"), f"expected AGENT RETRY, got {line!r}"
        return Retry(int(attempt), delay, why)

    async def terminate(self) -> int:
        return await self.peer.terminate()


async def start_go_agent(
    nursery: trio.Nursery,
    binaries: TunnelPeerBinaries,
    *,
    relay_url: str,
    token: str,
    local: str,
    extra_args: Sequence[str] = (),
) -> GoAgent:
    """Start ``goagent``; it dials at once (wait for ``expect_online``)."""
    command = [str(binaries.agent), "-relay-url", relay_url, "-token", token, "-local", local]
    command += extra_args
    return GoAgent(await start_peer(nursery, "goagent", command))
