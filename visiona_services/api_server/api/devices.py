"""``/api/devices`` and ``/api/clusters``: the caller's devices with their live state,
rename and unpair; device groups."""

from __future__ import annotations

import functools
import logging

import httpx
import quart
from quart_trio import QuartTrio

from .. import clusters
from ..audit import iso
from ..devices import device_json, get_device, list_devices, rename_device, unpair_device
from ..policy import principal
from ..services import ApiServices, current_services
from .bodies import ClusterBody, ClusterPatch, NameBody, clean_name, read_body
from .context import actor, ok

__all__ = ["register"]

logger = logging.getLogger("visiona_services.api_server.devices")


async def close_tunnel(services: ApiServices, device_id: str) -> None:
    """Ask the remote-proxy to close the device's tunnel (it may have none)."""
    url = f"{services.config.proxy_internal_url}/internal/sessions/{device_id}"
    headers = {"authorization": f"Bearer {services.config.internal_secret}"}
    try:
        response = await services.http.delete(url, headers=headers)
    except httpx.HTTPError as exc:
        logger.warning(
            "could not close the tunnel", extra={"device": device_id, "error": repr(exc)}
        )
        return
    if response.status_code not in (200, 404):
        logger.warning(
            "the remote-proxy refused to close the tunnel",
            extra={"device": device_id, "status": response.status_code},
        )


def register(app: QuartTrio) -> None:
    @app.get("/api/devices")
    async def devices() -> quart.Response:
        services = current_services()
        rows = await services.db.run(functools.partial(list_devices, user_id=principal().user_id))
        return ok([device_json(row, services.presence) for row in rows])

    @app.get("/api/devices/<device_id>")
    async def device(device_id: str) -> quart.Response:
        services = current_services()
        row = await services.db.run(
            functools.partial(get_device, user_id=principal().user_id, device_id=device_id)
        )
        return ok(device_json(row, services.presence))

    @app.patch("/api/devices/<device_id>")
    async def rename(device_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        name = clean_name((await read_body(NameBody)).name)
        row = await services.db.run(
            functools.partial(
                rename_device,
                user_id=user.user_id,
                device_id=device_id,
                name=name,
                actor=actor(user.user_id),
            )
        )
        services.broker.publish(
            user.user_id,
            {"type": "device.renamed", "device_id": row.id, "at": iso(services.clock())},
        )
        return ok(device_json(row, services.presence))

    @app.delete("/api/devices/<device_id>")
    async def unpair(device_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        gone = await services.db.run(
            functools.partial(
                unpair_device, user_id=user.user_id, device_id=device_id, actor=actor(user.user_id)
            )
        )
        # The token is gone from the database: the agent's redial is refused from now on.
        await close_tunnel(services, gone)
        services.broker.publish(
            user.user_id,
            {"type": "device.unpaired", "device_id": gone, "at": iso(services.clock())},
        )
        return ok({"id": gone, "unpaired": True})

    @app.get("/api/clusters")
    async def list_clusters() -> quart.Response:
        services = current_services()
        found = await services.db.run(
            functools.partial(clusters.list_clusters, user_id=principal().user_id)
        )
        return ok(found)

    @app.post("/api/clusters")
    async def create_cluster() -> quart.Response:
        services = current_services()
        user = principal()
        body = await read_body(ClusterBody)
        created = await services.db.run(
            functools.partial(
                clusters.create_cluster,
                user_id=user.user_id,
                name=clean_name(body.name),
                device_ids=body.device_ids,
                now=services.clock(),
                actor=actor(user.user_id),
            )
        )
        return ok(created, 201)

    @app.get("/api/clusters/<cluster_id>")
    async def get_cluster(cluster_id: str) -> quart.Response:
        services = current_services()
        found = await services.db.run(
            functools.partial(
                clusters.get_cluster, user_id=principal().user_id, cluster_id=cluster_id
            )
        )
        return ok(found)

    @app.patch("/api/clusters/<cluster_id>")
    async def update_cluster(cluster_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        body = await read_body(ClusterPatch)
        updated = await services.db.run(
            functools.partial(
                clusters.update_cluster,
                user_id=user.user_id,
                cluster_id=cluster_id,
                name=None if body.name is None else clean_name(body.name),
                device_ids=body.device_ids,
                actor=actor(user.user_id),
            )
        )
        return ok(updated)

    @app.delete("/api/clusters/<cluster_id>")
    async def delete_cluster(cluster_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        await services.db.run(
            functools.partial(
                clusters.delete_cluster,
                user_id=user.user_id,
                cluster_id=cluster_id,
                actor=actor(user.user_id),
            )
        )
        return ok({"id": cluster_id, "deleted": True})
