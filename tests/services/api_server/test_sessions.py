"""Sessions after login: idle and absolute expiry, logout, back-channel logout, provider
key rotation, the provider being down, and a restart that keeps everything."""

from __future__ import annotations

import httpx
import trio
from sqlalchemy import select
from support.apiserver import CSRF, STEP_TIMEOUT, Api
from support.oidcprovider import login_at_provider, logout_at_provider, new_signing_jwks

from visiona_services.api_server.db import AuditEvent


async def _logged_in(api: Api, browser: httpx.AsyncClient, username: str = "alice") -> None:
    assert (await api.login(browser, username)).status_code == 302
    assert (await browser.get("/api/auth/me")).status_code == 200


async def test_a_session_ends_after_the_idle_timeout(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        api.clock.advance(api.config.session_idle_timeout / 2)
        assert (await browser.get("/api/auth/me")).status_code == 200  # use keeps it alive
        api.clock.advance(api.config.session_idle_timeout / 2 + 1)
        assert (await browser.get("/api/auth/me")).status_code == 200
        api.clock.advance(api.config.session_idle_timeout + 1)
        response = await browser.get("/api/auth/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHORIZED"


async def test_a_session_ends_at_its_absolute_lifetime_however_used(api: Api) -> None:
    step = api.config.session_idle_timeout / 2
    async with api.browser() as browser:
        await _logged_in(api, browser)
        elapsed = 0.0
        while elapsed + step < api.config.session_max_age:
            api.clock.advance(step)
            elapsed += step
            assert (await browser.get("/api/auth/me")).status_code == 200
        api.clock.advance(step)
        assert (await browser.get("/api/auth/me")).status_code == 401


async def test_logout_ends_the_session_and_names_the_providers_logout(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        cookie = browser.cookies["visiona_session"]
        response = await browser.post("/api/auth/logout", headers=CSRF)
        assert response.status_code == 200
        data = response.json()["data"]
        assert data["logged_out"] is True
        assert data["end_session_url"].startswith(f"{api.provider.issuer}/") if api.provider else 0
        assert "visiona_session" not in browser.cookies  # cleared
    async with api.browser(cookies={"visiona_session": cookie}) as replay:
        assert (await replay.get("/api/auth/me")).status_code == 401


async def test_backchannel_logout_ends_the_providers_session_here(api: Api) -> None:
    assert api.provider is not None
    async with api.browser() as alice, api.browser() as bob:
        await _logged_in(api, alice, "alice")
        await _logged_in(api, bob, "bob")
        with trio.fail_after(STEP_TIMEOUT):
            # the provider posts the logout token to us before it answers
            await logout_at_provider(alice, api.provider)
        assert (await alice.get("/api/auth/me")).status_code == 401
        assert (await bob.get("/api/auth/me")).status_code == 200


async def test_a_forged_logout_token_ends_nothing(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        for token in ("not-a-jwt", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9."):
            response = await browser.post(
                "/api/auth/backchannel-logout", data={"logout_token": token}
            )
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "LOGOUT_TOKEN_INVALID"
        assert (await browser.get("/api/auth/me")).status_code == 200
        events = (await browser.get("/api/audit")).json()["data"]["events"]
    refused = await api.server.services.db.run(
        lambda db: db.scalars(
            select(AuditEvent).where(AuditEvent.action == "auth:backchannel_logout")
        ).all()
    )
    assert [event.outcome for event in refused] == ["failure", "failure"]
    assert [event["action"] for event in events] == ["auth:login"]


async def test_a_rotated_provider_key_is_fetched_once_and_logins_go_on(api: Api) -> None:
    assert api.provider is not None
    async with api.browser() as browser:
        await _logged_in(api, browser)  # caches discovery and the first key set
    await api.provider.restart(jwks=new_signing_jwks("rotated-key"))
    async with api.browser() as browser:
        await _logged_in(api, browser)


async def test_a_provider_that_is_down_gives_a_clear_error(api: Api) -> None:
    assert api.provider is not None
    async with api.browser() as browser:
        authorize = await api.start_login(browser)  # discovery is cached from here on
        callback = await login_at_provider(browser, authorize, "alice")
        await api.provider.stop()
        response = await browser.get(callback)  # the code exchange cannot happen
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "OIDC_PROVIDER_UNAVAILABLE"
        assert "Traceback" not in response.text


async def test_a_restart_keeps_users_and_live_sessions(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        before = (await browser.get("/api/auth/me")).json()["data"]
        await api.restart()
        after = await browser.get("/api/auth/me")
    assert after.status_code == 200
    assert after.json()["data"] == before
