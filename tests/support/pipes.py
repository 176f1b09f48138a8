"""Reading a child process's output pipe line by line, for tests that wait for its lines."""

from __future__ import annotations

from collections.abc import Callable

import trio


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
