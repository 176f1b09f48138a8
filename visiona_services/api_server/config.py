"""api-server configuration, from the environment (docs/api-server.md lists every variable).

:meth:`ApiConfig.from_env` reads, checks and completes it: a value that does not parse stops
the start naming the variable (:class:`ConfigError`, exit code 2), production refuses
missing or well-known secrets, and ``VISIONA_ENV=dev`` generates the missing ones, keeps
them in ``{VISIONA_DATA_DIR}/dev-secrets.env`` (so a restart keeps sessions) and reports
them for the operator to print.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from urllib.parse import urlsplit

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
    variable_of,
)
from ..common.internal_url import InternalUrl

__all__ = ["ApiConfig", "ConfigError", "RateLimit"]

#: Secrets shorter than this are refused in production.
MIN_SECRET_LENGTH = 32
#: Values seen in examples, seeds and demos: never accepted as a production secret.
KNOWN_DEFAULT_SECRETS = frozenset(
    {"changeme", "change-me", "secret", "s3cret", "password", "dev", "test", "demo"}
)
_KNOWN_DEFAULT_PREFIXES = ("dev-", "demo-", "test-", "example")
DEV_ENVIRONMENTS = ("dev", "development")
ENVIRONMENTS = (*DEV_ENVIRONMENTS, "production")
#: The secrets a dev start may generate (field name -> variable).
_GENERATED_SECRETS = {
    "session_secret": "VISIONA_SESSION_SECRET",
    "internal_secret": "VISIONA_INTERNAL_SECRET",
}
DEV_SECRETS_FILE = "dev-secrets.env"
STORAGE_BACKENDS = ("localfs", "s3")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of an http(s) URL, lower-case, default port left out.

    Raises:
        ValueError: not an http(s) URL with a host, or one with credentials.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {url!r}")
    if "@" in parts.netloc:
        raise ValueError(f"must not hold credentials: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}: {exc}") from None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def _public_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        origin_of(value)
    except ValueError as exc:
        raise ValueError(f"{variable_of(attribute)}: {exc}") from None
    parts = urlsplit(value)
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ValueError(f"{variable_of(attribute)}: expected scheme://host[:port], got {value!r}")


def _http_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        InternalUrl.parse(value, allow_https=True)
    except ValueError as exc:
        raise ValueError(f"{variable_of(attribute)}: {exc}") from None


def _origins(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    for item in _split(value):
        try:
            if origin_of(item) != item.rstrip("/").lower():
                raise ValueError(f"an origin is scheme://host[:port], got {item!r}")
        except ValueError as exc:
            raise ValueError(f"{variable_of(attribute)}: {exc}") from None


def _networks(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        parse_networks(value)
    except ValueError as exc:
        raise ValueError(f"{variable_of(attribute)}: {exc}") from None


def parse_networks(value: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """``"10.0.0.0/8, ::1"`` -> networks (a bare address is a network of one)."""
    return tuple(ip_network(item, strict=False) for item in _split(value))


def _ws_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(
            f"{variable_of(attribute)}: expected ws(s)://host[:port]/path, got {value!r}"
        )


def _prefixes(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    for prefix in _split(value):
        if not prefix.startswith("/") or prefix in ("/", "/api/", "/api") or ".." in prefix:
            raise ValueError(f"{variable_of(attribute)}: not a forwardable prefix: {prefix!r}")
        if prefix.startswith(("/api/auth", "/api/pairing", "/internal", "/healthz")):
            raise ValueError(f"{variable_of(attribute)}: {prefix!r} is the api-server's own")


def _scopes(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if "openid" not in value.split():
        raise ValueError(f"{variable_of(attribute)}: must include 'openid', got {value!r}")


@functools.cache
def _origins_of(urls: str) -> frozenset[str]:
    """The origins of comma-separated URLs."""
    return frozenset(origin_of(item) for item in _split(urls))


def _without_trailing_slash(value: object) -> str:
    return str(value).rstrip("/")


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@attrs.frozen
class RateLimit:
    """``N/S``: a bucket of ``N`` requests, refilled at ``N`` per ``S`` seconds."""

    requests: int
    per_seconds: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        count, sep, seconds = text.partition("/")
        try:
            limit = cls(int(count), float(seconds))
        except ValueError:
            raise ValueError(f"expected N/SECONDS (e.g. 20/60), got {text!r}") from None
        if not sep or limit.requests < 1 or not limit.per_seconds > 0:
            raise ValueError(f"expected N/SECONDS with N >= 1 and SECONDS > 0, got {text!r}")
        return limit


def _rate_limit(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        RateLimit.parse(value)
    except ValueError as exc:
        raise ValueError(f"{variable_of(attribute)}: {exc}") from None


@attrs.frozen(kw_only=True)
class ApiConfig:
    host: str = attrs.field(
        default="127.0.0.1", metadata=env("VISIONA_API_HOST", "address to listen on")
    )
    port: int = attrs.field(
        default=3721, validator=port, metadata=env("VISIONA_API_PORT", "port to listen on")
    )
    public_url: str = attrs.field(
        default="http://127.0.0.1:3721",
        validator=_public_url,
        converter=_without_trailing_slash,
        metadata=env(
            "VISIONA_PUBLIC_URL",
            "the browser-facing origin: OIDC redirect URI {it}/api/auth/callback; "
            "cookies are Secure when it is https",
        ),
    )
    data_dir: str = attrs.field(
        default="./data", metadata=env("VISIONA_DATA_DIR", "where local state is kept")
    )
    database_url: str = attrs.field(
        default="",
        repr=False,  # may hold a password
        metadata=env(
            "VISIONA_DATABASE_URL",
            "SQLAlchemy URL [sqlite:///{VISIONA_DATA_DIR}/visiona.db]; "
            "PostgreSQL: postgresql+psycopg://user:pass@host/db",
        ),
    )
    session_secret: str = attrs.field(
        default="",
        repr=False,
        metadata=env("VISIONA_SESSION_SECRET", "signs session and login cookies (required)"),
    )
    internal_secret: str = attrs.field(
        default="",
        repr=False,
        metadata=env(
            "VISIONA_INTERNAL_SECRET",
            "bearer secret shared with the remote-proxy, both ways (required)",
        ),
    )
    proxy_internal_url: str = attrs.field(
        default="http://127.0.0.1:3801",
        validator=_http_url,
        converter=_without_trailing_slash,
        metadata=env("VISIONA_PROXY_INTERNAL_URL", "the remote-proxy's internal API"),
    )
    tunnel_public_url: str = attrs.field(
        default="ws://127.0.0.1:3800/tunnel/connect",
        validator=_ws_url,
        metadata=env(
            "VISIONA_TUNNEL_PUBLIC_URL",
            "the address agents dial (handed out by the pairing exchange)",
        ),
    )
    pairing_token_ttl: float = attrs.field(
        default=600.0,
        validator=positive,
        metadata=env("VISIONA_PAIRING_TOKEN_TTL", "seconds a pairing token stays usable"),
    )
    forward_prefixes: str = attrs.field(
        default="/api/cameras/,/api/inference/,/api/devices/scan,/ws/",
        validator=_prefixes,
        metadata=env(
            "VISIONA_FORWARD_PREFIXES",
            "comma-separated path prefixes forwarded to a device's local server",
        ),
    )
    forward_timeout: float = attrs.field(
        default=60.0,
        validator=positive,
        metadata=env(
            "VISIONA_FORWARD_TIMEOUT",
            "seconds the remote-proxy may keep a forward waiting (for its answer, or to take "
            "a piece of the body); longer than its VISIONA_PROXY_FORWARD_TIMEOUT",
        ),
    )
    oidc_issuer: str = attrs.field(
        default="",
        metadata=env("VISIONA_OIDC_ISSUER", "the OpenID provider's issuer URL (required)"),
    )
    oidc_client_id: str = attrs.field(
        default="", metadata=env("VISIONA_OIDC_CLIENT_ID", "our client id there (required)")
    )
    oidc_client_secret: str = attrs.field(
        default="",
        repr=False,
        metadata=env(
            "VISIONA_OIDC_CLIENT_SECRET",
            "optional: without it the client is public (PKCE only, token auth 'none')",
        ),
    )
    oidc_scopes: str = attrs.field(
        default="openid email profile",
        validator=_scopes,
        metadata=env("VISIONA_OIDC_SCOPES", "scopes asked for at login"),
    )
    cors_allowed_origins: str = attrs.field(
        default="",
        validator=_origins,
        metadata=env(
            "VISIONA_CORS_ALLOWED_ORIGINS",
            "comma-separated origins allowed to call the API with credentials "
            "(the public URL's origin always is)",
        ),
    )
    trusted_proxies: str = attrs.field(
        default="",
        validator=_networks,
        metadata=env(
            "VISIONA_TRUSTED_PROXIES",
            "comma-separated addresses or networks of reverse proxies whose "
            "X-Forwarded-For names the client (for rate limits and the audit trail)",
        ),
    )
    log_level: str = attrs.field(
        default="info",
        validator=one_of(*LOG_LEVELS),
        metadata=env("VISIONA_LOG_LEVEL", "debug, info, warning, error"),
    )
    environment: str = attrs.field(
        default="production",
        validator=one_of(*ENVIRONMENTS),
        metadata=env("VISIONA_ENV", "production, or dev (generates and prints missing secrets)"),
    )
    session_idle_timeout: float = attrs.field(
        default=1800.0,
        validator=positive,
        metadata=env("VISIONA_SESSION_IDLE_TIMEOUT", "seconds a session lives unused"),
    )
    session_max_age: float = attrs.field(
        default=43200.0,
        validator=positive,
        metadata=env("VISIONA_SESSION_MAX_AGE", "seconds a session lives at most"),
    )
    login_timeout: float = attrs.field(
        default=600.0,
        validator=positive,
        metadata=env("VISIONA_LOGIN_TIMEOUT", "seconds a started login may take"),
    )
    rate_limit_login: str = attrs.field(
        default="20/60",
        validator=_rate_limit,
        metadata=env(
            "VISIONA_RATE_LIMIT_LOGIN",
            "N/SECONDS per client address for login and callback",
        ),
    )
    rate_limit_pairing: str = attrs.field(
        default="10/60",
        validator=_rate_limit,
        metadata=env(
            "VISIONA_RATE_LIMIT_PAIRING",
            "N/SECONDS per client address for the pairing exchange",
        ),
    )
    rate_limit_backchannel: str = attrs.field(
        default="60/60",
        validator=_rate_limit,
        metadata=env(
            "VISIONA_RATE_LIMIT_BACKCHANNEL",
            "N/SECONDS per client address for back-channel logout",
        ),
    )
    storage_backend: str = attrs.field(
        default="localfs",
        validator=one_of(*STORAGE_BACKENDS),
        metadata=env("VISIONA_STORAGE_BACKEND", "where model files are kept: localfs or s3"),
    )
    storage_signing_secret: str = attrs.field(
        default="",
        repr=False,
        metadata=env(
            "VISIONA_STORAGE_SIGNING_SECRET",
            "signs the local store's upload and download URLs (required with localfs)",
        ),
    )
    s3_endpoint: str = attrs.field(
        default="",
        metadata=env("VISIONA_S3_ENDPOINT", "http(s)://host[:port] of the S3 server (s3)"),
    )
    s3_bucket: str = attrs.field(
        default="", metadata=env("VISIONA_S3_BUCKET", "the bucket (s3; created if missing)")
    )
    s3_region: str = attrs.field(
        default="us-east-1", metadata=env("VISIONA_S3_REGION", "the SigV4 region (s3)")
    )
    s3_access_key: str = attrs.field(
        default="", metadata=env("VISIONA_S3_ACCESS_KEY", "access key id (s3)")
    )
    s3_secret_key: str = attrs.field(
        default="",
        repr=False,
        metadata=env("VISIONA_S3_SECRET_KEY", "secret access key (s3)"),
    )
    model_max_size_mb: int = attrs.field(
        default=100,
        validator=at_least(1),
        metadata=env("VISIONA_MODEL_MAX_SIZE_MB", "the largest model file, in MB (10^6 bytes)"),
    )
    model_upload_ttl: float = attrs.field(
        default=3600.0,
        validator=positive,
        metadata=env(
            "VISIONA_MODEL_UPLOAD_TTL",
            "seconds an upload URL is valid; a model not finalized by then is swept away",
        ),
    )
    model_sweep_interval: float = attrs.field(
        default=300.0,
        validator=positive,
        metadata=env("VISIONA_MODEL_SWEEP_INTERVAL", "seconds between sweeps of stale uploads"),
    )
    db_threads: int = attrs.field(
        default=8,
        validator=at_least(1),
        metadata=env("VISIONA_DB_THREADS", "worker threads for database calls"),
    )

    @property
    def is_dev(self) -> bool:
        return self.environment.lower() in DEV_ENVIRONMENTS

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'visiona.db'}"

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/api/auth/callback"

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def allowed_origins(self) -> frozenset[str]:
        """The origins trusted for CSRF and CORS: ours and the configured ones (checked on
        every request: parsed once)."""
        return _origins_of(self.cors_allowed_origins) | _origins_of(self.public_url)

    @property
    def cors_origins(self) -> frozenset[str]:
        return _origins_of(self.cors_allowed_origins)

    @property
    def model_max_size(self) -> int:
        return self.model_max_size_mb * 1_000_000

    @property
    def objects_dir(self) -> Path:
        return Path(self.data_dir).resolve() / "objects"

    @property
    def forwarded_prefixes(self) -> tuple[str, ...]:
        return tuple(_split(self.forward_prefixes))

    @property
    def trusted_proxy_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def login_rate_limit(self) -> RateLimit:
        return RateLimit.parse(self.rate_limit_login)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> tuple[ApiConfig, dict[str, str]]:
        """Read the configuration; return it with the secrets generated for a dev start
        (variable -> value, for the operator; empty otherwise).

        Raises:
            ConfigError: naming the variable that is missing or wrong.
        """
        config = load(cls, os.environ if environ is None else environ)
        return config.with_secrets()

    def with_secrets(self) -> tuple[ApiConfig, dict[str, str]]:
        """Check the secrets; in dev, complete the missing ones (see the module doc)."""
        generated: dict[str, str] = {}
        config = self
        required = dict(_GENERATED_SECRETS)
        if self.storage_backend == "localfs":
            required["storage_signing_secret"] = "VISIONA_STORAGE_SIGNING_SECRET"
        for field, variable in required.items():
            value: str = getattr(config, field)
            if value and (config.is_dev or not _weak_secret(value)):
                continue
            if not config.is_dev:
                problem = "is required" if not value else "is a known or weak value"
                raise ConfigError(
                    f"{variable} {problem} in production (at least {MIN_SECRET_LENGTH} "
                    "random characters; or set VISIONA_ENV=dev to generate one)"
                )
            generated[variable] = _dev_secret(Path(config.data_dir), variable)
            config = attrs.evolve(config, **{field: generated[variable]})  # type: ignore[arg-type]
        values = [getattr(config, field) for field in required]
        if not config.is_dev and len(set(values)) < len(values):
            names = " and ".join(required.values())
            raise ConfigError(f"{names} must all differ in production")
        if config.storage_backend == "s3":
            for variable, value in (
                ("VISIONA_S3_BUCKET", config.s3_bucket),
                ("VISIONA_S3_ACCESS_KEY", config.s3_access_key),
                ("VISIONA_S3_SECRET_KEY", config.s3_secret_key),
            ):
                if not value:
                    raise ConfigError(f"{variable} is required with VISIONA_STORAGE_BACKEND=s3")
        return config, generated

    def require_oidc(self) -> None:
        """Serving needs a provider; ``migrate`` does not.

        Raises:
            ConfigError: naming the missing variable.
        """
        for variable, value in (
            ("VISIONA_OIDC_ISSUER", self.oidc_issuer),
            ("VISIONA_OIDC_CLIENT_ID", self.oidc_client_id),
        ):
            if not value:
                raise ConfigError(f"{variable} is required (OIDC is the only way in)")
        try:
            origin_of(self.oidc_issuer)
        except ValueError as exc:
            raise ConfigError(f"VISIONA_OIDC_ISSUER: {exc}") from None


def _weak_secret(value: str) -> bool:
    lowered = value.lower()
    return (
        len(value) < MIN_SECRET_LENGTH
        or lowered in KNOWN_DEFAULT_SECRETS
        or lowered.startswith(_KNOWN_DEFAULT_PREFIXES)
    )


def _dev_secret(data_dir: Path, variable: str) -> str:
    """The dev secret for ``variable``: the one kept under ``data_dir``, or a new one
    written there. The file is the operator's only (0600, never through a link)."""
    path = data_dir / DEV_SECRETS_FILE
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # also when the file was there with looser rights
    with os.fdopen(fd, "r+") as file:
        kept: dict[str, str] = {}
        for line in file.read().splitlines():
            name, sep, value = line.partition("=")
            if sep:
                kept[name.strip()] = value.strip()
        if not kept.get(variable):
            kept[variable] = secrets.token_urlsafe(32)
            file.seek(0)
            file.truncate()
            file.writelines(f"{name}={value}\n" for name, value in kept.items())
    return kept[variable]
