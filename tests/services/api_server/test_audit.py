"""The audit trail: every login, logout and failed login is a row; ``GET /api/audit``
shows the caller's own, newest first, a page at a time."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session
from support.apiserver import CSRF, Api

from visiona_services.api_server.db import AuditEvent


async def _all_events(api: Api) -> list[AuditEvent]:
    def query(db: Session) -> list[AuditEvent]:
        return list(db.scalars(select(AuditEvent).order_by(AuditEvent.id)))

    return await api.server.services.db.run(query)


async def test_login_and_logout_are_audited_with_their_request_ids(api: Api) -> None:
    async with api.browser() as browser:
        login = await api.login(browser, "alice")
        logout = await browser.post("/api/auth/logout", headers=CSRF)
        await api.login(browser, "alice")
        events = (await browser.get("/api/audit")).json()["data"]["events"]
    assert [e["action"] for e in events] == ["auth:login", "auth:logout", "auth:login"]
    assert all(e["outcome"] == "success" for e in events)
    assert all(e["client_address"] == "127.0.0.1" for e in events)
    assert events[2]["request_id"] == login.headers["x-request-id"]
    assert events[1]["request_id"] == logout.headers["x-request-id"]
    assert events[0]["at"] >= events[1]["at"] >= events[2]["at"]


async def test_a_failed_login_is_audited(api: Api) -> None:
    async with api.browser() as browser:
        response = await browser.get("/api/auth/callback?code=x&state=y")
    [event] = await _all_events(api)
    assert (event.action, event.outcome, event.user_id) == ("auth:login_failed", "failure", None)
    assert event.detail == {"reason": "LOGIN_STATE_INVALID"}
    assert event.request_id == response.headers["x-request-id"]


async def test_the_audit_list_pages_from_newest_to_oldest(api: Api) -> None:
    async with api.browser() as browser:
        for _ in range(3):
            await api.login(browser, "alice")
        first = (await browser.get("/api/audit", params={"limit": 2})).json()["data"]
        rest = (
            await browser.get("/api/audit", params={"limit": 2, "before": first["next_before"]})
        ).json()["data"]
    ids = [e["id"] for e in first["events"] + rest["events"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 3
    assert rest["next_before"] is None


async def test_users_see_only_their_own_events(api: Api) -> None:
    async with api.browser() as alice, api.browser() as bob:
        await api.login(alice, "alice")
        await api.login(bob, "bob")
        await bob.post("/api/auth/logout", headers=CSRF)
        events = (await alice.get("/api/audit")).json()["data"]["events"]
    assert [e["action"] for e in events] == ["auth:login"]


async def test_a_bad_page_size_is_a_clear_400(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        for value in ("0", "201", "ten"):
            response = await browser.get("/api/audit", params={"limit": value})
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "INVALID_PARAMETER"
