"""A fake api-server for ``POST /internal/devices/verify`` (docs/remote-proxy.md, "Token
verification contract"), as a raw ASGI app on hypercorn on loopback.

The token picks the answer: ``good-*`` -> 200 with device id ``dev-<rest>``; ``status-N``
-> HTTP N with an error envelope; ``garbled`` -> 200 that is not the envelope; ``slow``
-> no answer until the client goes away. Every request is recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import trio
import trio.lowlevel
from support.tunnelhttp import Message, Receive, Send, read_body, run_lifespan, serve_on_loopback


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes
    #: The client's (host, port): one per connection.
    client: tuple[str, int] | None = None


@dataclass
class FakeApiServer:
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    #: Requests being answered now, and the most there were at once.
    at_once: int = 0
    most_at_once: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
            return
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            await self._answer(scope, receive, send)
        finally:
            self.at_once -= 1

    async def _answer(self, scope: Message, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        headers = {name.lower(): value for name, value in scope["headers"]}
        client = tuple(scope["client"]) if scope.get("client") else None
        self.requests.append(Seen(scope["method"], scope["path"], headers, body, client))
        await trio.lowlevel.checkpoint()  # others may come in meanwhile
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
    app.port = await serve_on_loopback(nursery, app)
    return app
