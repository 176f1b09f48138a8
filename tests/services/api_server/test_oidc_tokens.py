"""ID and logout token validation, with tokens we sign ourselves: the dev provider serves
our key set (``JWKS_FILE``), so each token below is checked against the provider's real
discovery and JWKS endpoints, exactly as one it issued would be."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from joserfc import jwt
from joserfc.jwk import RSAKey
from support.oidcprovider import RunningProvider, new_signing_jwks, start_oidc_provider

from visiona_services.api_server.auth.oidc import (
    BACKCHANNEL_LOGOUT_EVENT,
    OidcClient,
    ProviderUnavailable,
    TokenRejected,
)

pytestmark = pytest.mark.usefixtures("devidp")

KID = "test-key"
CLIENT_ID = "visiona-web"
NONCE = "n-0123456789"


@pytest.fixture
def jwks() -> dict[str, Any]:
    return new_signing_jwks(KID)


@pytest.fixture
async def provider(nursery: trio.Nursery, jwks: dict[str, Any]) -> RunningProvider:
    return await start_oidc_provider(
        nursery, redirect_uris=["http://127.0.0.1:1/api/auth/callback"], jwks=jwks
    )


@pytest.fixture
async def client(provider: RunningProvider) -> AsyncIterator[OidcClient]:
    async with httpx.AsyncClient(timeout=5) as http:
        yield OidcClient(
            issuer=provider.issuer,
            client_id=CLIENT_ID,
            client_secret=None,
            scopes="openid",
            redirect_uri="http://127.0.0.1:1/api/auth/callback",
            http=http,
        )


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _sign(jwks: dict[str, Any], claims: dict[str, Any], **header: Any) -> str:
    key = RSAKey.import_key(jwks["keys"][0])
    return jwt.encode({"alg": "RS256", "kid": KID, **header}, claims, key)


def _id_claims(provider: RunningProvider, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": provider.issuer,
        "sub": "alice",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "nonce": NONCE,
        "sid": "provider-session-1",
        "email": "alice@example.test",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


async def _verify(client: OidcClient, token: str) -> Any:
    return await client.verify_id_token(token, nonce=NONCE, access_token=None)


async def test_a_good_id_token_gives_the_identity(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    identity = await _verify(client, _sign(jwks, _id_claims(provider)))
    assert (identity.subject, identity.email, identity.sid) == (
        "alice",
        "alice@example.test",
        "provider-session-1",
    )


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"aud": "someone-else"}, id="wrong-aud"),
        pytest.param({"aud": ["someone-else", CLIENT_ID]}, id="multi-aud-without-azp"),
        pytest.param({"azp": "someone-else"}, id="wrong-azp"),
        pytest.param({"iss": "http://evil.test"}, id="wrong-iss"),
        pytest.param({"exp": int(time.time()) - 3600}, id="expired"),
        pytest.param({"iat": int(time.time()) + 3600}, id="issued-in-the-future"),
        pytest.param({"nonce": "another"}, id="wrong-nonce"),
        pytest.param({"nonce": None}, id="no-nonce"),
        pytest.param({"sub": None}, id="no-sub"),
        pytest.param({"iat": None}, id="no-iat"),
    ],
)
async def test_a_bad_id_token_is_rejected(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any], changes: dict[str, Any]
) -> None:
    with pytest.raises(TokenRejected):
        await _verify(client, _sign(jwks, _id_claims(provider, **changes)))


async def test_display_claims_are_clipped_and_long_ids_refused(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    identity = await _verify(client, _sign(jwks, _id_claims(provider, name="n" * 1000)))
    assert identity.name == "n" * 255
    for changes in ({"sub": "s" * 256}, {"sid": "s" * 256}):
        with pytest.raises(TokenRejected):
            await _verify(client, _sign(jwks, _id_claims(provider, **changes)))


async def test_a_provider_announcing_only_algorithms_we_refuse_is_unusable(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    metadata = await client.metadata()
    client._metadata.value = {**metadata, "id_token_signing_alg_values_supported": ["HS256"]}
    with pytest.raises(ProviderUnavailable):
        await _verify(client, _sign(jwks, _id_claims(provider)))


async def test_a_token_signed_by_another_key_is_rejected(
    client: OidcClient, provider: RunningProvider
) -> None:
    with pytest.raises(TokenRejected):
        await _verify(client, _sign(new_signing_jwks(KID), _id_claims(provider)))


async def test_unsigned_and_symmetric_tokens_are_rejected(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    claims = _id_claims(provider)
    unsigned = f"{_b64({'alg': 'none'})}.{_b64(claims)}."
    # HS256 keyed with the provider's public key: the classic algorithm confusion
    # (joserfc refuses to make either, so they are made by hand)
    public = RSAKey.import_key(jwks["keys"][0]).as_pem(private=False)
    signing_input = f"{_b64({'alg': 'HS256', 'kid': KID})}.{_b64(claims)}"
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    for token in (unsigned, confused, "not.a.jwt", ""):
        with pytest.raises(TokenRejected):
            await _verify(client, token)


async def test_an_unknown_key_id_refetches_the_key_set_once(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    await _verify(client, _sign(jwks, _id_claims(provider)))  # caches the key set
    rotated = new_signing_jwks("rotated")
    await provider.restart(jwks={"keys": [*rotated["keys"], *jwks["keys"]]})
    key = RSAKey.import_key(rotated["keys"][0])
    token = jwt.encode({"alg": "RS256", "kid": "rotated"}, _id_claims(provider), key)
    assert (await _verify(client, token)).subject == "alice"
    # a second unknown key id soon after does not make another fetch: it fails
    other = new_signing_jwks("never-published")
    forged = jwt.encode(
        {"alg": "RS256", "kid": "never-published"},
        _id_claims(provider),
        RSAKey.import_key(other["keys"][0]),
    )
    with pytest.raises(TokenRejected):
        await _verify(client, forged)


def _logout_claims(provider: RunningProvider, **changes: Any) -> dict[str, Any]:
    claims = {
        "iss": provider.issuer,
        "aud": CLIENT_ID,
        "iat": int(time.time()),
        "exp": int(time.time()) + 120,
        "jti": f"logout-{time.monotonic_ns()}",
        "sub": "alice",
        "sid": "provider-session-1",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


async def test_a_good_logout_token_names_the_session(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    request = await client.verify_logout_token(_sign(jwks, _logout_claims(provider)))
    assert (request.subject, request.sid) == ("alice", "provider-session-1")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"events": None}, id="no-events"),
        pytest.param({"events": {"http://other/event": {}}}, id="other-event"),
        pytest.param({"nonce": "x"}, id="with-nonce"),
        pytest.param({"sub": None, "sid": None}, id="neither-sub-nor-sid"),
        pytest.param({"aud": "someone-else"}, id="wrong-aud"),
        pytest.param({"iss": "http://evil.test"}, id="wrong-iss"),
        pytest.param({"iat": None}, id="no-iat"),
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"jti": None}, id="no-jti"),
        pytest.param({"exp": int(time.time()) - 3600}, id="expired"),
        pytest.param({"iat": int(time.time()) - 3600}, id="issued-long-ago"),
    ],
)
async def test_a_bad_logout_token_is_rejected(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any], changes: dict[str, Any]
) -> None:
    with pytest.raises(TokenRejected):
        await client.verify_logout_token(_sign(jwks, _logout_claims(provider, **changes)))


async def test_a_replayed_logout_token_is_rejected(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    token = _sign(jwks, _logout_claims(provider))
    await client.verify_logout_token(token)
    with pytest.raises(TokenRejected):
        await client.verify_logout_token(token)


async def test_a_logout_token_of_another_type_is_rejected(
    client: OidcClient, provider: RunningProvider, jwks: dict[str, Any]
) -> None:
    with pytest.raises(TokenRejected):
        await client.verify_logout_token(_sign(jwks, _logout_claims(provider), typ="at+jwt"))
    typed = _sign(jwks, _logout_claims(provider), typ="logout+jwt")
    assert (await client.verify_logout_token(typed)).subject == "alice"


async def test_an_unreachable_provider_is_reported_as_such() -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        client = OidcClient(
            issuer="http://127.0.0.1:9",
            client_id=CLIENT_ID,
            client_secret=None,
            scopes="openid",
            redirect_uri="http://127.0.0.1:1/cb",
            http=http,
        )
        with pytest.raises(ProviderUnavailable):
            await client.metadata()
