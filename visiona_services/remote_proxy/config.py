"""remote-proxy configuration, from the environment (see docs/remote-proxy.md)."""

from __future__ import annotations

import logging
import os
import secrets
import ssl
from collections.abc import Mapping

import attrs

from ..common.envconfig import (
    LOG_LEVELS,
    ConfigError,
    at_least,
    env,
    load,
    one_of,
    port,
    positive,
)
from ..common.internal_url import InternalUrl

logger = logging.getLogger("visiona_services.remote_proxy")


def _api_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value:
        try:
            InternalUrl.parse(value)
        except ValueError as exc:
            variable = attribute.metadata.get("env", attribute.name)
            raise ValueError(f"{variable}: {exc}") from None


def parse_static_tokens(
    text: str, *, separator: str = ",", source: str = "VISIONA_PROXY_STATIC_TOKENS"
) -> dict[str, str]:
    """``"tokenA=device-1,tokenB=device-2"`` -> ``{"tokenA": "device-1", ...}``; with
    ``separator="\n"``, one ``token=device`` per line, blank lines and ``#`` comments
    skipped. A token given twice is an error (which device would it be?); the message
    never shows a token, only where it is."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.split(separator), start=1):
        item = line.strip()
        if not item or (separator == "\n" and item.startswith("#")):
            continue
        where = f"{source}, line {number}" if separator == "\n" else f"{source}, item {number}"
        token, sep, device = item.partition("=")
        if not sep or not token.strip() or not device.strip():
            raise ValueError(f"{where}: expected token=device")
        if token.strip() in tokens:
            raise ValueError(f"{where}: this token is given twice")
        tokens[token.strip()] = device.strip()
    return tokens


def read_static_tokens_file(path: str) -> dict[str, str]:
    """The ``token=device`` lines of ``path`` (:envvar:`VISIONA_PROXY_STATIC_TOKENS_FILE`).

    Raises:
        ValueError: the file cannot be read, or a line is malformed.
    """
    variable = "VISIONA_PROXY_STATIC_TOKENS_FILE"
    try:
        with open(path, encoding="utf-8") as file:
            if os.fstat(file.fileno()).st_mode & 0o004:
                logger.warning("%s: the file is readable by everyone; it holds secrets", variable)
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ValueError(f"{variable}: cannot read {path}: {reason or exc}") from None
    return parse_static_tokens(text, separator="\n", source=variable)


#: ``VISIONA_ENV``'s values: the first two allow a generated internal secret.
DEV_ENVIRONMENTS = ("dev", "development")
ENVIRONMENTS = (*DEV_ENVIRONMENTS, "production")


@attrs.frozen(kw_only=True)
class ProxyConfig:
    tunnel_host: str = attrs.field(
        default="0.0.0.0",
        metadata=env("VISIONA_TUNNEL_HOST", "address of the agents' tunnel listener"),
    )
    tunnel_port: int = attrs.field(
        default=3800,
        validator=port,
        metadata=env("VISIONA_TUNNEL_PORT", "port of the agents' tunnel listener"),
    )
    #: ``wss://`` directly: the tunnel listener's certificate chain and key (PEM files),
    #: both or neither.
    tunnel_tls_cert: str = attrs.field(
        default="",
        metadata=env(
            "VISIONA_TUNNEL_TLS_CERT",
            "PEM certificate chain: the tunnel listener speaks TLS (wss://); needs the key",
        ),
    )
    tunnel_tls_key: str = attrs.field(
        default="",
        metadata=env("VISIONA_TUNNEL_TLS_KEY", "PEM private key of VISIONA_TUNNEL_TLS_CERT"),
    )
    #: Bounds against hostile peers (docs/remote-proxy.md, "Limits and abuse").
    tunnel_max_handshakes: int = attrs.field(
        default=256,
        validator=at_least(1),
        metadata=env(
            "VISIONA_TUNNEL_MAX_HANDSHAKES",
            "connections to the tunnel listener still in their handshake; more get 503",
        ),
    )
    tunnel_max_handshakes_per_address: int = attrs.field(
        default=16,
        validator=at_least(1),
        metadata=env(
            "VISIONA_TUNNEL_MAX_HANDSHAKES_PER_ADDRESS",
            "the same, per client address (an IPv6 /64 counts as one)",
        ),
    )
    tunnel_max_tunnels: int = attrs.field(
        default=0,
        validator=at_least(0),
        metadata=env(
            "VISIONA_TUNNEL_MAX_TUNNELS",
            "live tunnels at most (a new device over it gets 503); 0: as many as the "
            "process's file descriptor limit leaves room for",
        ),
    )
    tunnel_auth_failures_burst: int = attrs.field(
        default=10,
        validator=at_least(1),
        metadata=env(
            "VISIONA_TUNNEL_AUTH_FAILURES_BURST",
            "refused tokens per client address before it gets 429 (then at the rate below)",
        ),
    )
    tunnel_auth_failures_per_minute: float = attrs.field(
        default=30.0,
        validator=positive,
        metadata=env(
            "VISIONA_TUNNEL_AUTH_FAILURES_PER_MINUTE",
            "refused tokens per client address and minute, after the burst",
        ),
    )
    internal_host: str = attrs.field(
        default="127.0.0.1",
        metadata=env(
            "VISIONA_PROXY_INTERNAL_HOST", "address of the internal API (api-server only)"
        ),
    )
    internal_port: int = attrs.field(
        default=3801,
        validator=port,
        metadata=env("VISIONA_PROXY_INTERNAL_PORT", "port of the internal API"),
    )
    #: Shared secret of the internal API (``Authorization: Bearer <secret>``).
    internal_secret: str = attrs.field(
        default="",
        repr=False,
        metadata=env(
            "VISIONA_INTERNAL_SECRET",
            "required: Authorization: Bearer of the internal API and of the token checks "
            "at the api-server (the api-server's own VISIONA_INTERNAL_SECRET)",
        ),
    )
    #: ``dev`` allows a generated internal secret; anything else requires one.
    environment: str = attrs.field(
        default="production",
        validator=one_of(*ENVIRONMENTS),
        metadata=env(
            "VISIONA_ENV", "production, or dev (generates a missing secret and prints it once)"
        ),
    )
    #: ``tokenA=device-1,tokenB=device-2``: device tokens for standalone use.
    static_tokens: str = attrs.field(
        default="",
        repr=False,
        metadata=env(
            "VISIONA_PROXY_STATIC_TOKENS",
            "tokenA=device-1,tokenB=device-2: the device tokens when no api-server checks them",
        ),
    )
    #: A file of ``token=device`` lines, for more devices than an environment variable
    #: holds (Linux caps one at 128 KiB: about 2,400 tokens).
    static_tokens_file: str = attrs.field(
        default="",
        metadata=env(
            "VISIONA_PROXY_STATIC_TOKENS_FILE",
            "a file of token=device lines (# comments): more static device tokens",
        ),
    )
    #: The api-server's internal base URL, to verify device tokens
    #: (``POST {url}/internal/devices/verify``).
    api_internal_url: str = attrs.field(
        default="",
        validator=_api_url,
        metadata=env(
            "VISIONA_API_INTERNAL_URL",
            "the api-server's internal base URL, http://host[:port][/prefix]; set, it checks "
            "the device tokens",
        ),
    )
    log_level: str = attrs.field(
        default="info",
        validator=one_of(*LOG_LEVELS),
        metadata=env("VISIONA_LOG_LEVEL", ", ".join(LOG_LEVELS)),
    )
    #: A forwarded request whose response head takes longer than this gets 504.
    forward_timeout: float = attrs.field(
        default=30.0,
        validator=positive,
        metadata=env(
            "VISIONA_PROXY_FORWARD_TIMEOUT",
            "seconds an agent has for a response head, else 504 TUNNEL_TIMEOUT",
        ),
    )
    #: On SIGTERM, how long in-flight forwards may take to finish.
    shutdown_grace: float = attrs.field(
        default=20.0,
        validator=positive,
        metadata=env("VISIONA_PROXY_SHUTDOWN_GRACE", "seconds in-flight forwards get on shutdown"),
    )
    #: Seconds between the heartbeat lines of ``GET /internal/events``.
    events_heartbeat: float = attrs.field(
        default=5.0,
        validator=positive,
        metadata=env(
            "VISIONA_PROXY_EVENTS_HEARTBEAT",
            "seconds between the heartbeat lines of GET /internal/events",
        ),
    )
    #: Set by :meth:`from_env` when it generated :attr:`internal_secret` (``VISIONA_ENV=dev``):
    #: the console script prints it once.
    secret_generated: bool = attrs.field(default=False, repr=False)

    def static_token_table(self) -> dict[str, str]:
        """The static device tokens: the variable's and the file's together.

        Raises:
            ValueError: a malformed entry, an unreadable file, or a token given twice.
        """
        tokens = parse_static_tokens(self.static_tokens)
        if self.static_tokens_file:
            from_file = read_static_tokens_file(self.static_tokens_file)
            if tokens.keys() & from_file.keys():
                raise ValueError(
                    "VISIONA_PROXY_STATIC_TOKENS and VISIONA_PROXY_STATIC_TOKENS_FILE: "
                    "a token is in both"
                )
            tokens.update(from_file)
        return tokens

    @property
    def is_dev(self) -> bool:
        return self.environment.lower() in DEV_ENVIRONMENTS

    def tunnel_ssl_context(self) -> ssl.SSLContext | None:
        """The tunnel listener's TLS, when a certificate and key are configured.

        Raises:
            ValueError: only one of them is set, or they cannot be loaded.
        """
        if not self.tunnel_tls_cert and not self.tunnel_tls_key:
            return None
        if not (self.tunnel_tls_cert and self.tunnel_tls_key):
            raise ValueError(
                "VISIONA_TUNNEL_TLS_CERT and VISIONA_TUNNEL_TLS_KEY: set both or neither"
            )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tunnel_tls_cert, self.tunnel_tls_key)
        except OSError as exc:  # ssl.SSLError included
            reason = exc.strerror or exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
            raise ValueError(
                f"VISIONA_TUNNEL_TLS_CERT / VISIONA_TUNNEL_TLS_KEY: cannot load: {reason or exc}"
            ) from None
        return context

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxyConfig:
        """Read the configuration; refuse a missing secret outside ``VISIONA_ENV=dev``.

        Raises:
            ConfigError: naming the variable that is missing or wrong.
        """
        config = load(cls, os.environ if environ is None else environ)
        try:
            config.static_token_table()  # validated at start
            config.tunnel_ssl_context()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if not config.internal_secret:
            if not config.is_dev:
                raise ConfigError(
                    "VISIONA_INTERNAL_SECRET is required (or set VISIONA_ENV=dev to generate one)"
                )
            secret = secrets.token_urlsafe(32)
            config = attrs.evolve(config, internal_secret=secret, secret_generated=True)
            logger.warning("VISIONA_INTERNAL_SECRET not set: generated one (VISIONA_ENV=dev)")
        return config
