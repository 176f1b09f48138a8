"""``/api/models``: two-phase uploads of model files (seed 000). ``init`` keeps a pending
model and gives a presigned PUT URL (the bytes go to the Store directly, never through
these routes); ``finalize`` checks what arrived; a ready model has a presigned download
URL. docs/api-server.md has the contract."""

from __future__ import annotations

import functools
import hashlib
from datetime import timedelta

import attrs
import quart
import trio
from quart_trio import QuartTrio

from .. import models
from ..audit import iso
from ..db import Model
from ..errors import Invalid
from ..policy import principal
from ..services import ApiServices, current_services
from ..storage import ObjectInfo, ObjectNotFound
from .audit import int_arg
from .bodies import clean_name, read_body
from .context import actor, ok

__all__ = ["register"]

#: Presigned download URLs last this long.
DOWNLOAD_TTL = 3600
MAX_FILENAME = 255


@attrs.frozen
class InitBody:
    name: str
    filename: str
    size: int
    content_type: str | None = None
    sha256: str | None = None


async def _download_url(services: ApiServices, model: Model) -> str | None:
    if model.status != models.READY:
        return None
    url = await services.store.presigned_get_url(
        model.object_key, DOWNLOAD_TTL, public_url=services.config.public_url
    )
    return url.url


async def _sha256_of(services: ApiServices, key: str, info: ObjectInfo) -> str:
    """The object's sha256: the Store's when it knows it, else read back and hashed."""
    if info.sha256 is not None:
        return info.sha256
    digest = hashlib.sha256()
    async with await services.store.get(key) as reader:
        async for chunk in reader:
            await trio.to_thread.run_sync(digest.update, chunk)
    return digest.hexdigest()


def register(app: QuartTrio) -> None:
    @app.post("/api/models/init")
    async def init() -> quart.Response:
        services = current_services()
        user = principal()
        body = await read_body(InitBody)
        filename = body.filename.strip()
        if not filename or len(filename) > MAX_FILENAME or "/" in filename or "\\" in filename:
            raise Invalid("filename must be 1 to 255 characters, without slashes")
        model = await services.db.run(
            functools.partial(
                models.init_model,
                user_id=user.user_id,
                name=clean_name(body.name),
                filename=filename,
                size=body.size,
                content_type=body.content_type,
                sha256=body.sha256,
                max_size=services.config.model_max_size,
                upload_ttl=timedelta(seconds=services.config.model_upload_ttl),
                now=services.clock(),
                actor=actor(user.user_id),
            )
        )
        upload = await services.store.presigned_put_url(
            model.object_key,
            int(services.config.model_upload_ttl),
            size=model.size,
            content_type=model.content_type,
            public_url=services.config.public_url,
        )
        return ok(
            {
                "model_id": model.id,
                "upload_url": upload.url,
                "upload_method": upload.method,
                "upload_headers": dict(upload.headers),
                "expires_at": iso(upload.expires_at),
            },
            201,
        )

    @app.post("/api/models/<model_id>/finalize")
    async def finalize(model_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        model = await services.db.run(
            functools.partial(models.get_model, user_id=user.user_id, model_id=model_id)
        )
        size: int | None = None
        sha256: str | None = None
        if model.status != models.READY:
            try:
                info = await services.store.stat(model.object_key)
            except ObjectNotFound:
                pass
            else:
                size = info.size
                if size == model.size:
                    sha256 = await _sha256_of(services, model.object_key, info)
        ready = await services.db.run(
            functools.partial(
                models.mark_ready,
                user_id=user.user_id,
                model_id=model_id,
                size=size,
                sha256=sha256,
                now=services.clock(),
                actor=actor(user.user_id),
            )
        )
        return ok(models.model_json(ready, await _download_url(services, ready)))

    @app.get("/api/models")
    async def list_models() -> quart.Response:
        services = current_services()
        limit = int_arg("limit", 50, 1, 200) or 50
        before = quart.request.args.get("before")
        page = await services.db.run(
            functools.partial(
                models.list_models, user_id=principal().user_id, limit=limit, before=before
            )
        )
        listed = [models.model_json(model) for model in page.models]
        return ok({"models": listed, "next_before": page.next_before})

    @app.get("/api/models/<model_id>")
    async def get_model(model_id: str) -> quart.Response:
        services = current_services()
        model = await services.db.run(
            functools.partial(models.get_model, user_id=principal().user_id, model_id=model_id)
        )
        return ok(models.model_json(model, await _download_url(services, model)))

    @app.delete("/api/models/<model_id>")
    async def delete_model(model_id: str) -> quart.Response:
        services = current_services()
        user = principal()
        key = await services.db.run(
            functools.partial(
                models.delete_model,
                user_id=user.user_id,
                model_id=model_id,
                actor=actor(user.user_id),
            )
        )
        await services.store.delete(key)
        return ok({"id": model_id, "deleted": True})


async def sweep_expired_models(services: ApiServices) -> int:
    """Remove the pending models whose upload time is over, with their objects (whatever
    part of them arrived); returns how many."""
    keys = await services.db.run(functools.partial(models.expired_uploads, now=services.clock()))
    for key in keys:
        await services.store.delete(key)
    return len(keys)


async def sweep_forever(services: ApiServices) -> None:
    """:func:`sweep_expired_models` every ``VISIONA_MODEL_SWEEP_INTERVAL`` seconds."""
    while True:
        await trio.sleep(services.config.model_sweep_interval)
        try:
            await sweep_expired_models(services)
        except Exception:  # never fatal: it runs beside the server
            models.logger.exception("the sweep of stale uploads failed")
