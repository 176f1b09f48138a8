"""``/api/pairing/*``: pairing tokens, the agent's exchange, the caller's pairing status;
and ``POST /internal/devices/verify`` for the remote-proxy (docs/remote-proxy.md has the
contract)."""

from __future__ import annotations

import functools
from datetime import timedelta

import quart
from quart_trio import QuartTrio

from ..audit import iso
from ..devices import list_devices
from ..errors import Unauthorized
from ..pairing import (
    create_pairing_token,
    exchange_pairing_token,
    list_pairing_tokens,
    revoke_pairing_token,
    verify_device_token,
)
from ..policy import internal, principal, public, rate_limited
from ..services import current_services
from .bodies import NameBody, TokenBody, clean_name, read_body
from .context import actor, ok

__all__ = ["register"]


def register(app: QuartTrio) -> None:
    @app.post("/api/pairing/token")
    async def create_token() -> quart.Response:
        services = current_services()
        user = principal()
        name = clean_name((await read_body(NameBody)).name)
        created = await services.db.run(
            functools.partial(
                create_pairing_token,
                user_id=user.user_id,
                name=name,
                ttl=timedelta(seconds=services.config.pairing_token_ttl),
                now=services.clock(),
                actor=actor(user.user_id),
            )
        )
        return ok(created, 201)

    @app.get("/api/pairing/tokens")
    async def list_tokens() -> quart.Response:
        services = current_services()
        user = principal()
        tokens = await services.db.run(
            functools.partial(list_pairing_tokens, user_id=user.user_id, now=services.clock())
        )
        return ok(tokens)

    @app.delete("/api/pairing/tokens/<token_id>")
    async def revoke_token(token_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        token = await services.db.run(
            functools.partial(
                revoke_pairing_token,
                user_id=user.user_id,
                token_id=token_id,
                now=services.clock(),
                actor=actor(user.user_id),
            )
        )
        return ok(token)

    @app.post("/api/pairing/exchange")
    @public
    @rate_limited("pairing")
    async def exchange() -> quart.Response:
        services = current_services()
        token = (await read_body(TokenBody)).token
        paired = await services.db.run(
            functools.partial(
                exchange_pairing_token, token=token, now=services.clock(), actor=actor()
            )
        )
        services.broker.publish(
            paired.user_id,
            {"type": "device.paired", "device_id": paired.device_id, "at": iso(services.clock())},
        )
        return ok(
            {
                "device_id": paired.device_id,
                "device_token": paired.device_token,
                "relay_url": services.config.tunnel_public_url,
            }
        )

    @app.get("/api/pairing/status")
    async def status() -> quart.Response:
        services = current_services()
        user = principal()
        devices = await services.db.run(functools.partial(list_devices, user_id=user.user_id))
        listed = [
            {"id": d.id, "name": d.name, "online": services.presence.is_online(d.id)}
            for d in devices
        ]
        return ok({"connected": any(d["online"] for d in listed), "devices": listed})

    @app.post("/internal/devices/verify")
    @internal
    async def verify() -> quart.Response:
        services = current_services()
        token = (await read_body(TokenBody)).token
        device_id = await services.db.run(functools.partial(verify_device_token, token=token))
        if device_id is None:
            raise Unauthorized("not a valid device token")
        return ok({"device_id": device_id})
