"""visiona_tunnel.yamux against hashicorp/yamux (Debian's df201c7 snapshot) in a Go process.

Every test runs in both yamux roles: ``py-client`` (we open odd ids and dial a Go server)
and ``py-server`` (a Go client dials us; we open even ids). The Go peer's protocol, its
commands and scenarios, is described at the top of ``yamuxpeer/main.go``. A test passes
only if our side's checks pass *and* the peer exits with status 0 (its own checks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from visiona_tunnel.client import TUNNEL_YAMUX_CONFIG
from visiona_tunnel.yamux import Config, GoAwayError, Session, Stream, StreamReset

from .gopeer import (
    echo,
    expect_eof,
    go_session,
    pattern,
    receive_exactly,
    receive_line,
    receive_to_eof,
    sha256_hex,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
WINDOW_16MIB = 16 * MiB


@pytest.fixture(params=[True, False], ids=["py-client", "py-server"])
def python_client(request: pytest.FixtureRequest) -> bool:
    """Our yamux role; the Go peer plays the other one."""
    value: bool = request.param
    return value


def our_parity(python_client: bool) -> int:
    """Stream ids we open are odd as client, even as server."""
    return 1 if python_client else 0


async def open_command(session: Session, command: str) -> Stream:
    stream = await session.open_stream()
    await stream.send_all(command.encode() + b"\n")
    return stream


async def echo_round_trip(session: Session, offset: int, size: int) -> int:
    """Send ``pattern(offset, size)`` to the peer's echo while reading it back."""
    stream = await open_command(session, "echo")
    data = pattern(offset, size)
    result: tuple[int, str] = (0, "")

    async def read_back() -> None:
        nonlocal result
        result = await receive_to_eof(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_back)
        await stream.send_all(data)
        await stream.send_eof()
    assert result == (size, sha256_hex(data)), f"stream {stream.stream_id}: echo differs"
    await stream.aclose()
    return stream.stream_id


async def test_64_streams_of_4mib_echo_byte_exact(yamuxpeer: Path, python_client: bool) -> None:
    async with (
        go_session(yamuxpeer, python_client=python_client, timeout=60) as (session, _),
        trio.open_nursery() as nursery,
    ):
        for k in range(64):
            nursery.start_soon(echo_round_trip, session, k, 4 * MiB)


async def test_64_streams_of_4mib_opened_by_go_echo_byte_exact(
    yamuxpeer: Path, python_client: bool
) -> None:
    go_args = ["-streams", "64", "-size", str(4 * MiB)]
    async with (
        go_session(
            yamuxpeer,
            python_client=python_client,
            scenario="open-echo",
            go_args=go_args,
            timeout=60,
        ) as (session, peer),
        trio.open_nursery() as nursery,
    ):
        for _ in range(64):
            stream = await session.accept_stream()
            assert stream.stream_id % 2 != our_parity(python_client)
            nursery.start_soon(echo, stream)
        await peer.expect_line("DONE open-echo")  # the Go side compared every byte


async def test_streams_opened_by_both_sides_in_one_session(
    yamuxpeer: Path, python_client: bool
) -> None:
    go_args = ["-streams", "8", "-size", str(MiB)]
    ours: list[int] = []
    theirs: list[int] = []

    async def open_ours(k: int) -> None:
        ours.append(await echo_round_trip(session, k, MiB))

    async def accept_theirs() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                stream = await session.accept_stream()
                theirs.append(stream.stream_id)
                nursery.start_soon(echo, stream)

    async with go_session(
        yamuxpeer, python_client=python_client, scenario="open-echo", go_args=go_args
    ) as (session, peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_theirs)
            for k in range(8):
                nursery.start_soon(open_ours, k)
        await peer.expect_line("DONE open-echo")
    assert {i % 2 for i in ours} == {our_parity(python_client)}
    assert {i % 2 for i in theirs} == {1 - our_parity(python_client)}
    assert len(set(ours)) == len(set(theirs)) == 8


async def test_after_our_send_eof_we_still_read_the_reply(
    yamuxpeer: Path, python_client: bool
) -> None:
    data = pattern(3, MiB)
    async with go_session(yamuxpeer, python_client=python_client) as (session, _):
        stream = await open_command(session, "sink")
        await stream.send_all(data)
        await stream.send_eof()
        assert await receive_line(stream) == sha256_hex(data).encode() + b"\n"
        await expect_eof(stream)
        await stream.aclose()


async def test_after_go_closes_first_we_see_eof_and_can_still_write(
    yamuxpeer: Path, python_client: bool
) -> None:
    async with go_session(yamuxpeer, python_client=python_client) as (session, peer):
        stream = await open_command(session, "close-first 100000 50000")
        assert await receive_exactly(stream, 100000) == pattern(0, 100000)
        await expect_eof(stream)
        await stream.send_all(pattern(0, 50000))
        await stream.send_eof()
        await peer.expect_line("DONE close-first")  # Go got our 50000 bytes after its FIN
        await stream.aclose()


async def test_our_ping_returns_positive_rtt(yamuxpeer: Path, python_client: bool) -> None:
    async with go_session(yamuxpeer, python_client=python_client) as (session, _):
        for _ in range(3):
            rtt = await session.ping()
            assert isinstance(rtt, float)
            assert rtt > 0


async def test_go_ping_is_answered(yamuxpeer: Path, python_client: bool) -> None:
    async with go_session(yamuxpeer, python_client=python_client, scenario="ping") as (_, peer):
        await peer.expect_line("DONE ping")  # five Session.Ping() calls succeeded


async def test_go_goaway_refuses_our_open_but_existing_stream_works(
    yamuxpeer: Path, python_client: bool
) -> None:
    async with go_session(yamuxpeer, python_client=python_client) as (session, _):
        stream = await open_command(session, "goaway")
        # Go wrote this line after its GoAway frame, so the GoAway has arrived.
        assert await receive_line(stream) == b"goaway sent\n"
        with pytest.raises(GoAwayError) as excinfo:
            await session.open_stream()
        assert excinfo.value.remote
        assert excinfo.value.code == 0
        await stream.send_all(b"still here")
        assert await receive_exactly(stream, 10) == b"still here"
        await stream.send_eof()
        await expect_eof(stream)
        await stream.aclose()


async def test_our_go_away_refuses_go_streams_but_existing_stream_works(
    yamuxpeer: Path, python_client: bool
) -> None:
    async with go_session(yamuxpeer, python_client=python_client) as (session, _):
        stream = await open_command(session, "open-after-goaway")
        await session.go_away()
        await stream.send_all(b"go\n")
        # Go's OpenStream failed with ErrRemoteGoAway, or its SYN got our RST.
        assert await receive_line(stream) in (b"ok remote-goaway\n", b"ok reset\n")
        await expect_eof(stream)
        await stream.aclose()


async def test_go_backlog_overflow_resets_our_excess_streams(
    yamuxpeer: Path, python_client: bool
) -> None:
    go_args = ["-backlog", "4"]
    async with go_session(
        yamuxpeer, python_client=python_client, scenario="no-accept", go_args=go_args
    ) as (session, _):
        streams = [await session.open_stream() for _ in range(8)]
        for stream in streams[:4]:
            await stream.send_all(b"queued")  # waiting in Go's backlog, not reset
        for stream in streams[4:]:
            with pytest.raises(StreamReset):
                await stream.receive_some()
            with pytest.raises(StreamReset):
                await stream.send_all(b"too late")


async def test_our_backlog_overflow_resets_go_excess_streams(
    yamuxpeer: Path, python_client: bool
) -> None:
    go_args = ["-streams", "8", "-peer-backlog", "4"]
    config = Config(accept_backlog=4)
    async with go_session(
        yamuxpeer,
        python_client=python_client,
        config=config,
        scenario="open-unaccepted",
        go_args=go_args,
    ) as (_, peer):
        # We never accept. Go checks that exactly its streams 5..8 were reset.
        await peer.expect_line("DONE open-unaccepted")


async def test_16mib_window_go_sends_40mib_byte_exact(yamuxpeer: Path, python_client: bool) -> None:
    size = 40 * MiB
    config = Config(max_stream_window_size=WINDOW_16MIB)
    go_args = ["-window", str(WINDOW_16MIB)]
    async with go_session(
        yamuxpeer, python_client=python_client, config=config, go_args=go_args
    ) as (session, _):
        # One Go Write: with our 16 MiB window Go sends Data frames of up to 16 MiB.
        stream = await open_command(session, f"send {size} 11")
        assert await receive_to_eof(stream) == (size, sha256_hex(pattern(11, size)))
        await stream.aclose()


async def test_16mib_window_we_send_40mib_byte_exact(yamuxpeer: Path, python_client: bool) -> None:
    data = pattern(5, 40 * MiB)
    config = Config(max_stream_window_size=WINDOW_16MIB)
    go_args = ["-window", str(WINDOW_16MIB)]
    async with go_session(
        yamuxpeer, python_client=python_client, config=config, go_args=go_args
    ) as (session, _):
        stream = await open_command(session, "sink")
        await stream.send_all(data)
        await stream.send_eof()
        assert await receive_line(stream) == sha256_hex(data).encode() + b"\n"
        await expect_eof(stream)
        await stream.aclose()


async def test_auto_tuned_window_go_sends_40mib_byte_exact(
    yamuxpeer: Path, python_client: bool
) -> None:
    """The tunnel's settings (windows auto-tuning to 16 MiB) against Go's fixed defaults:
    Go takes the growing window updates, and never sends beyond what we granted."""
    size = 40 * MiB
    async with go_session(yamuxpeer, python_client=python_client, config=TUNNEL_YAMUX_CONFIG) as (
        session,
        _,
    ):
        stream = await open_command(session, f"send {size} 13")
        assert await receive_to_eof(stream) == (size, sha256_hex(pattern(13, size)))
        state = session._conn.stream(stream.stream_id)  # the core's view of the window
        assert state is not None
        assert state.recv_window_max > 256 * 1024
        await stream.aclose()
