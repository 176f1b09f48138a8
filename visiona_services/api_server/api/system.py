"""``/healthz`` (public: the process is up), ``/api/system/health`` (the database and the
remote-proxy, each with its state) and ``/api/system/info`` (version, build, the
configuration without secrets)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import httpx
import quart
import sqlalchemy.exc
import trio
from quart_trio import QuartTrio

from ...common.http import json_response, ok_envelope
from ..policy import public
from ..services import ApiServices, current_services

__all__ = ["register"]

#: The health checks give up after this long.
CHECK_TIMEOUT = 3.0


def register(app: QuartTrio) -> None:
    @app.get("/healthz")
    @public
    async def healthz() -> quart.Response:
        return json_response(200, ok_envelope({"status": "ok"}))

    @app.get("/api/system/health")
    async def health() -> quart.Response:
        services = current_services()
        checks = {
            "database": await _database(services),
            "remote_proxy": await _remote_proxy(services),
        }
        status = "ok" if all(check["status"] == "ok" for check in checks.values()) else "degraded"
        return json_response(200, ok_envelope({"status": status, "checks": checks}))

    @app.get("/api/system/info")
    async def info() -> quart.Response:
        return json_response(200, ok_envelope(_info(current_services())))


async def _database(services: ApiServices) -> dict[str, Any]:
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            latency = await services.db.ping()
    except (sqlalchemy.exc.SQLAlchemyError, TimeoutError) as exc:
        return {"status": "error", "error": type(exc).__name__}
    return {"status": "ok", "latency_ms": round(latency * 1000, 2)}


async def _remote_proxy(services: ApiServices) -> dict[str, Any]:
    url = f"{services.config.proxy_internal_url}/internal/health"
    headers = {"authorization": f"Bearer {services.config.internal_secret}"}
    try:
        response = await services.http.get(url, headers=headers, timeout=CHECK_TIMEOUT)
    except httpx.HTTPError as exc:
        return {"status": "unreachable", "error": type(exc).__name__}
    if response.status_code == 401:
        return {"status": "error", "error": "the remote-proxy refused our internal secret"}
    if response.status_code != 200:
        return {"status": "error", "error": f"HTTP {response.status_code}"}
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        return {"status": "error", "error": "not the remote-proxy's answer"}
    return {"status": "ok", "tunnels": data.get("tunnels"), "draining": data.get("draining")}


def _info(services: ApiServices) -> dict[str, Any]:
    config = services.config
    return {
        "version": metadata.version("visiona-tunnel"),
        "build": os.environ.get("VISIONA_BUILD", "dev"),
        "python": platform.python_version(),
        "config": {
            "environment": config.environment,
            "public_url": config.public_url,
            "database": services.db.dialect,
            "oidc_issuer": config.oidc_issuer,
            "oidc_client_id": config.oidc_client_id,
            "oidc_public_client": not config.oidc_client_secret,
            "oidc_scopes": config.oidc_scopes.split(),
            "proxy_internal_url": config.proxy_internal_url,
            "cors_allowed_origins": sorted(config.cors_origins),
            "session_idle_timeout": config.session_idle_timeout,
            "session_max_age": config.session_max_age,
        },
    }
