"""A tiny local HTTP + WebSocket server for demos: what an edge device would serve.

Routes: ``GET /`` (hello), ``GET /hello``, ``GET /api/cameras[/...]`` (a camera list),
``POST /api/devices/scan``, ``POST /api/inference/{model}`` (reads the input, answers a
result), ``POST /echo`` (streams the body back), ``GET /bytes/N`` (N bytes), and any
WebSocket path (echo). A raw ASGI app, served by hypercorn;
:func:`run_demo_device` serves it behind an agent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from visiona_tunnel import TunnelClient

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CHUNK = bytes(range(256)) * 256  # 64 KiB
_CAMERAS = [{"id": "cam-0", "name": "Demo camera", "resolution": "1920x1080", "fps": 30}]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await _echo_websocket(receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)


async def _http(scope: Scope, receive: Receive, send: Send) -> None:
    path, method = scope["path"], scope["method"]
    if path in ("/", "/hello"):
        body = json.dumps({"hello": "from the device", "path": path}).encode() + b"\n"
        await _respond(send, 200, body, b"application/json")
    elif path.startswith("/api/cameras"):
        await _respond(send, 200, json.dumps(_CAMERAS).encode() + b"\n", b"application/json")
    elif path == "/api/devices/scan" and method == "POST":
        found = {"usb": [{"id": "usb-0", "kind": "camera", "name": "Demo UVC camera"}]}
        await _respond(send, 200, json.dumps(found).encode() + b"\n", b"application/json")
    elif path.startswith("/api/inference/") and method == "POST":
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        result = {"model": path.removeprefix("/api/inference/"), "input_bytes": size, "labels": []}
        await _respond(send, 200, json.dumps(result).encode() + b"\n", b"application/json")
    elif path == "/echo" and method == "POST":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            await send(
                {"type": "http.response.body", "body": message.get("body", b""), "more_body": True}
            )
            if not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b""})
    elif path.startswith("/bytes/") and path[7:].isdigit():
        size = int(path[7:])
        headers = [
            (b"content-length", str(size).encode()),
            (b"content-type", b"application/octet-stream"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while size:
            piece = _CHUNK[: min(size, len(_CHUNK))]
            size -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": bool(size)})
    else:
        await _respond(send, 404, b"not found\n", b"text/plain")


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _echo_websocket(receive: Receive, send: Send) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


@attrs.frozen
class DemoDevice:
    """A running demo device: its local server's port, and how to stop it."""

    local_port: int
    stop: Callable[[], None]


async def run_demo_device(
    relay_url: str,
    token: str,
    *,
    task_status: trio.TaskStatus[DemoDevice] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :func:`app` on a free port of 127.0.0.1 and run an agent that dials
    ``relay_url`` with ``token`` for it, until ``stop()``."""
    local = hypercorn.config.Config()
    local.bind = ["127.0.0.1:0"]
    local.accesslog = local.errorlog = None
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(
                hypercorn.trio.serve,
                cast(Any, app),  # a plain ASGI callable
                local,
                shutdown_trigger=stopping.wait,
            )
        )
        port = int(urls[0].rsplit(":", 1)[1])
        agent = TunnelClient(relay_url, token, ("127.0.0.1", port))
        nursery.start_soon(agent.run)

        def stop() -> None:
            agent.stop()
            stopping.set()

        task_status.started(DemoDevice(port, stop))
