"""Run the Go yamux peer (``yamuxpeer/main.go``) against a ``visiona_tunnel.yamux`` session.

``go_session`` starts the peer, connects one TCP connection on 127.0.0.1, runs our yamux
session over it and, when the body is done, closes the session and requires the peer to
exit with status 0 (it exits non-zero when any of its own checks failed). Whatever goes
wrong, the peer's stderr is attached to the error as a note.

The Python side always ends the session; the peer reports checks it made on its own by
printing ``DONE <what>`` on stdout (``GoPeer.expect_line``).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from support.data import pattern as pattern
from support.data import sha256_hex as sha256_hex
from support.streams import pump_lines
from support.streams import receive_exactly as receive_exactly

from visiona_tunnel.yamux import Config, Session, Stream, open_session

#: Upper bound for one test, setup and teardown included; the peer gets the same limit.
DEFAULT_TIMEOUT = 30.0


class GoPeer:
    """A running ``yamuxpeer`` process: its stdout lines and its stderr."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._lines_in, self._lines_out = trio.open_memory_channel[str](math.inf)
        self._stderr = bytearray()
        self._stderr_done = trio.Event()

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    async def next_line(self) -> str:
        """The next line the peer printed on stdout, without the newline."""
        try:
            return await self._lines_out.receive()
        except trio.EndOfChannel:
            raise AssertionError("the Go peer closed its stdout (exited?)") from None

    async def expect_line(self, expected: str) -> None:
        line = await self.next_line()
        assert line == expected, f"Go peer printed {line!r}, expected {expected!r}"

    async def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        async with self._lines_in:
            await pump_lines(self.process.stdout, self._take_line)

    def _take_line(self, line: bytes) -> None:
        self._lines_in.send_nowait(line.decode())

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        try:
            async with self.process.stderr as pipe:
                while chunk := await pipe.receive_some():
                    self._stderr += chunk
        finally:
            self._stderr_done.set()

    async def _stop(self) -> None:
        """Kill the peer if it still runs; wait for it and for all of its stderr."""
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
            await self._stderr_done.wait()


@asynccontextmanager
async def go_session(
    binary: Path,
    *,
    python_client: bool,
    config: Config | None = None,
    scenario: str = "serve",
    go_args: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[tuple[Session, GoPeer]]:
    """Our yamux session connected to a Go peer playing the other yamux role.

    The Go yamux server listens and the Go yamux client dials, so both TCP directions are
    covered too.
    """
    go_role = "server" if python_client else "client"
    command = [str(binary), "-role", go_role, "-scenario", scenario, "-timeout", f"{timeout}s"]
    command += go_args
    listener: trio.SocketListener | None = None
    if python_client:
        command += ["-listen", "127.0.0.1:0"]
    else:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        command += ["-connect", f"127.0.0.1:{port}"]
    try:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except BaseException:
        if listener is not None:
            await listener.aclose()
        raise
    peer = GoPeer(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer._pump_stdout)
        nursery.start_soon(peer._pump_stderr)
        try:
            with trio.fail_after(timeout):
                transport: trio.SocketStream
                if listener is None:
                    line = await peer.next_line()
                    assert line.startswith("LISTENING "), line
                    transport = await trio.open_tcp_stream("127.0.0.1", int(line.split()[1]))
                else:
                    async with listener:
                        transport = await listener.accept()
                async with open_session(transport, client=python_client, config=config) as session:
                    yield session, peer
                # Our session is closed: the peer sees EOF and exits.
                await process.wait()
            assert process.returncode == 0, f"Go peer exited with {process.returncode}"
        except BaseException as exc:
            await peer._stop()
            exc.add_note(f"Go peer ({' '.join(command)}) stderr:\n{peer.stderr}")
            raise
        finally:
            await peer._stop()


async def receive_line(stream: Stream) -> bytes:
    """One line the peer wrote, when nothing follows it until we reply."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {bytes(data)!r}"
        data += chunk
    assert data.count(b"\n") == 1, f"more than one line: {bytes(data)!r}"
    return bytes(data)


async def receive_to_eof(stream: Stream) -> tuple[int, str]:
    """Read until the peer's FIN; return the byte count and the sha256 hex digest."""
    digest = hashlib.sha256()
    count = 0
    while chunk := await stream.receive_some():
        digest.update(chunk)
        count += len(chunk)
    return count, digest.hexdigest()


async def expect_eof(stream: Stream) -> None:
    assert await stream.receive_some() == b"", "expected EOF (the peer's FIN)"


async def echo(stream: Stream) -> None:
    """Echo until the peer's FIN, then send ours."""
    async with stream:
        while chunk := await stream.receive_some():
            await stream.send_all(chunk)
