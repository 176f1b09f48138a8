"""``visiona-agent`` as a process against our relay: JSON log lines on stderr, a clean
exit (status 0) on SIGTERM and on SIGINT once its session was up.

It runs as ``python -m visiona_tunnel.agent`` (the console script's ``main``), with the
token in ``VISIONA_AGENT_TOKEN``. Waits are on its log lines, each bounded.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from support.pyrelay import PyRelay, start_py_relay
from support.streams import pump_lines
from support.tunnelhttp import LocalServer

from visiona_tunnel.relay import TunnelDown, TunnelEvent

TOKEN = "token-1"
DEVICE = "device-1"
#: Upper bound for one wait for a log line, and for the exit after a signal.
LINE_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0

LogLine = dict[str, Any]


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
        with trio.fail_after(timeout):
            return await self.process.wait()


def is_state(state: str) -> Callable[[LogLine], bool]:
    return lambda line: line.get("msg") == "state" and line.get("state") == state


@pytest.fixture
async def relay(nursery: trio.Nursery) -> PyRelay:
    return await start_py_relay(nursery, {TOKEN: DEVICE})


@pytest.fixture
async def agent(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer
) -> AsyncIterator[AgentProcess]:
    """The agent process, online (its session is up at the relay)."""
    command = [
        sys.executable,
        "-m",
        "visiona_tunnel.agent",
        "--relay-url",
        relay.url,
        "--local",
        local.address,
        "--log-level",
        "info",
    ]
    env = {**os.environ, "VISIONA_AGENT_TOKEN": TOKEN}
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    agent = AgentProcess(process)
    try:
        nursery.start_soon(agent.pump)
        await agent.wait_for(is_state("online"), timeout=20.0)  # includes the interpreter start
        with trio.fail_after(LINE_TIMEOUT):
            await relay.registry.wait_for(DEVICE)
        yield agent
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_agent_logs_state_changes_as_json_lines(agent: AgentProcess) -> None:
    agent.process.send_signal(signal.SIGTERM)
    await agent.wait_for(is_state("stopped"))
    await agent.wait_exit()
    assert all("unparsed" not in line for line in agent.lines), agent.lines
    for line in agent.lines:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
    states = [line["state"] for line in agent.lines if line.get("msg") == "state"]
    assert states == ["online", "stopped"]
    assert any(line.get("msg") == "session up" for line in agent.lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_agent_exits_0_on_signal_after_the_session_was_up(
    agent: AgentProcess, relay: PyRelay, signum: signal.Signals
) -> None:
    down = trio.Event()

    def observe(event: TunnelEvent) -> None:
        if isinstance(event, TunnelDown):
            down.set()

    relay.registry.add_observer(observe)
    agent.process.send_signal(signum)
    assert await agent.wait_exit() == 0, agent.lines
    stopping = [line for line in agent.lines if line.get("msg") == "stopping"]
    assert [line.get("signal") for line in stopping] == [signum.name]
    with trio.fail_after(LINE_TIMEOUT):
        await down.wait()  # the agent closed its tunnel on the way out


def test_local_address_parses_host_and_port() -> None:
    from visiona_tunnel.client import parse_local_addr

    assert parse_local_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_local_addr("[::1]:80") == ("::1", 80)
    assert parse_local_addr(":9000") == ("127.0.0.1", 9000)


def test_a_local_address_without_a_valid_port_is_refused() -> None:
    import pytest

    from visiona_tunnel.client import parse_local_addr

    for bad in ("localhost", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_local_addr(bad)


def test_client_state_compares_equal_to_its_name() -> None:
    from visiona_tunnel.client import ClientState

    state: str = ClientState.ONLINE  # a str, so code comparing with "online" works
    assert state == "online"
    assert [state.value for state in ClientState] == [
        "connecting",
        "online",
        "reconnecting",
        "stopped",
    ]
