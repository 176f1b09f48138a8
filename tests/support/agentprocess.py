"""``visiona-agent`` as a child process (``python -m visiona_tunnel.agent``): its stderr as
parsed JSON log lines, each wait bounded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from .streams import pump_lines

#: Upper bound for one wait for a log line, and for the exit after a signal.
LINE_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
#: The first line may wait for the interpreter to start.
START_TIMEOUT = 20.0
#: The environment variables the agent reads; tests set those they need.
AGENT_VARIABLES = (
    "VISIONA_AGENT_TOKEN",
    "VISIONA_PAIRING_TOKEN",
    "VISIONA_LOG_LEVEL",
    "XDG_CONFIG_HOME",
)

LogLine = dict[str, Any]


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "visiona_tunnel.agent", *args]


def agent_environment(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """This process's environment without the agent's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in AGENT_VARIABLES}
    return {**env, **extra}


class AgentProcess:
    """A running ``visiona-agent``: its stderr as parsed JSON lines."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        #: Every line so far, parsed; ``{"unparsed": text}`` for one that is not JSON.
        self.lines: list[LogLine] = []
        self._in, self._out = trio.open_memory_channel[LogLine](math.inf)

    async def pump(self) -> None:
        assert self.process.stderr is not None
        async with self._in:
            await pump_lines(self.process.stderr, self._take)

    def _take(self, raw: bytes) -> None:
        try:
            line = json.loads(raw)
        except ValueError:
            line = {"unparsed": raw.decode(errors="replace")}
        if not isinstance(line, dict):
            line = {"unparsed": raw.decode(errors="replace")}
        self.lines.append(line)
        self._in.send_nowait(line)

    async def wait_for(
        self, predicate: Callable[[LogLine], bool], timeout: float = LINE_TIMEOUT
    ) -> LogLine:
        """Skip lines until one matches; AssertionError if stderr ends first."""
        with trio.fail_after(timeout):
            async for line in self._out:
                if predicate(line):
                    return line
        raise AssertionError(f"the agent exited ({self.process.returncode}): {self.lines}")

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit status, once stderr is read to its end too."""
        with trio.fail_after(timeout):
            status = await self.process.wait()
            async for _ in self._out:  # the pump closes it at the end of stderr
                pass
            return status


def is_state(state: str) -> Callable[[LogLine], bool]:
    return lambda line: line.get("msg") == "state" and line.get("state") == state


def has_msg(msg: str) -> Callable[[LogLine], bool]:
    return lambda line: line.get("msg") == msg


@asynccontextmanager
async def agent_process(
    nursery: trio.Nursery,
    args: Sequence[str],
    env: Mapping[str, str] = {},
) -> AsyncIterator[AgentProcess]:
    """The agent started with ``args`` and ``agent_environment(env)``, its stderr read in
    ``nursery``; killed (if still running) when the block ends."""
    process = await trio.lowlevel.open_process(
        agent_command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=agent_environment(env),
    )
    agent = AgentProcess(process)
    try:
        nursery.start_soon(agent.pump)
        yield agent
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@dataclass
class Finished:
    """An agent run to its exit."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


async def run_agent_to_exit(
    args: Sequence[str],
    env: Mapping[str, str] = {},
    timeout: float = START_TIMEOUT,
) -> Finished:
    """Run the agent with ``args`` until it exits by itself (within ``timeout``)."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            agent_command(*args),
            env=agent_environment(env),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Finished(done.returncode, done.stdout.decode(), done.stderr.decode())
