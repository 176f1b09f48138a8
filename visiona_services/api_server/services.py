"""What the routes use, built once per process: configuration, database, OIDC client,
outgoing HTTP, rate limiter, the model Store. :func:`open_services` owns them (an async
context manager: the HTTP client and the database close when it ends)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import attrs
import httpx
import quart
import trio

from ..common.inflight import InFlight
from .auth.oidc import OidcClient
from .auth.sessions import SessionPolicy
from .config import ApiConfig, RateLimit
from .db import Database
from .presence import Presence
from .ratelimit import RateLimiter
from .realtime import Broker
from .storage import LocalFSStore, S3Store, Store

__all__ = ["ApiServices", "current_services", "open_services"]

_EXTENSION = "visiona"
#: Outgoing calls (the provider, the remote-proxy) give up after this long.
HTTP_TIMEOUT = 10.0


@attrs.define(eq=False)
class ApiServices:
    config: ApiConfig
    db: Database
    oidc: OidcClient
    http: httpx.AsyncClient
    limiter: RateLimiter
    session_policy: SessionPolicy
    #: Where model files are kept (``VISIONA_STORAGE_BACKEND``).
    store: Store
    presence: Presence = attrs.field(factory=Presence)
    broker: Broker = attrs.field(factory=Broker)
    #: Forwards to devices running now (:mod:`.forwarding`).
    forwards: InFlight = attrs.field(factory=InFlight)
    #: Seconds between checks that a realtime feed's session is still alive.
    feed_session_recheck: float = 30.0
    #: Now, for session and login lifetimes (tests move it).
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def rate_limit(self, bucket: str) -> RateLimit:
        """The limit named ``bucket`` (a route's :func:`~.policy.rate_limited`)."""
        limits = {
            "login": self.config.login_rate_limit,
            "backchannel": RateLimit.parse(self.config.rate_limit_backchannel),
            "pairing": RateLimit.parse(self.config.rate_limit_pairing),
        }
        return limits[bucket]

    def install(self, app: quart.Quart) -> None:
        app.extensions[_EXTENSION] = self


async def open_store(config: ApiConfig, http: httpx.AsyncClient) -> Store:
    """The configured Store: LocalFS under the data dir, or S3 (its bucket made if missing)."""
    if config.storage_backend == "s3":
        store = S3Store(
            config.s3_endpoint,
            config.s3_bucket,
            config.s3_region,
            config.s3_access_key,
            config.s3_secret_key,
            http,
        )
        await store.ensure_bucket()
        return store
    return LocalFSStore(config.objects_dir, signing_secret=config.storage_signing_secret)


def current_services() -> ApiServices:
    return cast(ApiServices, quart.current_app.extensions[_EXTENSION])


@asynccontextmanager
async def open_services(config: ApiConfig, *, migrate: bool = True) -> AsyncIterator[ApiServices]:
    """Everything the app needs; with ``migrate`` the database schema is brought up to
    date first."""
    db = Database(config.resolved_database_url, config.db_threads)
    try:
        if migrate:
            await trio.to_thread.run_sync(db.migrate)
        async with httpx.AsyncClient(
            timeout=HTTP_TIMEOUT, follow_redirects=False, trust_env=False
        ) as http:
            oidc = OidcClient(
                issuer=config.oidc_issuer,
                client_id=config.oidc_client_id,
                client_secret=config.oidc_client_secret or None,
                scopes=config.oidc_scopes,
                redirect_uri=config.redirect_uri,
                http=http,
            )
            policy = SessionPolicy(
                idle_timeout=timedelta(seconds=config.session_idle_timeout),
                max_age=timedelta(seconds=config.session_max_age),
                login_timeout=timedelta(seconds=config.login_timeout),
            )
            store = await open_store(config, http)
            yield ApiServices(config, db, oidc, http, RateLimiter(), policy, store)
    finally:
        db.dispose()
