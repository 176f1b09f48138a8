"""A fake api-server for ``POST /internal/devices/verify`` (docs/remote-proxy.md, "Token
verification contract"), as a raw ASGI app on hypercorn on loopback.

The token picks the answer: ``good-*`` -> 200 with device id ``dev-<rest>``; ``status-N``
-> HTTP N with an error envelope; ``garbled`` -> 200 that is not the envelope; ``slow``
-> no answer until the client goes away. Every request is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

Message = dict[str, Any]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class FakeApiServer:
    port: int = 0
    requests: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {name.lower(): value for name, value in scope["headers"]}
        self.requests.append(Seen(scope["method"], scope["path"], headers, bytes(body)))
        token = json.loads(body)["token"]
        if token.startswith("good-"):
            status, answer = 200, {"success": True, "data": {"device_id": "dev-" + token[5:]}}
        elif token.startswith("status-"):
            status = int(token[7:])
            error = {"code": "NOPE", "message": "no", "request_id": "r"}
            answer = {"success": False, "error": error}
        elif token == "garbled":
            status, answer = 200, {"success": True, "data": {}}
        else:  # slow
            await trio.sleep_forever()
        data = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


async def start_fake_api_server(nursery: trio.Nursery) -> FakeApiServer:
    app = FakeApiServer()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds: list[str] = await nursery.start(partial(serve, cast("ASGIFramework", app), config))
    app.port = int(binds[0].rsplit(":", 1)[1])
    return app
