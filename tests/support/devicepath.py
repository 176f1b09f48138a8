"""A browser's whole way to its device, for end-to-end tests of forwarding: on top of
``support.system`` (api-server + remote-proxy + dev provider), a user logged in through the
provider, a device paired through the real exchange, our agent (``TunnelClient``) dialling
with its device token, and the device's local server behind it.

::

    async with open_device_path(nursery, system, "alice") as path:
        response = await path.browser.get("/api/cameras/hello")      # -> the device's /hello
        assert path.local.app.requests[-1].raw_path == "/api/cameras/hello"

``DeviceApp`` is the local server: ``/api/cameras/X`` and ``/api/inference/X`` answer as
``ProxyLocalApp`` answers ``/X`` (``/hello``, ``/echo``, ``/sha256``, ``/bytes/N``,
``/status/N``, ``/headers``, ``/slow?ms=N``, ``/request-id`` ...: see ``support.tunnelhttp``
and ``support.internalapi``; ``/cors`` answers with CORS headers and a cookie),
``/api/devices/scan`` answers ``{"scanned": true}``, and
WebSocket ``/ws/echo`` echoes (``close-4002`` closes with 4002). Every request it gets is
recorded, as it got it, in ``requests``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import httpx
import trio
from trio_websocket import WebSocketConnection

from .internalapi import ProxyLocalApp
from .pyagent import PyAgent
from .system import PairedDevice, System
from .tunnelhttp import Message, Receive, Send, browser_websocket, respond, serve_on_loopback

#: The device paths answered as ProxyLocalApp answers the rest of the path.
_MOUNTS = ("/api/cameras", "/api/inference")


@attrs.frozen
class SeenRequest:
    """A request as the device's local server got it."""

    kind: str  # "http" or "websocket"
    method: str
    raw_path: str
    query: str
    #: Names lower-cased (as hypercorn gives them).
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]


class DeviceApp(ProxyLocalApp):
    """The device's local server (see the module docstring)."""

    def __init__(self, name: str = "local-1") -> None:
        super().__init__(name)
        self.requests: list[SeenRequest] = []

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            self.requests.append(
                SeenRequest(
                    scope["type"],
                    scope.get("method", "GET"),
                    scope["raw_path"].decode(),
                    scope["query_string"].decode(),
                    [(name.decode().lower(), value.decode()) for name, value in scope["headers"]],
                )
            )
        await super().__call__(scope, receive, send)

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path == "/api/devices/scan":
            await respond(send, 200, json.dumps({"scanned": True}).encode())
            return
        for mount in _MOUNTS:
            if path.startswith(mount + "/"):
                scope = {
                    **scope,
                    "path": path.removeprefix(mount),
                    "raw_path": scope["raw_path"].removeprefix(mount.encode()),
                }
                break
        if scope["path"] == "/cors":  # what a device must not decide for the api-server
            headers = [
                (b"access-control-allow-origin", b"https://evil.test"),
                (b"access-control-allow-credentials", b"true"),
                (b"set-cookie", b"visiona_session=from-the-device; Path=/"),
                (b"x-kept", b"yes"),
            ]
            await respond(send, 200, b"cors", headers)
            return
        await super()._http(scope, receive, send)


@attrs.frozen
class DeviceServer:
    app: DeviceApp
    port: int


async def start_device_server(nursery: trio.Nursery) -> DeviceServer:
    app = DeviceApp()
    return DeviceServer(app, await serve_on_loopback(nursery, app))


@attrs.define(eq=False)
class DevicePath:
    """A logged-in browser, its paired device online, and the device's local server."""

    system: System
    #: httpx, with the user's session cookie (send ``support.apiserver.CSRF`` on unsafe
    #: methods yourself).
    browser: httpx.AsyncClient
    device: PairedDevice
    agent: PyAgent
    local: DeviceServer

    @property
    def device_id(self) -> str:
        return self.device.device_id

    @property
    def port(self) -> int:
        """The api-server's port (for the raw h11 and WebSocket callers of
        ``support.tunnelhttp``)."""
        return int(self.system.api.url.rsplit(":", 1)[1])

    @property
    def cookie(self) -> tuple[str, str]:
        """The session as a request header, for raw callers."""
        return ("cookie", f"visiona_session={self.browser.cookies['visiona_session']}")

    def websocket(
        self, resource: str, headers: Sequence[tuple[str, str]] = ()
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        """The browser's WebSocket to ``resource`` (session cookie, our own ``Origin``)."""
        sent = [self.cookie, ("origin", self.system.api.url), *headers]
        return browser_websocket(self.port, resource, sent)

    async def stop_agent(self) -> None:
        """Stop the agent; return once the api-server sees the device offline."""
        self.agent.client.stop()
        await self.system.wait_online(self.device_id, online=False)


@asynccontextmanager
async def open_device_path(
    nursery: trio.Nursery, system: System, user: str = "alice", name: str = "cam"
) -> AsyncIterator[DevicePath]:
    """Log ``user`` in, pair a device named ``name``, serve its local server and start its
    agent (in ``nursery``); the block runs once the api-server sees the device online."""
    local = await start_device_server(nursery)
    async with system.api.browser() as browser:
        await system.api.login(browser, user)
        device = await system.pair(browser, name)
        agent = await system.start_agent(nursery, device, local.port)
        await system.wait_online(device.device_id)
        yield DevicePath(system, browser, device, agent, local)
