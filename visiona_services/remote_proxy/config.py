"""remote-proxy configuration, from the environment (see docs/remote-proxy.md)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping

import attrs

from ..common.envconfig import ConfigError, env, load
from ..common.internal_url import InternalUrl

logger = logging.getLogger("visiona_services.remote_proxy")


def _port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        variable = attribute.metadata.get("env", attribute.name)
        raise ValueError(f"{variable}: port must be within 0..65535, got {value}")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        variable = attribute.metadata.get("env", attribute.name)
        raise ValueError(f"{variable}: must be positive, got {value}")


def _api_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value:
        try:
            InternalUrl.parse(value)
        except ValueError as exc:
            variable = attribute.metadata.get("env", attribute.name)
            raise ValueError(f"{variable}: {exc}") from None


#: The tunnel listener's implementations (``VISIONA_TUNNEL_SERVER``): our own on trio
#: sockets (h11 + wsproto), or hypercorn with the Quart app.
TUNNEL_SERVERS = ("raw", "hypercorn")


def _tunnel_server(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in TUNNEL_SERVERS:
        variable = attribute.metadata.get("env", attribute.name)
        expected = " or ".join(repr(name) for name in TUNNEL_SERVERS)
        raise ValueError(f"{variable}: expected {expected}, got {value!r}")


def parse_static_tokens(text: str) -> dict[str, str]:
    """``"tokenA=device-1,tokenB=device-2"`` -> ``{"tokenA": "device-1", ...}``."""
    tokens: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        token, sep, device = item.partition("=")
        if not sep or not token.strip() or not device.strip():
            raise ValueError(f"VISIONA_PROXY_STATIC_TOKENS: expected token=device, got {item!r}")
        tokens[token.strip()] = device.strip()
    return tokens


@attrs.frozen(kw_only=True)
class ProxyConfig:
    tunnel_host: str = attrs.field(default="0.0.0.0", metadata=env("VISIONA_TUNNEL_HOST"))
    tunnel_port: int = attrs.field(
        default=3800, validator=_port, metadata=env("VISIONA_TUNNEL_PORT")
    )
    #: Which server runs the tunnel listener: ``raw`` (ours) or ``hypercorn``.
    tunnel_server: str = attrs.field(
        default="raw", validator=_tunnel_server, metadata=env("VISIONA_TUNNEL_SERVER")
    )
    internal_host: str = attrs.field(
        default="127.0.0.1", metadata=env("VISIONA_PROXY_INTERNAL_HOST")
    )
    internal_port: int = attrs.field(
        default=3801, validator=_port, metadata=env("VISIONA_PROXY_INTERNAL_PORT")
    )
    #: Shared secret of the internal API (``Authorization: Bearer <secret>``).
    internal_secret: str = attrs.field(default="", metadata=env("VISIONA_INTERNAL_SECRET"))
    #: ``dev`` allows a generated internal secret; anything else requires one.
    environment: str = attrs.field(default="production", metadata=env("VISIONA_ENV"))
    #: ``tokenA=device-1,tokenB=device-2``: device tokens for standalone use.
    static_tokens: str = attrs.field(default="", metadata=env("VISIONA_PROXY_STATIC_TOKENS"))
    #: The api-server's internal base URL, to verify device tokens
    #: (``POST {url}/internal/devices/verify``).
    api_internal_url: str = attrs.field(
        default="", validator=_api_url, metadata=env("VISIONA_API_INTERNAL_URL")
    )
    log_level: str = attrs.field(default="info", metadata=env("VISIONA_LOG_LEVEL"))
    #: A forwarded request whose response head takes longer than this gets 504.
    forward_timeout: float = attrs.field(
        default=30.0, validator=_positive, metadata=env("VISIONA_PROXY_FORWARD_TIMEOUT")
    )
    #: On SIGTERM, how long in-flight forwards may take to finish.
    shutdown_grace: float = attrs.field(
        default=20.0, validator=_positive, metadata=env("VISIONA_PROXY_SHUTDOWN_GRACE")
    )
    #: Seconds between the heartbeat lines of ``GET /internal/events``.
    events_heartbeat: float = attrs.field(
        default=5.0, validator=_positive, metadata=env("VISIONA_PROXY_EVENTS_HEARTBEAT")
    )

    @property
    def tokens(self) -> dict[str, str]:
        return parse_static_tokens(self.static_tokens)

    @property
    def is_dev(self) -> bool:
        return self.environment.lower() in ("dev", "development")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxyConfig:
        """Read the configuration; refuse a missing secret outside ``VISIONA_ENV=dev``.

        Raises:
            ConfigError: naming the variable that is missing or wrong.
        """
        config = load(cls, os.environ if environ is None else environ)
        try:
            config.tokens  # noqa: B018 - validates the token list at start
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if not config.internal_secret:
            if not config.is_dev:
                raise ConfigError(
                    "VISIONA_INTERNAL_SECRET is required (or set VISIONA_ENV=dev to generate one)"
                )
            config = attrs.evolve(config, internal_secret=secrets.token_urlsafe(32))
            logger.warning("VISIONA_INTERNAL_SECRET not set: generated one (VISIONA_ENV=dev)")
        return config
