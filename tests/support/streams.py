"""Reading trio streams in tests: exactly so many bytes, or a child's pipe line by line."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read exactly ``size`` bytes; fail on an early end of file."""
    received = bytearray()
    while len(received) < size:
        chunk = await stream.receive_some(size - len(received))
        assert chunk, f"end of file after {len(received)} of {size} bytes"
        received += chunk
    return bytes(received)


async def pump_lines(pipe: trio.abc.ReceiveStream, on_line: Callable[[bytes], None]) -> None:
    """Read ``pipe`` to its end, calling ``on_line`` with each line (without the newline)
    as it is complete; then close it. An unterminated last piece is dropped."""
    pending = b""
    async with pipe:
        while chunk := await pipe.receive_some():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                on_line(line)
