"""``make run``: the whole system on embedded defaults, wired together on 127.0.0.1.

* the dev identity provider (``devidp/``, npm ``oidc-provider``: any user name logs in) on
  :3722,
* the api-server on :3721 (``VISIONA_ENV=dev``: SQLite and secrets under ``./data``),
* the remote-proxy (tunnels :3800, internal API :3801) sharing the api-server's internal
  secret,
* a demo device, paired through the real flow: the demo user logs in at the dev provider
  (headless), asks for a pairing token, and the agent trades it at the exchange for its
  device token (kept in ``{VISIONA_DATA_DIR}/demo-agent.json`` for the next run), then
  dials the remote-proxy, which verifies the token with the api-server.

Environment variables override the defaults as for each service (docs/api-server.md,
docs/remote-proxy.md). Ctrl-C stops everything.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from visiona_services.api_server import ApiConfig, serve_api_server
from visiona_services.common.envconfig import load
from visiona_services.common.logs import configure_logging
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.service import serve_remote_proxy
from visiona_tunnel.credentials import DeviceCredentials, load_credentials, store_credentials
from visiona_tunnel.pairing import pair_device

from .demo_local_server import run_demo_device
from .devbrowser import login_at_provider

ROOT = Path(__file__).resolve().parent.parent
DEVIDP = ROOT / "devidp"
IDP_PORT = int(os.environ.get("VISIONA_DEV_IDP_PORT", "3722"))
DEMO_USER = "demo"
DEMO_DEVICE_NAME = "demo device"
#: The dev provider's startup line and its time to print it.
IDP_READY = b"oidc-provider listening on "
IDP_START_TIMEOUT = 20.0


def api_config() -> ApiConfig:
    api_port = os.environ.get("VISIONA_API_PORT", "3721")
    proxy_port = os.environ.get("VISIONA_PROXY_INTERNAL_PORT", "3801")
    tunnel_port = os.environ.get("VISIONA_TUNNEL_PORT", "3800")
    environ = {
        "VISIONA_TUNNEL_PUBLIC_URL": f"ws://127.0.0.1:{tunnel_port}/tunnel/connect",
        "VISIONA_ENV": "dev",
        "VISIONA_LOG_LEVEL": "warning",
        "VISIONA_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "VISIONA_PROXY_INTERNAL_URL": f"http://127.0.0.1:{proxy_port}",
        "VISIONA_OIDC_ISSUER": f"http://127.0.0.1:{IDP_PORT}",
        "VISIONA_OIDC_CLIENT_ID": "visiona-web",
        **os.environ,
    }
    config = load(ApiConfig, environ)
    config, generated = config.with_secrets()
    if generated:
        print(f"generated dev secrets (kept in {config.data_dir}/dev-secrets.env):")
        for variable, value in generated.items():
            print(f"  {variable}={value}")
    return config


def proxy_config(api: ApiConfig) -> ProxyConfig:
    environ = {
        "VISIONA_ENV": "dev",
        "VISIONA_TUNNEL_HOST": "127.0.0.1",
        "VISIONA_LOG_LEVEL": "warning",
        **os.environ,
        "VISIONA_API_INTERNAL_URL": api.public_url,
        "VISIONA_INTERNAL_SECRET": api.internal_secret,
    }
    return ProxyConfig.from_env(environ)


async def run_identity_provider(
    public_url: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """``node devidp/provider.mjs`` until cancelled; started with its issuer."""
    node = shutil.which("node")
    if node is None or not (DEVIDP / "node_modules" / "oidc-provider").is_dir():
        sys.exit("the dev identity provider needs node and `make devidp` (npm ci --prefix devidp)")
    env = {
        **os.environ,
        "PORT": str(IDP_PORT),
        "REDIRECT_URIS": f"{public_url}/api/auth/callback",
        "POST_LOGOUT_REDIRECT_URIS": f"{public_url}/",
        "BACKCHANNEL_LOGOUT_URI": f"{public_url}/api/auth/backchannel-logout",
    }
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                [node, str(DEVIDP / "provider.mjs")],
                env=env,
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        seen = b""
        with trio.fail_after(IDP_START_TIMEOUT):
            while IDP_READY not in seen or not seen.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                if not chunk:
                    sys.exit(f"the dev identity provider did not start: {seen.decode()}")
                seen += chunk
        issuer = seen.split(IDP_READY, 1)[1].split(b"\n", 1)[0].decode().strip()
        task_status.started(issuer)


async def main() -> None:
    configure_logging("warning")
    api = api_config()
    proxy = proxy_config(api)
    configure_logging(api.log_level)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            issuer = await outer.start(run_identity_provider, api.public_url)
            await run_services(api, proxy, issuer, signals)
            outer.cancel_scope.cancel()  # the provider, once the services have stopped


async def demo_credentials(api: ApiConfig, issuer: str) -> DeviceCredentials:
    """The demo device's credentials: kept from an earlier run if its device still exists,
    else paired now through the real flow (the demo user logs in, asks for a pairing
    token; the agent side trades it)."""
    path = Path(api.data_dir) / "demo-agent.json"
    async with httpx.AsyncClient(base_url=api.public_url) as browser:
        login = await browser.get("/api/auth/login")
        callback = await login_at_provider(browser, login.headers["location"], DEMO_USER)
        await browser.get(callback)
        kept = load_credentials(path)
        devices = (await browser.get("/api/devices")).json()["data"]
        if kept is not None and any(device["id"] == kept.device_id for device in devices):
            return kept
        created = await browser.post(
            "/api/pairing/token", json={"name": DEMO_DEVICE_NAME}, headers={"X-CSRF": "1"}
        )
        token = created.json()["data"]["token"]
    paired = await pair_device(api.public_url, token)
    credentials = DeviceCredentials.of_pairing(paired, api.public_url)
    store_credentials(path, credentials)
    return credentials


async def run_services(api: ApiConfig, proxy: ProxyConfig, issuer: str, signals: Any) -> None:
    """Serve until the first signal, then stop each service gracefully."""
    async with trio.open_nursery() as nursery:
        proxy_server = await nursery.start(serve_remote_proxy, proxy)
        api_server = await nursery.start(serve_api_server, api)
        credentials = await demo_credentials(api, issuer)
        device = await nursery.start(
            run_demo_device, credentials.relay_url, credentials.device_token
        )
        await api_server.services.presence.wait_until_online(credentials.device_id)
        print(
            f"""
visionA, the whole system on 127.0.0.1:
  api-server         {api.public_url} ({api_server.services.db.dialect}, data in {api.data_dir})
  identity provider  {issuer} (dev: any user name logs in, any password)
  remote-proxy       tunnels {proxy_server.tunnel_urls[0]}, internal API :{proxy.internal_port}
  demo device        "{DEMO_DEVICE_NAME}" ({credentials.device_id}), paired to the user
                     "{DEMO_USER}"; its agent is online, its local server on :{device.local_port}

open in a browser, logging in as "{DEMO_USER}" (any password):
  {api.public_url}/api/auth/login?next=/api/devices   your devices: the demo device, online
  {api.public_url}/api/cameras/                       its local server, through the tunnel
  {api.public_url}/api/pairing/status                 whether any device is online
  {api.public_url}/api/audit                          what you did
  ws://127.0.0.1:{api.port}/api/events                device online/offline as it happens

pair another device: POST {api.public_url}/api/pairing/token (logged in, X-CSRF: 1), then
  visiona-agent --api-url {api.public_url} --pairing-token vAc_... --local 127.0.0.1:8080

Ctrl-C to stop.""",
            flush=True,
        )
        async for _ in signals:
            device.stop()
            api_server.stop()
            proxy_server.stop()
            break


if __name__ == "__main__":
    trio.run(main)
