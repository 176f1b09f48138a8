"""Demo: a yamux echo server and client over loopback TCP, with throughput and RTT.

Run with ``make run`` or ``python -m examples.yamux_echo_demo [--streams N] [--mib M]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import trio

from visiona_tunnel.yamux import Session, Stream, open_session


async def echo(stream: Stream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def serve_connection(transport: trio.SocketStream) -> None:
    async with open_session(transport, client=False) as session, trio.open_nursery() as nursery:
        async for stream in session:
            nursery.start_soon(echo, stream)


async def echo_through(session: Session, nbytes: int) -> None:
    stream = await session.open_stream()
    chunk = bytes(range(256)) * 1024  # 256 KiB

    async def send() -> None:
        for _ in range(nbytes // len(chunk)):
            await stream.send_all(chunk)
        await stream.send_eof()

    received = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await stream.receive_some():
            received += len(data)
    await stream.aclose()
    assert received == nbytes // len(chunk) * len(chunk), "echo lost bytes"


async def main(streams: int, mib: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, serve_connection, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        print(f"yamux echo server on 127.0.0.1:{port}")
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_session(transport, client=True) as session:
            started = time.perf_counter()
            async with trio.open_nursery() as clients:
                for _ in range(streams):
                    clients.start_soon(echo_through, session, mib << 20)
            elapsed = time.perf_counter() - started
            total = streams * (mib << 20)
            print(
                f"echoed {streams} x {mib} MiB in {elapsed:.2f} s: "
                f"{total / elapsed / 1e6:.0f} MB/s each way (client and server in one process)"
            )
            rtts = [await session.ping() for _ in range(200)]
            print(f"ping RTT median {statistics.median(rtts) * 1e6:.0f} us")
        nursery.cancel_scope.cancel()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--mib", type=int, default=32)
    args = parser.parse_args()
    trio.run(main, args.streams, args.mib)


if __name__ == "__main__":
    run()
