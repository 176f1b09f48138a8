"""What a raw ASGI route (one served without Quart) needs around its handler: the request
body it must read to its end (or discard), and a watch over what it answered.

hypercorn (0.18) reports the end of a request through its bounded queue of request
messages (10), also while the final response message goes out and after the app returned;
with that queue full of unread body it blocks there for good and never closes the
connection. So a raw route that answers without reading the whole body -- a refusal, an
upstream that answered early, a forward that failed -- must keep reading and dropping it:
while the final response message is sent (:class:`ResponseWatch` with a ``body``), and
afterwards for as long as the caller keeps sending (:meth:`RequestBody.discard_rest` with
:data:`LINGER_IDLE`). Then hypercorn closes the connection (the request was not read
whole)::

    body = RequestBody(receive)
    watch = ResponseWatch(send, body)
    try:
        await handler(scope, body.receive, watch.send)
    except Exception:
        await watch.fail(scope, ApiError(500, "INTERNAL", "internal error"))
    await body.discard_rest(LINGER_IDLE)

Both services' raw routes go through this: the remote-proxy's internal middleware, the
api-server's forwarded routes.
"""

from __future__ import annotations

import logging
import math

import trio

from .http import (
    ApiError,
    Message,
    Receive,
    Scope,
    Send,
    reject_websocket_api_error,
    send_api_error,
)

__all__ = ["LINGER_IDLE", "RequestBody", "ResponseWatch"]

logger = logging.getLogger("visiona_services.raw_route")

#: After a raw HTTP route's answer, how long the caller may pause sending the rest of an
#: unread request body before we stop reading it.
LINGER_IDLE = 1.0


class RequestBody:
    """Wraps ``receive`` for a request whose body is ours to read: knows whether the
    request has ended (the body's last message, or the disconnect)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.ended = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.ended = True
        return message

    async def discard_rest(self, idle: float = math.inf) -> None:
        """Drop the rest of the body until the request ends, or nothing came for ``idle``
        seconds."""
        while not self.ended:
            with trio.move_on_after(idle) as quiet:
                await self.receive()
            if quiet.cancelled_caught:
                return


class ResponseWatch:
    """Wraps a raw route's ``send``: remembers what was answered (:attr:`status`,
    :attr:`accepted`), so that a handler that failed gets an error only where one can
    still go out (:meth:`fail`); with a ``body``, the response's last message goes out
    while the unread rest of the body is dropped (no one else may be reading it then)."""

    def __init__(self, send: Send, body: RequestBody | None = None) -> None:
        self._send = send
        self.body = body
        #: The HTTP status answered: 101 once a WebSocket is accepted, 403 when it was
        #: closed before (hypercorn refuses the handshake); None until then.
        self.status: int | None = None
        self.accepted = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind in ("http.response.start", "websocket.http.response.start"):
            self.status = int(message["status"])
        elif kind == "websocket.accept":
            self.status, self.accepted = 101, True
        elif kind == "websocket.close" and self.status is None:
            self.status = 403
        elif (
            kind == "http.response.body"
            and not message.get("more_body", False)
            and self.body is not None
            and not self.body.ended
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.body.discard_rest)
                await self._send(message)
                nursery.cancel_scope.cancel()
            return
        await self._send(message)

    async def fail(self, scope: Scope, error: ApiError) -> None:
        """After the handler failed: ``error`` if nothing was answered yet, close 1011 if
        a WebSocket was accepted, else nothing (the server ends the connection)."""
        try:
            if self.accepted:
                await self.send({"type": "websocket.close", "code": 1011})
            elif self.status is None and scope["type"] == "http":
                await send_api_error(self.send, error)
            elif self.status is None:
                await reject_websocket_api_error(scope, self.send, error)
        except Exception:  # the server refused the message: it is over anyway
            logger.debug("could not answer the failure", exc_info=True)
