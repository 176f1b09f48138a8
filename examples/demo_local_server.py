"""A tiny local HTTP + WebSocket server for demos: what an edge device would serve.

Routes: ``GET /`` (hello), ``GET /hello``, ``POST /echo`` (streams the body back),
``GET /bytes/N`` (N bytes), ``WS /ws/echo``. A raw ASGI app, served by hypercorn.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CHUNK = bytes(range(256)) * 256  # 64 KiB


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
