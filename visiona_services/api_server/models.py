"""Models: AI model files users upload in two phases (seed 000): ``init`` keeps a pending
row and hands out a presigned PUT URL; the bytes go straight to the Store; ``finalize``
checks them and makes the model ready. Units of work on the database (sync); the Store
calls are the routes' (async)."""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta
from typing import Any

import attrs
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from . import audit
from .audit import iso
from .db import Model
from .errors import Conflict, DomainError, Invalid
from .tenancy import owned

__all__ = [
    "MODEL_NOT_FOUND",
    "ModelPage",
    "ModelTooLarge",
    "delete_model",
    "expired_uploads",
    "get_model",
    "init_model",
    "list_models",
    "mark_ready",
    "model_json",
]

logger = logging.getLogger("visiona_services.api_server.models")

MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
PENDING = "pending"
READY = "ready"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class ModelTooLarge(DomainError):
    status = 413
    code = "MODEL_TOO_LARGE"


class UploadIncomplete(Conflict):
    code = "UPLOAD_INCOMPLETE"


class ChecksumMismatch(DomainError):
    status = 422
    code = "CHECKSUM_MISMATCH"


def model_json(model: Model, download_url: str | None = None) -> dict[str, Any]:
    return {
        "id": model.id,
        "name": model.name,
        "filename": model.filename,
        "size": model.size,
        "content_type": model.content_type,
        "sha256": model.sha256,
        "status": model.status,
        "created_at": iso(model.created_at),
        "finalized_at": iso(model.finalized_at) if model.finalized_at else None,
        "download_url": download_url,
    }


def init_model(
    db: Session,
    *,
    user_id: str,
    name: str,
    filename: str,
    size: int,
    content_type: str | None,
    sha256: str | None,
    max_size: int,
    upload_ttl: timedelta,
    now: datetime,
    actor: audit.Actor,
) -> Model:
    """A pending model; its object key is ``models/{user_id}/{model_id}``.

    Raises:
        ModelTooLarge: ``size`` is over ``max_size``.
        Invalid: a negative size, a malformed sha256 or content type.
    """
    if size < 0:
        raise Invalid("size must not be negative")
    if size > max_size:
        raise ModelTooLarge(f"a model may be at most {max_size} bytes")
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise Invalid("sha256 must be 64 hex digits")
    content_type = content_type or DEFAULT_CONTENT_TYPE
    if not _CONTENT_TYPE.fullmatch(content_type) or len(content_type) > 255:
        raise Invalid("content_type must be a media type (type/subtype)")
    model_id = uuid.uuid4().hex
    model = Model(
        id=model_id,
        user_id=user_id,
        name=name,
        filename=filename,
        size=size,
        content_type=content_type,
        declared_sha256=sha256.lower() if sha256 else None,
        status=PENDING,
        object_key=f"models/{user_id}/{model_id}",
        created_at=now,
        upload_expires_at=now + upload_ttl,
    )
    db.add(model)
    audit.record(db, actor, "model:init", target=f"model:{model_id}", detail={"size": size})
    return model


def get_model(db: Session, *, user_id: str, model_id: str) -> Model:
    return owned(db, Model, model_id, user_id, MODEL_NOT_FOUND)


@attrs.frozen
class ModelPage:
    models: list[Model]
    next_before: str | None


def list_models(db: Session, *, user_id: str, limit: int, before: str | None) -> ModelPage:
    """The caller's models, newest first; ``before`` is a model id from the previous page."""
    query = select(Model).where(Model.user_id == user_id)
    if before is not None:
        anchor = owned(db, Model, before, user_id, MODEL_NOT_FOUND)
        query = query.where(
            (Model.created_at < anchor.created_at)
            | ((Model.created_at == anchor.created_at) & (Model.id < anchor.id))
        )
    rows = list(
        db.scalars(query.order_by(Model.created_at.desc(), Model.id.desc()).limit(limit + 1))
    )
    return ModelPage(rows[:limit], rows[limit - 1].id if len(rows) > limit else None)


def mark_ready(
    db: Session,
    *,
    user_id: str,
    model_id: str,
    size: int | None,
    sha256: str | None,
    now: datetime,
    actor: audit.Actor,
) -> Model:
    """Finalize with what the Store holds (``size`` None: nothing there).

    Raises:
        UploadIncomplete: no object, or not the declared size (409).
        ChecksumMismatch: not the declared sha256 (422).
    """
    model = owned(db, Model, model_id, user_id, MODEL_NOT_FOUND)
    if model.status == READY:
        return model
    if size is None or size != model.size:
        got = "nothing" if size is None else f"{size} bytes"
        raise UploadIncomplete(f"the upload is not complete: {got} of {model.size}")
    if model.declared_sha256 is not None and sha256 != model.declared_sha256:
        audit.record(db, actor, "model:finalize", target=f"model:{model.id}", outcome=audit.FAILURE)
        raise ChecksumMismatch("the uploaded bytes do not have the declared sha256")
    model.status = READY
    model.sha256 = sha256
    model.finalized_at = now
    audit.record(db, actor, "model:finalize", target=f"model:{model.id}")
    return model


def delete_model(db: Session, *, user_id: str, model_id: str, actor: audit.Actor) -> str:
    """Delete the row; returns the object key for the caller to delete."""
    model = owned(db, Model, model_id, user_id, MODEL_NOT_FOUND)
    db.execute(delete(Model).where(Model.id == model.id))
    audit.record(db, actor, "model:delete", target=f"model:{model.id}")
    return model.object_key


def expired_uploads(db: Session, *, now: datetime) -> list[str]:
    """Delete the pending models whose upload time is over (audited); their object keys."""
    rows = list(
        db.scalars(select(Model).where(Model.status == PENDING, Model.upload_expires_at < now))
    )
    if rows:
        db.execute(delete(Model).where(Model.id.in_([row.id for row in rows])))
    sweeper = audit.Actor(None, None, None)
    for row in rows:
        audit.record(db, sweeper, "model:expire", user_id=row.user_id, target=f"model:{row.id}")
    return [row.object_key for row in rows]
