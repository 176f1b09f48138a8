"""``/api/system/health`` and ``/api/system/info``."""

from __future__ import annotations

from support.apiserver import INTERNAL_SECRET, SESSION_SECRET, Api
from support.system import System


async def test_health_reports_the_database_and_an_unreachable_remote_proxy(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        health = (await browser.get("/api/system/health")).json()["data"]
    assert health["status"] == "degraded"
    assert health["checks"]["database"]["status"] == "ok"
    assert health["checks"]["remote_proxy"]["status"] == "unreachable"


async def test_health_is_ok_with_the_remote_proxy_up(system: System) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        health = (await browser.get("/api/system/health")).json()["data"]
    assert health["status"] == "ok"
    assert health["checks"]["remote_proxy"] == {"status": "ok", "tunnels": 0, "draining": False}


async def test_info_shows_the_configuration_without_secrets(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        response = await browser.get("/api/system/info")
    info = response.json()["data"]
    assert info["version"] and info["config"]["oidc_public_client"] is True
    assert info["config"]["database"] in ("sqlite", "postgresql")
    for secret in (SESSION_SECRET, INTERNAL_SECRET):
        assert secret not in response.text
