"""The OpenID Connect relying party: discovery, the authorization request, the code
exchange, and ID and logout token validation.

authlib builds the requests (``prepare_grant_uri``, ``create_s256_code_challenge``,
``prepare_token_request``) and checks ID token claims (``CodeIDToken``: iss, aud, exp, iat,
nonce, azp, at_hash); joserfc verifies signatures against the provider's JWKS; httpx moves
the bytes. Nothing here writes JOSE by hand.

Discovery and the JWKS are cached; a token signed with a key id we do not know makes one
refetch of the JWKS (the provider rotated its keys), at most once per
:data:`JWKS_REFRESH_INTERVAL` so that forged key ids cannot make us hammer the provider.
Algorithms are pinned to asymmetric ones the provider announces (never ``none`` or HMAC).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import httpx
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

__all__ = [
    "ALLOWED_ALGORITHMS",
    "BACKCHANNEL_LOGOUT_EVENT",
    "Identity",
    "LogoutRequest",
    "OidcClient",
    "OidcError",
    "ProviderUnavailable",
    "TokenRejected",
]

logger = logging.getLogger("visiona_services.api_server.oidc")

#: Signature algorithms we accept, whatever a provider announces.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
#: ``typ`` values a logout token may have: the recommended one, and the plain JWT many
#: providers still send (an ID token still fails: it has no logout event).
LOGOUT_TOKEN_TYPES = ("logout+jwt", "application/logout+jwt", "jwt")
#: A logout token issued longer ago than this is refused (it also needs its exp).
MAX_LOGOUT_TOKEN_AGE = 600
#: Logout token ids remembered (until they expire) to refuse replays.
MAX_SEEN_LOGOUT_TOKENS = 10_000
#: Seconds discovery metadata and the JWKS are kept.
METADATA_TTL = 3600.0
#: At most one forced JWKS refetch per this many seconds.
JWKS_REFRESH_INTERVAL = 10.0
#: Clock skew allowed on exp, iat and nbf.
LEEWAY = 60
#: Identifiers longer than the database keeps are refused; display values are clipped.
MAX_ID_LENGTH = 255
MAX_EMAIL_LENGTH = 320
MAX_NAME_LENGTH = 255
#: Provider answers larger than this are refused.
MAX_RESPONSE_BYTES = 1 << 20


class OidcError(Exception):
    """A login or logout step failed. ``code``, ``status`` and ``public_message`` are for
    the API answer; the exception's own text (which may name hosts or say which check
    failed) is for the log only."""

    status = 401
    code = "LOGIN_FAILED"
    public_message = "the login failed"


class ProviderUnavailable(OidcError):
    """The provider could not be reached or answered nonsense."""

    status = 502
    code = "OIDC_PROVIDER_UNAVAILABLE"
    public_message = "the identity provider is unavailable; try again later"


class TokenRejected(OidcError):
    """A token (or the code exchange) did not pass validation."""

    status = 401
    code = "ID_TOKEN_INVALID"
    public_message = "the identity provider's answer did not validate"


@attrs.frozen
class Identity:
    """Who logged in, from a validated ID token."""

    issuer: str
    subject: str
    email: str | None
    name: str | None
    #: The provider's session id (``sid``), if it sent one.
    sid: str | None


@attrs.frozen
class LogoutRequest:
    """A validated back-channel logout token: end the sessions of ``sid``, or of ``sub``."""

    subject: str | None
    sid: str | None


def _clipped(value: str | None, length: int) -> str | None:
    return None if value is None else value[:length]


def _string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


@attrs.define
class _SeenIds:
    """Token ids seen, each until its expiry: a second use is a replay. Bounded: when
    full, the ids closest to their expiry are forgotten first."""

    _expiries: dict[str, float] = attrs.field(factory=dict)

    def take(self, token_id: str, expires: float, now: float) -> None:
        """Raises TokenRejected: ``token_id`` was seen before and has not expired."""
        if self._expiries.get(token_id, -1.0) >= now:
            raise TokenRejected("the logout token was used before")
        if len(self._expiries) >= MAX_SEEN_LOGOUT_TOKENS:
            self._expiries = {i: e for i, e in self._expiries.items() if e >= now}
            for stale in sorted(self._expiries, key=self._expiries.__getitem__)[
                : max(0, len(self._expiries) - MAX_SEEN_LOGOUT_TOKENS + 1)
            ]:
                del self._expiries[stale]
        self._expiries[token_id] = expires


@attrs.define
class _Cached:
    value: Any = None
    fetched_at: float = -float("inf")


class OidcClient:
    """One provider, one client registration."""

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        scopes: str,
        redirect_uri: str,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        #: Compared exactly, as written (some providers' issuers end in "/").
        self.issuer = issuer
        self.client_id = client_id
        self._client_secret = client_secret or None
        self.scopes = scopes
        self.redirect_uri = redirect_uri
        self._http = http
        self._clock = clock
        self._metadata = _Cached()
        self._jwks = _Cached()
        self._last_forced_jwks = -float("inf")
        self._seen_logout_tokens = _SeenIds()

    # -- provider documents -----------------------------------------------------------------

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"the identity provider is unreachable ({exc})") from exc
        return _json_object(response, url)

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (cached), checked against our issuer."""
        now = self._clock()
        if now - self._metadata.fetched_at < METADATA_TTL:
            return dict(self._metadata.value)
        document = await self._get_json(
            f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        )
        if document.get("issuer") != self.issuer:
            raise ProviderUnavailable("the provider's discovery names another issuer")
        for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(endpoint), str):
                raise ProviderUnavailable(f"the provider's discovery has no {endpoint}")
        self._metadata = _Cached(document, now)
        return dict(document)

    async def _key_set(self, *, force: bool = False) -> KeySet:
        now = self._clock()
        if force:
            if now - self._last_forced_jwks < JWKS_REFRESH_INTERVAL:
                return self._jwks.value  # type: ignore[no-any-return]
            self._last_forced_jwks = now
        elif now - self._jwks.fetched_at < METADATA_TTL:
            return self._jwks.value  # type: ignore[no-any-return]
        metadata = await self.metadata()
        document = await self._get_json(metadata["jwks_uri"])
        try:
            key_set = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise ProviderUnavailable("the provider's JWKS is not a key set") from exc
        self._jwks = _Cached(key_set, now)
        return key_set

    async def _algorithms(self) -> list[str]:
        announced = (await self.metadata()).get("id_token_signing_alg_values_supported")
        if not isinstance(announced, list):
            announced = ["RS256"]
        algorithms = [alg for alg in ALLOWED_ALGORITHMS if alg in announced]
        if not algorithms:  # joserfc would fall back to its defaults, HS256 among them
            raise ProviderUnavailable(f"the provider announces no algorithm we accept: {announced}")
        return algorithms

    async def _decode(self, token: str) -> jwt.Token:
        """Verify ``token``'s signature (refetching the JWKS once for a new key id)."""
        algorithms = await self._algorithms()
        try:
            try:
                return jwt.decode(token, await self._key_set(), algorithms=algorithms)
            except InvalidKeyIdError:
                logger.info("unknown key id: refetching the provider's JWKS")
                return jwt.decode(token, await self._key_set(force=True), algorithms=algorithms)
        except (JoseError, ValueError) as exc:
            raise TokenRejected(f"the token's signature does not verify ({exc})") from exc

    # -- login ------------------------------------------------------------------------------

    async def authorization_url(self, *, state: str, nonce: str, code_verifier: str) -> str:
        """Where to send the browser: code flow, PKCE S256, state and nonce."""
        endpoint = (await self.metadata())["authorization_endpoint"]
        url: str = prepare_grant_uri(
            endpoint,
            client_id=self.client_id,
            response_type="code",
            redirect_uri=self.redirect_uri,
            scope=self.scopes,
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(code_verifier),
            code_challenge_method="S256",
        )
        return url

    async def exchange_code(self, code: str, code_verifier: str) -> dict[str, Any]:
        """The token response for ``code`` (``id_token`` and ``access_token`` at least)."""
        endpoint = (await self.metadata())["token_endpoint"]
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=self.redirect_uri,
            code_verifier=code_verifier,
            **({} if self._client_secret else {"client_id": self.client_id}),
        )
        auth = httpx.BasicAuth(self.client_id, self._client_secret) if self._client_secret else None
        try:
            response = await self._http.post(
                endpoint,
                content=body,
                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
                headers={
                    "content-type": "application/x-www-form-urlencoded",
                    "accept": "application/json",
                },
            )
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"the identity provider is unreachable ({exc})") from exc
        if response.status_code in (400, 401):  # invalid_grant, a replayed code ...
            error = _json_or_empty(response).get("error", "invalid_grant")
            raise TokenRejected(f"the provider refused the code ({error})")
        tokens = _json_object(response, endpoint)
        if not isinstance(tokens.get("id_token"), str):
            raise TokenRejected("the provider sent no ID token")
        return tokens

    async def verify_id_token(
        self, id_token: str, *, nonce: str, access_token: str | None
    ) -> Identity:
        """Signature (JWKS), iss, aud, exp, iat, nonce, azp and at_hash.

        Raises:
            TokenRejected: any check failed.
        """
        token = await self._decode(id_token)
        claims = CodeIDToken(
            token.claims,
            token.header,
            {
                "iss": {"essential": True, "value": self.issuer},
                "aud": {"essential": True, "value": self.client_id},
                "sub": {"essential": True},
                "nonce": {"essential": True},
            },
            {"nonce": nonce, "client_id": self.client_id, "access_token": access_token},
        )
        try:
            claims.validate(now=int(self._clock()), leeway=LEEWAY)
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenRejected(f"the ID token is not valid ({exc})") from exc
        subject, sid = str(claims["sub"]), _string(claims, "sid")
        if len(subject) > MAX_ID_LENGTH or (sid is not None and len(sid) > MAX_ID_LENGTH):
            raise TokenRejected("sub or sid is longer than we keep")
        return Identity(
            issuer=self.issuer,
            subject=subject,
            email=_clipped(_string(claims, "email"), MAX_EMAIL_LENGTH),
            name=_clipped(_string(claims, "name"), MAX_NAME_LENGTH),
            sid=sid,
        )

    # -- logout -----------------------------------------------------------------------------

    async def verify_logout_token(self, logout_token: str) -> LogoutRequest:
        """OIDC Back-Channel Logout 1.0, section 2.6.

        Raises:
            TokenRejected: any check failed.
        """
        token = await self._decode(logout_token)
        if str(token.header.get("typ", "JWT")).lower() not in LOGOUT_TOKEN_TYPES:
            raise TokenRejected("a logout token's typ is logout+jwt (or JWT)")
        now = int(self._clock())
        registry = JWTClaimsRegistry(
            now=now,
            leeway=LEEWAY,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.client_id},
            iat={"essential": True},
            exp={"essential": True},
            jti={"essential": True},
            events={"essential": True},
        )
        try:
            registry.validate(token.claims)
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenRejected(f"the logout token is not valid ({exc})") from exc
        claims = token.claims
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(
            events.get(BACKCHANNEL_LOGOUT_EVENT), dict
        ):
            raise TokenRejected("the logout token has no back-channel logout event")
        if "nonce" in claims:
            raise TokenRejected("a logout token must not carry a nonce")
        if not isinstance(claims["iat"], int | float) or claims["iat"] < now - MAX_LOGOUT_TOKEN_AGE:
            raise TokenRejected("the logout token is too old")
        request = LogoutRequest(subject=_string(claims, "sub"), sid=_string(claims, "sid"))
        if request.subject is None and request.sid is None:
            raise TokenRejected("the logout token names neither sub nor sid")
        self._seen_logout_tokens.take(str(claims["jti"]), float(claims["exp"]) + LEEWAY, now)
        return request

    async def end_session_url(self, post_logout_redirect_uri: str) -> str | None:
        """The provider's RP-initiated logout URL, if it has one."""
        try:
            endpoint = (await self.metadata()).get("end_session_endpoint")
        except ProviderUnavailable:
            return None
        if not isinstance(endpoint, str):
            return None
        params = [
            ("client_id", self.client_id),
            ("post_logout_redirect_uri", post_logout_redirect_uri),
        ]
        url: str = add_params_to_uri(endpoint, params)
        return url


def _json_or_empty(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_object(response: httpx.Response, url: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise ProviderUnavailable(f"the identity provider answered {response.status_code}")
    if len(response.content) > MAX_RESPONSE_BYTES:
        raise ProviderUnavailable("the identity provider's answer is too large")
    try:
        value = response.json()
    except ValueError as exc:
        raise ProviderUnavailable("the identity provider's answer is not JSON") from exc
    if not isinstance(value, dict):
        raise ProviderUnavailable("the identity provider's answer is not a JSON object")
    return value
