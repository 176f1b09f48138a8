"""``visiona-remote-proxy`` as a process, for tests: its command, an environment of its
own, its log lines as they come, a graceful stop."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping

import pytest
import trio

PROCESS_TIMEOUT = 30.0
COMMAND = [sys.executable, "-m", "visiona_services.remote_proxy"]
#: Both listeners on 127.0.0.1, on ports of the system's choosing.
EPHEMERAL = {
    "VISIONA_TUNNEL_HOST": "127.0.0.1",
    "VISIONA_TUNNEL_PORT": "0",
    "VISIONA_PROXY_INTERNAL_HOST": "127.0.0.1",
    "VISIONA_PROXY_INTERNAL_PORT": "0",
}


def proxy_env(environ: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ``VISIONA_*`` variable, plus ``environ``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISIONA_")}
    env.update(environ)
    return env


class Output:
    """What a process wrote on one pipe, read as it comes."""

    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        assert stream is not None
        self.stream = stream
        self.text = ""

    async def line(self, matches: Callable[[str], bool]) -> str:
        """The first line (read so far or to come) for which ``matches`` is true."""
        while True:
            for line in self.text.splitlines(keepends=True):
                if line.endswith("\n") and matches(line.rstrip("\n")):
                    return line.rstrip("\n")
            chunk = await self.stream.receive_some()
            if not chunk:
                pytest.fail(f"the process closed the pipe; it wrote: {self.text}")
            self.text += chunk.decode(errors="replace")


def is_listening(line: str) -> bool:
    """The log line that gives the bound addresses."""
    return line.startswith("{") and json.loads(line)["msg"] == "listening"


async def stop(process: trio.Process) -> int:
    """SIGTERM (the graceful shutdown); the exit code."""
    process.send_signal(signal.SIGTERM)
    return await process.wait()
