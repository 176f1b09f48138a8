"""The base URL of the other service's internal API: ``http://host[:port][/prefix]``
(the remote-proxy's ``VISIONA_API_INTERNAL_URL``, the api-server's
``VISIONA_PROXY_INTERNAL_URL``), checked once and split for raw connections."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import attrs

__all__ = ["InternalUrl"]

#: An escaped URL path (RFC 3986 ``path-abempty``).
_PATH = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@attrs.frozen
class InternalUrl:
    host: str
    port: int
    #: ``host[:port]`` as written, for the ``Host`` header.
    netloc: str
    #: The prefix, without a trailing "/".
    prefix: str
    #: ``https://``: TLS to the host (only where :meth:`parse` allows it).
    tls: bool = False

    @classmethod
    def parse(cls, text: str, *, allow_https: bool = False) -> InternalUrl:
        """Raises ValueError saying what is wrong with ``text``."""
        parts = urlsplit(text)
        schemes = ("http", "https") if allow_https else ("http",)
        try:
            port = parts.port
        except ValueError as exc:  # not a number, or out of range
            raise ValueError(f"bad port in {text!r}: {exc}") from None
        if parts.scheme not in schemes or not parts.hostname:
            expected = "http[s]" if allow_https else "http"
            raise ValueError(f"expected {expected}://host[:port][/prefix], got {text!r}")
        if port == 0:
            raise ValueError(f"port 0 in {text!r}")
        if "@" in parts.netloc:
            raise ValueError(f"must not hold credentials: {text!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"must not have a query or fragment: {text!r}")
        if not _PATH.fullmatch(parts.path):
            raise ValueError(f"the prefix must be an escaped path: {text!r}")
        return cls(
            parts.hostname,
            port or _DEFAULT_PORTS[parts.scheme],
            parts.netloc,
            parts.path.rstrip("/"),
            tls=parts.scheme == "https",
        )
