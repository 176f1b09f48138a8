"""The OIDC login (BFF) against the real dev provider: the happy path and each way it
must fail."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import select
from support.apiserver import Api
from support.oidcprovider import login_at_provider

from visiona_services.api_server.db import PendingLogin


def _me(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    data: dict[str, object] = body["data"]
    return data


async def test_a_login_through_the_provider_starts_a_session(api: Api) -> None:
    async with api.browser() as browser:
        callback = await api.login(browser, "alice")
        assert callback.status_code == 302
        assert callback.headers["location"] == "/"
        me = _me(await browser.get("/api/auth/me"))
    assert me["email"] == "alice@example.test"
    assert me["name"] == "alice"
    assert me["issuer"] == api.provider.issuer if api.provider else False


async def test_the_authorization_request_uses_pkce_s256_state_and_nonce(api: Api) -> None:
    async with api.browser() as browser:
        query = parse_qs(urlsplit(await api.start_login(browser)).query)
    assert query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 32 and len(query["nonce"][0]) >= 32
    assert query["redirect_uri"] == [f"{api.url}/api/auth/callback"]
    assert query["scope"] == ["openid email profile"]


async def test_the_login_returns_to_a_local_next_path(api: Api) -> None:
    async with api.browser() as browser:
        callback = await api.login(browser, "alice", next_path="/devices?tab=online")
    assert callback.headers["location"] == "/devices?tab=online"


async def test_next_never_leaves_the_site(api: Api) -> None:
    for hostile in ("https://evil.test/", "//evil.test/x", "/\\evil.test", "javascript:alert(1)"):
        async with api.browser() as browser:
            callback = await api.login(browser, "alice", next_path=hostile)
        assert callback.headers["location"] == "/", hostile


async def test_cookies_are_httponly_lax_and_not_secure_on_http(api: Api) -> None:
    async with api.browser() as browser:
        login = await browser.get("/api/auth/login")
        callback_url = await login_at_provider(browser, login.headers["location"], "alice")
        callback = await browser.get(callback_url)
    login_cookie = login.headers["set-cookie"]
    assert login_cookie.startswith("visiona_login=")
    assert "HttpOnly" in login_cookie and "SameSite=Lax" in login_cookie
    assert "Path=/api/auth" in login_cookie and "Secure" not in login_cookie
    session_cookie = next(
        value
        for value in callback.headers.get_list("set-cookie")
        if value.startswith("visiona_session=")
    )
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie
    assert "Path=/" in session_cookie and "Secure" not in session_cookie


async def test_each_login_gets_a_new_session_id(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        first = browser.cookies["visiona_session"]
        await api.login(browser, "alice")
        second = browser.cookies["visiona_session"]
        assert first != second
        _me(await browser.get("/api/auth/me"))
    async with api.browser(cookies={"visiona_session": first}) as old:
        assert (await old.get("/api/auth/me")).status_code == 401  # fixation: the old id died


async def test_a_callback_without_the_login_cookie_fails(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        browser.cookies.delete("visiona_login")
        response = await browser.get(callback)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "LOGIN_STATE_INVALID"


async def test_a_tampered_state_fails_and_burns_the_login(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        tampered = callback.replace("state=", "state=x")
        assert (await browser.get(tampered)).json()["error"]["code"] == "LOGIN_STATE_INVALID"
        # the pending login is single use: the genuine callback now fails too
        response = await browser.get(callback)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "LOGIN_STATE_INVALID"


async def test_a_replayed_callback_fails(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        login_cookie = browser.cookies["visiona_login"]
        assert (await browser.get(callback)).status_code == 302
    async with api.browser(cookies={"visiona_login": login_cookie}) as replay:
        response = await replay.get(callback)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "LOGIN_STATE_INVALID"


async def test_a_tampered_login_cookie_fails(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        [cookie] = [c for c in browser.cookies.jar if c.name == "visiona_login"]
        assert cookie.value is not None
        cookie.value = ("B" if cookie.value[0] == "A" else "A") + cookie.value[1:]
        response = await browser.get(callback)
    assert response.json()["error"]["code"] == "LOGIN_STATE_INVALID"


async def test_an_expired_pending_login_fails(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        api.clock.advance(api.config.login_timeout + 1)
        response = await browser.get(callback)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "LOGIN_EXPIRED"
    left = await api.server.services.db.run(lambda db: db.scalars(select(PendingLogin)).all())
    assert left == []  # removed, not left behind


async def test_a_subject_longer_than_we_keep_is_refused_not_a_crash(api: Api) -> None:
    async with api.browser() as browser:
        response = await api.login(browser, "a" * 300)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "ID_TOKEN_INVALID"


async def test_a_failed_login_does_not_say_where_the_provider_is(api: Api) -> None:
    assert api.provider is not None
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        await api.provider.stop()
        response = await browser.get(callback)
    assert response.json()["error"]["code"] == "OIDC_PROVIDER_UNAVAILABLE"
    assert str(api.provider.port) not in response.text


async def test_a_denied_consent_fails_cleanly(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice", consent=False)
        response = await browser.get(callback)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "LOGIN_DENIED"


async def test_a_callback_from_another_issuer_fails(api: Api) -> None:
    async with api.browser() as browser:
        authorize = await api.start_login(browser)
        callback = await login_at_provider(browser, authorize, "alice")
        query = parse_qs(urlsplit(callback).query)
        forged = f"/api/auth/callback?code={query['code'][0]}&state={query['state'][0]}"
        response = await browser.get(forged + "&iss=http%3A%2F%2Fevil.test")
    assert response.json()["error"]["code"] == "LOGIN_ISSUER_INVALID"


async def test_a_browser_gets_an_html_page_for_a_failed_login(api: Api) -> None:
    async with api.browser() as browser:
        response = await browser.get(
            "/api/auth/callback?code=x&state=y", headers={"accept": "text/html"}
        )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "LOGIN_STATE_INVALID" in response.text and "Traceback" not in response.text
