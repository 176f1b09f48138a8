"""The one place tenancy is checked: a user's things are found only through :func:`owned`
(by id *and* owner), so another user's id answers exactly like an unknown one."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.orm import Session

from .errors import NotFound

__all__ = ["owned"]

Owned = TypeVar("Owned")


def owned(db: Session, model: type[Owned], object_id: str, user_id: str, code: str) -> Owned:
    """The ``model`` row ``object_id`` if ``user_id`` owns it.

    Raises:
        NotFound: with ``code`` (e.g. ``DEVICE_NOT_FOUND``), whether it does not exist or
            belongs to someone else.
    """
    row: Any = db.get(model, object_id)
    if row is None or row.user_id != user_id:
        raise NotFound(f"no such {model.__name__.lower()}", code)
    return row  # type: ignore[no-any-return]
