"""The remote-proxy under a flood, as a process: with 1024 file descriptors and 1100 slow,
unauthenticated connections on its tunnel port, it still answers its internal API and
admits a valid agent; it logs the flood in a few lines, without tracebacks."""

from __future__ import annotations

import json
import resource
import subprocess

import pytest
import trio
from support.internalapi import SECRET, call, json_of
from support.proxyprocess import (
    COMMAND,
    EPHEMERAL,
    PROCESS_TIMEOUT,
    Output,
    is_listening,
    proxy_env,
    stop,
)
from support.pyagent import start_py_agent
from support.tunnelhttp import LocalServer

TOKEN = "device-token"
DEVICE = "device-1"
#: The proxy's descriptor limit (soft and hard), and the slow connections against it.
PROXY_DESCRIPTORS = 1024
FLOOD = 1100


def _limit_descriptors() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (PROXY_DESCRIPTORS, PROXY_DESCRIPTORS))


async def _open_slowly(port: int, held: list[trio.SocketStream]) -> None:
    """Connect from 127.0.0.2 and send nothing (slowloris)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.2", 0))
    try:
        await sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        return
    held.append(trio.SocketStream(sock))


@pytest.fixture
def descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 512
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this test needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))


async def test_a_1024_descriptor_proxy_under_1100_slow_connections_serves_and_admits(
    descriptors: None, local: LocalServer
) -> None:
    environ = {
        **EPHEMERAL,
        "VISIONA_INTERNAL_SECRET": SECRET,
        "VISIONA_PROXY_STATIC_TOKENS": f"{TOKEN}={DEVICE}",
    }
    process = await trio.lowlevel.open_process(
        COMMAND,
        env=proxy_env(environ),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limit_descriptors,
    )
    held: list[trio.SocketStream] = []
    try:
        with trio.fail_after(PROCESS_TIMEOUT):
            stderr = Output(process.stderr)
            listening = json.loads(await stderr.line(is_listening))
            tunnel_port = int(listening["tunnel"][0].rsplit(":", 1)[1])
            internal_port = int(listening["internal"][0].rsplit(":", 1)[1])
            async with trio.open_nursery() as nursery:
                for _ in range(FLOOD):
                    nursery.start_soon(_open_slowly, tunnel_port, held)
            # The internal API answers while the flood holds its connections open.
            health = await call(internal_port, "GET", "/internal/health")
            assert health.status == 200
            # A valid agent (from another address than the flood's) is admitted.
            async with trio.open_nursery() as nursery:
                relay_url = f"ws://127.0.0.1:{tunnel_port}/tunnel/connect"
                agent = await start_py_agent(nursery, relay_url, TOKEN, local.port)
                await agent.hooks.wait_for("session_up")
                sessions = await call(internal_port, "GET", "/internal/sessions")
                assert DEVICE in json.dumps(json_of(sessions))
                agent.client.stop()
            for stream in held:
                await stream.aclose()
            assert await stop(process) == 0
            while await stderr.stream.receive_some():
                pass
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in stderr.text
    starved = [line for line in stderr.text.splitlines() if "cannot accept" in line]
    assert len(starved) <= 3, starved
