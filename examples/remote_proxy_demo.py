"""``make run``: the remote-proxy, a demo agent and a demo local server, on embedded defaults.

Everything runs in this one process on 127.0.0.1 (tunnel :3800, internal API :3801, the
device's local server on a free port); stop it with Ctrl-C. Environment variables override
the defaults as for ``visiona-remote-proxy`` (docs/remote-proxy.md).
"""

from __future__ import annotations

import os
import signal

import trio

from visiona_services.common.logs import configure_logging
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.service import serve_remote_proxy

from .demo_local_server import run_demo_device

DEMO_TOKEN = "demo-token"
DEMO_DEVICE = "demo-device"
DEMO_SECRET = "demo-internal-secret"


def demo_config() -> ProxyConfig:
    environ = {
        "VISIONA_ENV": "dev",
        "VISIONA_TUNNEL_HOST": "127.0.0.1",
        "VISIONA_INTERNAL_SECRET": DEMO_SECRET,
        "VISIONA_PROXY_STATIC_TOKENS": f"{DEMO_TOKEN}={DEMO_DEVICE}",
        "VISIONA_LOG_LEVEL": "warning",
    }
    environ.update(os.environ)
    return ProxyConfig.from_env(environ)


async def main() -> None:
    config = demo_config()
    configure_logging(config.log_level)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            proxy = await nursery.start(serve_remote_proxy, config)
            relay_url = f"ws://127.0.0.1:{config.tunnel_port}/tunnel/connect"
            device = await nursery.start(run_demo_device, relay_url, DEMO_TOKEN)
            await proxy.state.tunnels.wait_for(DEMO_DEVICE)
            internal = f"http://127.0.0.1:{config.internal_port}"
            auth = f'-H "Authorization: Bearer {config.internal_secret}"'
            print(
                f"""
visionA remote-proxy demo: tunnel {proxy.tunnel_urls[0]}, internal API {internal}
a demo agent ({DEMO_DEVICE}) is connected and serves a local server on :{device.local_port}

try:
  curl {auth} {internal}/internal/sessions
  curl {auth} {internal}/internal/forward/{DEMO_DEVICE}/hello
  curl {auth} --data-binary @README.md {internal}/internal/forward/{DEMO_DEVICE}/echo
  curl {auth} -o /dev/null -w '%{{speed_download}} B/s\\n' \\
       {internal}/internal/forward/{DEMO_DEVICE}/bytes/1073741824
  curl {auth} {internal}/metrics

Ctrl-C to stop.""",
                flush=True,
            )
            async for _ in signals:
                device.stop()
                proxy.stop()
                break


if __name__ == "__main__":
    trio.run(main)
