"""The relay's own tunnel listener: what an agent's upgrade request is answered with."""

from __future__ import annotations

import functools

import pytest
import trio

from visiona_tunnel.relay import (
    TokenVerifier,
    TunnelRegistry,
    VerifierUnavailable,
    serve_tunnel_listener,
)
from visiona_tunnel.wsconn import WebSocketRejected, connect_websocket_stream


async def refuse_upgrade(verify: TokenVerifier, target: str) -> WebSocketRejected:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                serve_tunnel_listener, TunnelRegistry(), verify, host="127.0.0.1", port=0
            )
        )
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(WebSocketRejected) as raised:
            await connect_websocket_stream(f"ws://127.0.0.1:{port}{target}")
        nursery.cancel_scope.cancel()
    return raised.value


async def test_a_verifier_that_cannot_answer_gets_503_and_the_listener_goes_on() -> None:
    async def unavailable(token: str) -> str | None:
        raise VerifierUnavailable("backend down")

    refused = await refuse_upgrade(unavailable, "/tunnel/connect?token=t")
    assert refused.status_code == 503


async def test_an_unknown_token_gets_401() -> None:
    async def nobody(token: str) -> str | None:
        return None

    refused = await refuse_upgrade(nobody, "/tunnel/connect?token=t")
    assert refused.status_code == 401


async def test_another_path_gets_404() -> None:
    async def anyone(token: str) -> str | None:
        return "device"

    refused = await refuse_upgrade(anyone, "/elsewhere?token=t")
    assert refused.status_code == 404
