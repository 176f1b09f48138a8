"""A yamux stream is a ``trio.abc.HalfCloseableStream``: trio's own generic checks.

Each maker opens a fresh client/server session pair and returns (opened, accepted) streams.
The sessions live in an ``AsyncExitStack`` owned by the test, because the check calls the
makers many times and expects each pair to stay usable until the check is done with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import pytest
import trio
from trio.testing import check_half_closeable_stream

from visiona_tunnel.yamux import Stream, open_session

from .helpers import INITIAL_WINDOW, TEST_DEADLINE, Transports, memory_transports, tcp_transports

TransportMaker = Callable[[], Awaitable[Transports]]


async def memory() -> Transports:
    return memory_transports()


TRANSPORTS: dict[str, TransportMaker] = {"memory": memory, "tcp": tcp_transports}


async def open_stream_pair(
    stack: AsyncExitStack, make_transports: TransportMaker
) -> tuple[Stream, Stream]:
    transports = await make_transports()
    stack.push_async_callback(transports.client.aclose)
    stack.push_async_callback(transports.server.aclose)
    client = await stack.enter_async_context(open_session(transports.client, client=True))
    server = await stack.enter_async_context(open_session(transports.server, client=False))
    opened = await client.open_stream()
    return opened, await server.accept_stream()


async def open_clogged_stream_pair(
    stack: AsyncExitStack, make_transports: TransportMaker
) -> tuple[Stream, Stream]:
    """A pair whose send windows are used up both ways: nobody has read anything, so
    ``send_all`` and ``wait_send_all_might_not_block`` block until the other side reads."""
    opened, accepted = await open_stream_pair(stack, make_transports)
    await opened.send_all(bytes(INITIAL_WINDOW))
    await accepted.send_all(bytes(INITIAL_WINDOW))
    return opened, accepted


@pytest.mark.parametrize("transport", TRANSPORTS.values(), ids=TRANSPORTS.keys())
async def test_yamux_stream_is_a_half_closeable_stream(transport: TransportMaker) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with AsyncExitStack() as stack:

            async def make_pair() -> tuple[Stream, Stream]:
                return await open_stream_pair(stack, transport)

            async def make_clogged_pair() -> tuple[Stream, Stream]:
                return await open_clogged_stream_pair(stack, transport)

            await check_half_closeable_stream(make_pair, make_clogged_pair)
