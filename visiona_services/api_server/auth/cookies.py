"""Signed cookie values: ``<id>.<HMAC-SHA256(secret, purpose, id)>``, base64url.

The cookie carries a random id and its signature, nothing else; the server keeps what
the id stands for, under the id's SHA-256 (:func:`id_hash`), so a database leak yields no
usable cookie. ``purpose`` separates the keys: a login cookie is no session cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["id_hash", "new_id", "sign", "unsign"]

#: Random bytes in an id (256 bits).
ID_BYTES = 32
_MAX_COOKIE = 256


def new_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def id_hash(value: str) -> str:
    """What the database keeps of an id."""
    return hashlib.sha256(value.encode()).hexdigest()


def _mac(secret: str, purpose: str, value: str) -> str:
    digest = hmac.new(secret.encode(), f"{purpose}\0{value}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def sign(secret: str, purpose: str, value: str) -> str:
    return f"{value}.{_mac(secret, purpose, value)}"


def unsign(secret: str, purpose: str, cookie: str | None) -> str | None:
    """The id in ``cookie`` if its signature is ours (compared in constant time)."""
    if not cookie or len(cookie) > _MAX_COOKIE:
        return None
    value, dot, mac = cookie.rpartition(".")
    if not dot or not value:
        return None
    if not hmac.compare_digest(mac.encode(), _mac(secret, purpose, value).encode()):
        return None
    return value
