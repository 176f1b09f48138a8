"""LocalFS's signed URLs: ``{public_url}/storage/{token}``, where the token carries the
method, the key, the expiry and (for a PUT) the size limit and content type under an
HMAC-SHA256 (docs/storage.md, "Signed URLs").

    token   = "v1." + b64url(payload) + "." + b64url(HMAC-SHA256(k, "v1." + b64url(payload)))
    payload = compact JSON {"m": "GET"|"PUT", "k": key, "e": expiry (unix s),
                            "n": max bytes (PUT), "t": content type (PUT)}
    k       = HMAC-SHA256(VISIONA_STORAGE_SIGNING_SECRET, "visiona storage url")

b64url is unpadded base64url, so a token is URL-safe as it is. The signature is checked (in
constant time) before the payload is parsed; the expiry after the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from typing import Any

import attrs

from .base import StoreError, validate_key

__all__ = [
    "MAX_TOKEN_LENGTH",
    "SignatureInvalid",
    "SignedRequest",
    "SignedUrlError",
    "UrlExpired",
    "UrlSigner",
]

VERSION = "v1"
#: Tokens longer than this are refused unread (a 1024-byte key makes about 1.5 KB).
MAX_TOKEN_LENGTH = 2048
#: Secrets shorter than this are refused (the api-server's rule for its secrets).
MIN_SECRET_BYTES = 32
_CONTEXT = b"visiona storage url"
_B64URL = re.compile(r"[A-Za-z0-9_-]+\Z", re.ASCII)
_METHODS = ("GET", "PUT")


class SignedUrlError(StoreError):
    status = 403


class UrlExpired(SignedUrlError):
    code = "URL_EXPIRED"


class SignatureInvalid(SignedUrlError):
    """Not a token we made, changed since, or used with another method."""

    code = "SIGNATURE_INVALID"


@attrs.frozen
class SignedRequest:
    """What a valid token allows: ``method`` on ``key`` until ``expires_at``; for a PUT at
    most ``max_size`` bytes of ``content_type``."""

    method: str
    key: str
    expires_at: datetime
    max_size: int | None = None
    content_type: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict unpadded base64url: one encoding per value (no ignored characters)."""
    if not _B64URL.match(text):
        raise SignatureInvalid("not a signed URL")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignatureInvalid("not a signed URL") from None
    if _b64encode(data) != text:
        raise SignatureInvalid("not a signed URL")
    return data


class UrlSigner:
    """Makes and checks tokens with a key derived from the signing secret."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(raw) < MIN_SECRET_BYTES:
            raise ValueError(f"the signing secret needs at least {MIN_SECRET_BYTES} bytes")
        self._key = hmac.new(raw, _CONTEXT, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "UrlSigner(<secret>)"

    def _mac(self, signed_part: str) -> bytes:
        return hmac.new(self._key, signed_part.encode("ascii"), hashlib.sha256).digest()

    def sign(
        self,
        method: str,
        key: str,
        expires_at: int,
        *,
        max_size: int | None = None,
        content_type: str | None = None,
    ) -> str:
        """A token for ``method`` (GET or PUT) on ``key`` until ``expires_at`` (unix
        seconds); a PUT needs ``max_size`` and ``content_type``."""
        validate_key(key)
        payload: dict[str, Any] = {"m": method, "k": key, "e": int(expires_at)}
        if method == "PUT":
            if max_size is None or max_size < 0 or content_type is None:
                raise ValueError("a PUT token needs max_size >= 0 and content_type")
            payload["n"] = max_size
            payload["t"] = content_type
        elif method != "GET":
            raise ValueError(f"tokens are for GET or PUT, not {method!r}")
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
        signed_part = f"{VERSION}.{_b64encode(body.encode('ascii'))}"
        return f"{signed_part}.{_b64encode(self._mac(signed_part))}"

    def verify(self, token: str, method: str, now: float) -> SignedRequest:
        """The request the token allows, if it is ours, unchanged, for this ``method``
        (HEAD is allowed by a GET token) and not expired at ``now`` (unix seconds):
        else ``SignatureInvalid`` or ``UrlExpired``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise SignatureInvalid("not a signed URL")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise SignatureInvalid("not a signed URL (or another version)")
        signed_part = f"{parts[0]}.{parts[1]}"
        given = _b64decode(parts[2])
        if not hmac.compare_digest(self._mac(signed_part), given):
            raise SignatureInvalid("the signature does not match")
        request = _parse_payload(_b64decode(parts[1]))
        wanted = "GET" if method == "HEAD" else method
        if request.method != wanted:
            raise SignatureInvalid(f"the URL is for {request.method}, not {method}")
        if now >= request.expires_at.timestamp():
            raise UrlExpired("the URL has expired")
        return request


def _parse_payload(raw: bytes) -> SignedRequest:
    """Only ever called on a payload we signed; still checked, not trusted blindly."""
    try:
        payload = json.loads(raw)
        method, key, expires = payload["m"], payload["k"], payload["e"]
        if method not in _METHODS or not isinstance(key, str) or type(expires) is not int:
            raise ValueError("bad fields")
        validate_key(key)
        expires_at = datetime.fromtimestamp(expires, UTC)
        if method == "GET":
            return SignedRequest("GET", key, expires_at)
        max_size, content_type = payload["n"], payload["t"]
        if type(max_size) is not int or max_size < 0 or not isinstance(content_type, str):
            raise ValueError("bad PUT fields")
        return SignedRequest("PUT", key, expires_at, max_size, content_type)
    except (ValueError, KeyError, TypeError, OverflowError, OSError, StoreError):
        raise SignatureInvalid("not a signed URL") from None
