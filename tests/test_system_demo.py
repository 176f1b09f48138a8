"""``make run`` (``python -m examples.system_demo``): the whole system starts with a demo
device paired through the real flow, the demo user logs in through the dev provider and
sees the device online, and Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from support.oidcprovider import login_at_provider

pytestmark = pytest.mark.usefixtures("devidp")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def test_make_run_shows_the_demo_users_device_online_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    api, idp, tunnel, internal = _free_ports(4)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISIONA_")}
    env.update(
        VISIONA_DATA_DIR=str(tmp_path),
        VISIONA_API_PORT=str(api),
        VISIONA_DEV_IDP_PORT=str(idp),
        VISIONA_TUNNEL_PORT=str(tunnel),
        VISIONA_PROXY_INTERNAL_PORT=str(internal),
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "examples.system_demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        with trio.fail_after(TIMEOUT):
            assert process.stdout is not None
            shown = b""
            while b"Ctrl-C to stop." not in shown:
                chunk = await process.stdout.receive_some()
                assert chunk, f"the demo ended early: {shown.decode()}"
                shown += chunk
            login = f"http://127.0.0.1:{api}/api/auth/login?next=/api/devices"
            assert login in shown.decode()
            async with httpx.AsyncClient() as browser:
                start = await browser.get(login)
                callback = await login_at_provider(browser, start.headers["location"], "demo")
                devices = await browser.get(callback, follow_redirects=True)
                health = await browser.get(f"http://127.0.0.1:{api}/api/system/health")
                cameras = await browser.get(f"http://127.0.0.1:{api}/api/cameras/")
            [device] = devices.json()["data"]
            assert cameras.json()[0]["name"] == "Demo camera"  # the device's own server
            assert (device["name"], device["online"]) == ("demo device", True)
            assert health.json()["data"]["status"] == "ok"
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
