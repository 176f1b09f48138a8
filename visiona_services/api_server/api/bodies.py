"""JSON request bodies: attrs classes, structured by a strict cattrs converter (no extra
keys, no coercion: a number is not a name). A body that does not fit is 400
``INVALID_REQUEST`` naming the field."""

from __future__ import annotations

import json
import unicodedata
from typing import Any, TypeVar

import attrs
import cattrs
import quart

from ..errors import Invalid

__all__ = [
    "ClusterBody",
    "ClusterPatch",
    "NameBody",
    "TokenBody",
    "clean_name",
    "read_body",
]

T = TypeVar("T")
MAX_NAME_LENGTH = 255


def _strict_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)

    def strict(kind: type) -> Any:
        def structure(value: Any, _: type) -> Any:
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise TypeError(f"expected {kind.__name__}")
            return value

        return structure

    for kind in (str, int, bool):
        converter.register_structure_hook(kind, strict(kind))
    return converter


_converter = _strict_converter()


def clean_name(value: str) -> str:
    """A display name: trimmed, 1-255 characters, no control characters."""
    name = value.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise Invalid(f"name must be 1 to {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise Invalid("name must not contain control characters")
    return name


@attrs.frozen
class NameBody:
    name: str


@attrs.frozen
class TokenBody:
    token: str


@attrs.frozen
class ClusterBody:
    name: str
    device_ids: list[str] = attrs.Factory(list)


@attrs.frozen
class ClusterPatch:
    name: str | None = None
    device_ids: list[str] | None = None


async def read_body(cls: type[T]) -> T:
    """The request's JSON body as ``cls``.

    Raises:
        Invalid: not JSON, not an object, or not fitting ``cls`` (the message names the
            field).
    """
    raw = await quart.request.get_data(as_text=False)
    try:
        value = json.loads(raw or b"null")
    except ValueError:
        raise Invalid("the body must be JSON") from None
    if not isinstance(value, dict):
        raise Invalid("the body must be a JSON object")
    try:
        return _converter.structure(value, cls)
    except cattrs.ClassValidationError as group:
        raise Invalid(_describe(group)) from None


def _describe(group: cattrs.ClassValidationError) -> str:
    with_notes, without = group.group_exceptions()
    problems = [f"{note.name}: {exc}" for exc, note in with_notes]
    problems += [str(exc) for exc in without]
    return "invalid body: " + "; ".join(problems)
