"""A request body that a raw ASGI route reads itself, and drops when nobody wants it.

hypercorn (0.18) reports the end of a request through its bounded queue of request
messages (10), also while the final response message goes out and after the app returned;
with that queue full of unread body it blocks there for good and never closes the
connection. So a raw route that answers without reading the whole body -- a refusal, an
upstream that answered early, a forward that failed -- must keep reading and dropping it:
while the final response message is sent (:meth:`RequestBody.draining`), and afterwards
for as long as the caller keeps sending (:meth:`RequestBody.drain` with
:data:`LINGER_IDLE`). Then hypercorn closes the connection (the request was not read
whole)::

    body = RequestBody(receive)
    await handler(scope, body.receive, body.draining(send))
    await body.drain(LINGER_IDLE)

Both services' raw routes go through this: the remote-proxy's internal middleware, the
api-server's forwarded routes.
"""

from __future__ import annotations

import math

import trio

from .http import Message, Receive, Send

__all__ = ["LINGER_IDLE", "RequestBody"]

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

    async def drain(self, idle: float = math.inf) -> None:
        """Drop the rest of the body until the request ends, or nothing came for ``idle``
        seconds."""
        while not self.ended:
            with trio.move_on_after(idle) as quiet:
                await self.receive()
            if quiet.cancelled_caught:
                return

    async def send_last(self, send: Send, message: Message) -> None:
        """Send ``message`` while the unread rest of the body is dropped (no one else may
        be reading it then)."""
        if self.ended:
            await send(message)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.drain)
            await send(message)
            nursery.cancel_scope.cancel()

    def draining(self, send: Send) -> Send:
        """``send``, but the response's last message goes out with :meth:`send_last`."""

        async def send_draining(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self.send_last(send, message)
            else:
                await send(message)

        return send_draining
