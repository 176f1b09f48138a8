"""``make run``: the whole system on embedded defaults, wired together on 127.0.0.1.

* the dev identity provider (``devidp/``, npm ``oidc-provider``: any user name logs in) on
  :3722,
* the api-server on :3721 (``VISIONA_ENV=dev``: SQLite and secrets under ``./data``),
* the remote-proxy (tunnels :3800, internal API :3801) sharing the api-server's internal
  secret,
* a demo device: an agent with a static token serving a small local HTTP server.

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

import trio

from visiona_services.api_server import ApiConfig, serve_api_server
from visiona_services.common.envconfig import load
from visiona_services.common.logs import configure_logging
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.service import serve_remote_proxy

from .demo_local_server import run_demo_device

ROOT = Path(__file__).resolve().parent.parent
DEVIDP = ROOT / "devidp"
IDP_PORT = int(os.environ.get("VISIONA_DEV_IDP_PORT", "3722"))
DEMO_TOKEN = "demo-token"
DEMO_DEVICE = "demo-device"
#: The dev provider's startup line and its time to print it.
IDP_READY = b"oidc-provider listening on "
IDP_START_TIMEOUT = 20.0


def api_config() -> ApiConfig:
    api_port = os.environ.get("VISIONA_API_PORT", "3721")
    proxy_port = os.environ.get("VISIONA_PROXY_INTERNAL_PORT", "3801")
    environ = {
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
        "VISIONA_PROXY_STATIC_TOKENS": f"{DEMO_TOKEN}={DEMO_DEVICE}",
        "VISIONA_LOG_LEVEL": "warning",
        **os.environ,
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


async def run_services(api: ApiConfig, proxy: ProxyConfig, issuer: str, signals: Any) -> None:
    """Serve until the first signal, then stop each service gracefully."""
    async with trio.open_nursery() as nursery:
        api_server = await nursery.start(serve_api_server, api)
        proxy_server = await nursery.start(serve_remote_proxy, proxy)
        relay_url = f"ws://127.0.0.1:{proxy.tunnel_port}/tunnel/connect"
        device = await nursery.start(run_demo_device, relay_url, DEMO_TOKEN)
        await proxy_server.state.tunnels.wait_for(DEMO_DEVICE)
        internal = f"http://127.0.0.1:{proxy.internal_port}"
        bearer = f'-H "Authorization: Bearer {api.internal_secret}"'
        print(
            f"""
visionA, the whole system on 127.0.0.1:
  api-server         {api.public_url} ({api_server.services.db.dialect}, data in {api.data_dir})
  identity provider  {issuer} (dev: any user name logs in, any password)
  remote-proxy       tunnels {proxy_server.tunnel_urls[0]}, internal API {internal}
  demo device        {DEMO_DEVICE}: its agent is connected, its local server on :{device.local_port}

open in a browser:
  {api.public_url}/api/auth/login?next=/api/auth/me   log in, then see who you are
  {api.public_url}/api/system/health                  the database and the remote-proxy
  {api.public_url}/api/audit                          your logins and logouts

the remote-proxy's internal API (how the api-server reaches devices):
  curl {bearer} {internal}/internal/sessions
  curl {bearer} {internal}/internal/forward/{DEMO_DEVICE}/hello

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
