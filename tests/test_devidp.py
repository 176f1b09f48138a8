"""The dev identity provider (``devidp/``) and its test driver (``support.oidcprovider``):
discovery, a headless login with PKCE and the code exchange, key rotation by restart, and
back-channel logout to a receiver of ours."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import httpx
import pytest
import trio
from joserfc import jwt
from joserfc.jwk import KeySet
from support.oidcprovider import (
    RunningProvider,
    login_at_provider,
    logout_at_provider,
    new_signing_jwks,
    start_oidc_provider,
)
from support.tunnelhttp import (
    Message,
    Receive,
    Send,
    read_body,
    respond,
    run_lifespan,
    serve_on_loopback,
)

#: The relying party's callback: never requested, the provider only redirects to it.
REDIRECT_URI = "http://127.0.0.1:8000/api/auth/callback"
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
#: Upper bound for one test's exchanges with the provider.
TIMEOUT = 20.0

pytestmark = pytest.mark.usefixtures("devidp")


@pytest.fixture
async def browser() -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client that does not follow redirects, like a scripted browser."""
    async with httpx.AsyncClient(follow_redirects=False, timeout=TIMEOUT) as client:
        yield client


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _RelyingParty:
    """Just enough of a relying party: authorization URLs with PKCE, the code exchange."""

    def __init__(self, provider: RunningProvider, metadata: dict[str, Any]) -> None:
        self.provider = provider
        self.metadata = metadata
        self.verifiers: dict[str, str] = {}  # by state

    def authorize_url(self) -> str:
        verifier, challenge = _pkce()
        state = secrets.token_urlsafe(16)
        self.verifiers[state] = verifier
        query = {
            "response_type": "code",
            "client_id": self.provider.client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": "openid email profile",
            "state": state,
            "nonce": "nonce-" + state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return f"{self.metadata['authorization_endpoint']}?{urlencode(query)}"

    async def callback(self, client: httpx.AsyncClient, redirect: str) -> dict[str, Any]:
        """The token response for the authorization response ``redirect``, after checking
        that it is a success for a state of ours, from our issuer."""
        assert redirect.startswith(REDIRECT_URI + "?")
        params = {name: values[0] for name, values in parse_qs(urlsplit(redirect).query).items()}
        assert params["iss"] == self.provider.issuer
        verifier = self.verifiers.pop(params["state"])
        form = {
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }
        secret = self.provider.client_secret
        if secret is None:
            form["client_id"] = self.provider.client_id
            response = await client.post(self.metadata["token_endpoint"], data=form)
        else:
            auth = httpx.BasicAuth(self.provider.client_id, secret)
            response = await client.post(self.metadata["token_endpoint"], data=form, auth=auth)
        assert response.status_code == 200, response.text
        tokens: dict[str, Any] = response.json()
        return tokens

    async def verify(self, client: httpx.AsyncClient, token: str) -> jwt.Token:
        """``token`` decoded after checking its signature against the provider's JWKS, and
        its issuer and audience."""
        jwks = (await client.get(self.metadata["jwks_uri"])).raise_for_status().json()
        decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"])
        claims_registry = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": self.provider.issuer},
            aud={"essential": True, "value": self.provider.client_id},
        )
        claims_registry.validate(decoded.claims)
        return decoded


async def _relying_party(client: httpx.AsyncClient, provider: RunningProvider) -> _RelyingParty:
    metadata = (await client.get(provider.discovery_url)).raise_for_status().json()
    return _RelyingParty(provider, metadata)


async def test_discovery(nursery: trio.Nursery, browser: httpx.AsyncClient) -> None:
    provider = await start_oidc_provider(nursery, redirect_uris=[REDIRECT_URI])
    assert provider.issuer == f"http://127.0.0.1:{provider.port}"
    with trio.fail_after(TIMEOUT):
        metadata = (await browser.get(provider.discovery_url)).raise_for_status().json()
    assert metadata["issuer"] == provider.issuer
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["end_session_endpoint"] == f"{provider.issuer}/session/end"
    assert "backchannel_logout_supported" not in metadata  # only with BACKCHANNEL_LOGOUT_URI
    assert {"openid", "email", "profile"} <= set(metadata["scopes_supported"])


@pytest.mark.parametrize("client_secret", [None, "s3cret"], ids=["public", "confidential"])
async def test_login_and_code_exchange(
    nursery: trio.Nursery, browser: httpx.AsyncClient, client_secret: str | None
) -> None:
    provider = await start_oidc_provider(
        nursery, redirect_uris=[REDIRECT_URI], client_secret=client_secret, id_token_ttl=120
    )
    with trio.fail_after(TIMEOUT):
        rp = await _relying_party(browser, provider)
        redirect = await login_at_provider(browser, rp.authorize_url(), "alice")
        query = parse_qs(urlsplit(redirect).query)
        assert {"code", "state", "iss"} <= set(query)
        tokens = await rp.callback(browser, redirect)
        id_token = await rp.verify(browser, tokens["id_token"])
        claims = id_token.claims
        assert claims["sub"] == "alice"
        assert claims["email"] == "alice@example.test"
        assert claims["email_verified"] is True
        assert claims["name"] == "alice"
        assert claims["sid"]
        assert claims["nonce"].startswith("nonce-")
        assert claims["exp"] - claims["iat"] == 120

        # The provider session lets the same browser in again without the login form (the
        # name given is then not asked for), and consent was already given.
        again = await rp.callback(
            browser, await login_at_provider(browser, rp.authorize_url(), "bob")
        )
        second = (await rp.verify(browser, again["id_token"])).claims
        assert (second["sub"], second["sid"]) == ("alice", claims["sid"])

        # A client that needs PKCE: no code_challenge, no login.
        no_pkce = rp.authorize_url().replace("code_challenge=", "x=")
        response = await browser.get(no_pkce)
        assert response.is_redirect
        assert "error=invalid_request" in response.headers["location"]


async def test_consent_refused(nursery: trio.Nursery, browser: httpx.AsyncClient) -> None:
    provider = await start_oidc_provider(nursery, redirect_uris=[REDIRECT_URI])
    with trio.fail_after(TIMEOUT):
        rp = await _relying_party(browser, provider)
        redirect = await login_at_provider(browser, rp.authorize_url(), "carol", consent=False)
    query = parse_qs(urlsplit(redirect).query)
    assert query["error"] == ["access_denied"]
    assert query["iss"] == [provider.issuer]
    assert "code" not in query


async def test_key_rotation_by_restart(nursery: trio.Nursery, browser: httpx.AsyncClient) -> None:
    provider = await start_oidc_provider(
        nursery, redirect_uris=[REDIRECT_URI], jwks=new_signing_jwks("key-1")
    )
    issuer = provider.issuer
    with trio.fail_after(TIMEOUT):
        rp = await _relying_party(browser, provider)
        jwks = (await browser.get(rp.metadata["jwks_uri"])).json()
        assert [key["kid"] for key in jwks["keys"]] == ["key-1"]
        assert "d" not in jwks["keys"][0]  # the public half only

        await provider.restart(jwks=new_signing_jwks("key-2"))
        assert provider.issuer == issuer
        rp = await _relying_party(browser, provider)
        jwks = (await browser.get(rp.metadata["jwks_uri"])).json()
        assert [key["kid"] for key in jwks["keys"]] == ["key-2"]

        # Sessions did not survive the restart: the login form again, then a key-2 token.
        browser.cookies.clear()
        tokens = await rp.callback(
            browser, await login_at_provider(browser, rp.authorize_url(), "dave")
        )
        assert (await rp.verify(browser, tokens["id_token"])).header["kid"] == "key-2"

    await provider.stop()
    with pytest.raises(httpx.ConnectError):
        await browser.get(provider.discovery_url)


class _BackchannelReceiver:
    """An ASGI app that answers every POST with 200 and hands its path and form on."""

    def __init__(self) -> None:
        self.send_channel, self.received = trio.open_memory_channel[tuple[str, dict[str, str]]](10)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
            return
        form = dict(parse_qsl((await read_body(receive)).decode()))
        self.send_channel.send_nowait((scope["path"], form))
        await respond(send, 200, b"")


async def test_backchannel_logout(nursery: trio.Nursery, browser: httpx.AsyncClient) -> None:
    receiver = _BackchannelReceiver()
    port = await serve_on_loopback(nursery, receiver)
    provider = await start_oidc_provider(
        nursery,
        redirect_uris=[REDIRECT_URI],
        backchannel_logout_uri=f"http://127.0.0.1:{port}/api/auth/backchannel-logout",
        post_logout_redirect_uris=["http://127.0.0.1:8000/"],
    )
    with trio.fail_after(TIMEOUT):
        rp = await _relying_party(browser, provider)
        assert rp.metadata["backchannel_logout_supported"] is True
        assert rp.metadata["backchannel_logout_session_supported"] is True
        tokens = await rp.callback(
            browser, await login_at_provider(browser, rp.authorize_url(), "erin")
        )
        sid = (await rp.verify(browser, tokens["id_token"])).claims["sid"]

        after = await logout_at_provider(
            browser,
            provider,
            id_token_hint=tokens["id_token"],
            post_logout_redirect_uri="http://127.0.0.1:8000/",
        )
        assert after == "http://127.0.0.1:8000/"
        path, form = await receiver.received.receive()

        assert path == "/api/auth/backchannel-logout"
        logout = await rp.verify(browser, form["logout_token"])
        assert logout.header["typ"] == "logout+jwt"
        assert logout.claims["events"] == {BACKCHANNEL_EVENT: {}}
        assert (logout.claims["sub"], logout.claims["sid"]) == ("erin", sid)
        assert "nonce" not in logout.claims

        # The provider session is gone: the next authorization shows the login form again.
        response = await browser.get(rp.authorize_url())
        interaction = await browser.get(str(response.url.join(response.headers["location"])))
        assert 'name="prompt" value="login"' in interaction.text
