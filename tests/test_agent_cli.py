"""``visiona-agent`` as a process against our relay: JSON log lines on stderr, a clean
exit (status 0) on SIGTERM and on SIGINT once its session was up.

It runs as ``python -m visiona_tunnel.agent`` (the console script's ``main``), with the
token in ``VISIONA_AGENT_TOKEN``. Waits are on its log lines, each bounded.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme
from support.agentprocess import (
    LINE_TIMEOUT,
    START_TIMEOUT,
    AgentProcess,
    agent_process,
    is_state,
)
from support.pyrelay import PyRelay, start_py_relay
from support.tunnelhttp import LocalServer
from support.tunnellistener import start_tunnel_listener

from visiona_tunnel.relay import TunnelDown, TunnelEvent

TOKEN = "token-1"
DEVICE = "device-1"


@pytest.fixture
async def relay(nursery: trio.Nursery) -> PyRelay:
    return await start_py_relay(nursery, {TOKEN: DEVICE})


@pytest.fixture
async def agent(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer
) -> AsyncIterator[AgentProcess]:
    """The agent process, online (its session is up at the relay)."""
    args = ["--relay-url", relay.url, "--local", local.address, "--log-level", "info"]
    async with agent_process(nursery, args, {"VISIONA_AGENT_TOKEN": TOKEN}) as agent:
        await agent.wait_for(is_state("online"), timeout=START_TIMEOUT)
        with trio.fail_after(LINE_TIMEOUT):
            await relay.registry.wait_for(DEVICE)
        yield agent


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


# -- wss:// with a private CA ---------------------------------------------------------------


async def test_the_agent_dials_a_wss_relay_trusting_its_ca_file(
    nursery: trio.Nursery, local: LocalServer, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    listener = await start_tunnel_listener(nursery, {TOKEN: DEVICE}, ssl_context=server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    args = ["--relay-url", listener.url, "--local", local.address, "--ca-file", str(ca_file)]
    async with agent_process(nursery, args, {"VISIONA_AGENT_TOKEN": TOKEN}) as agent:
        await agent.wait_for(is_state("online"), timeout=START_TIMEOUT)
        with trio.fail_after(LINE_TIMEOUT):
            assert (await listener.state.tunnels.wait_for(DEVICE)).key == DEVICE


def test_a_ca_file_that_does_not_load_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    command = [sys.executable, "-m", "visiona_tunnel.agent", "--local", "127.0.0.1:1"]
    result = subprocess.run(
        [*command, "--ca-file", missing],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("visiona-agent: argument --ca-file: cannot load")
