"""Device-token verification for the tunnel listener: token in, device id (or None) out.

A :class:`TokenVerifier` answers ``None`` only when the token is definitely not valid
(the agent then gets 401 and backs off); when it cannot tell -- the api-server is down,
slow or answers something unexpected -- it raises :class:`VerifierUnavailable` and the
agent gets 503 (it retries, and its token is not treated as refused).

Tokens are secrets: nothing here logs them, and they are not part of any ``repr``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Self

import httpx
import trio

from visiona_tunnel.admission import UNAUTHORIZED, VERIFIER_UNAVAILABLE, Refusal
from visiona_tunnel.relay import TokenVerifier, VerifierUnavailable

from ..common.internal_url import InternalUrl
from .config import ProxyConfig

if TYPE_CHECKING:
    from .state import ProxyState

logger = logging.getLogger("visiona_services.remote_proxy.verify")

#: The api-server endpoint :class:`ApiServerVerifier` calls (docs/remote-proxy.md).
VERIFY_PATH = "/internal/devices/verify"
#: Statuses of the verify endpoint that mean "this token is not valid".
REFUSED_STATUSES = frozenset({401, 403, 404})
#: The largest verify response read; a larger one is an error.
MAX_RESPONSE_SIZE = 64 * 1024
#: Connections to the api-server at most, kept alive between checks.
MAX_CONNECTIONS = 16


class StaticTokenVerifier:
    """A fixed ``token -> device id`` table (``VISIONA_PROXY_STATIC_TOKENS``)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = dict(tokens)

    def __repr__(self) -> str:
        return f"StaticTokenVerifier(<{len(self._tokens)} tokens>)"

    async def __call__(self, token: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return self._tokens.get(token)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Nothing to close (the same shape as :class:`ApiServerVerifier`)."""


class ApiServerVerifier:
    """Asks the api-server: ``POST {base_url}/internal/devices/verify`` with
    ``Authorization: Bearer <internal_secret>`` and ``{"token": "..."}``.

    * 200 ``{"success": true, "data": {"device_id": "..."}}`` -> the device id;
    * 401, 403, 404 -> None;
    * anything else, a malformed 200, a connection failure or no answer within
      ``timeout`` seconds (waiting for a connection included) -> :class:`VerifierUnavailable`.

    Connections are kept alive and reused (httpx's pool), at most ``max_connections`` at
    once: a restart storm asks thousands of times within seconds, and a fresh connection
    per check doubled the remote-proxy's CPU per connect; more checks at once wait for a
    connection, so the api-server sees a bounded number. Nothing is cached: a revoked or
    unpaired device's token fails at its next connect. Only ``http://`` base URLs: the
    internal API is meant for a private network. An async context manager; leaving it
    (or :meth:`aclose`) closes the connections.
    """

    def __init__(
        self,
        base_url: str,
        internal_secret: str,
        *,
        timeout: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        url = InternalUrl.parse(base_url)  # ValueError: see ProxyConfig's check
        self.host, self.port, self.netloc = url.host, url.port, url.netloc
        self.target = url.prefix + VERIFY_PATH
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            headers={
                "Authorization": f"Bearer {internal_secret}",
                "Accept": "application/json",
            },
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=timeout,
            trust_env=False,  # no proxy or netrc from the environment for an internal call
        )

    def __repr__(self) -> str:
        return f"ApiServerVerifier('http://{self.netloc}{self.target}')"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, token: str) -> str | None:
        with trio.move_on_after(self.timeout) as scope:
            status, body = await self._post(token)
        if scope.cancelled_caught:
            raise VerifierUnavailable(f"no answer from the api-server within {self.timeout} s")
        if status in REFUSED_STATUSES:
            return None
        if status != 200:
            raise VerifierUnavailable(f"the api-server answered HTTP {status}")
        return _device_id(body)

    async def _post(self, token: str) -> tuple[int, bytes]:
        url = f"http://{self.netloc}{self.target}"
        try:
            async with self._client.stream("POST", url, json={"token": token}) as response:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > MAX_RESPONSE_SIZE:
                        raise VerifierUnavailable("the api-server's answer is too large")
                return response.status_code, bytes(body)
        except httpx.HTTPError as exc:
            # Its message names the URL, never the token (that is in the body).
            raise VerifierUnavailable(f"the api-server request failed: {exc!r}") from exc


def _device_id(body: bytes) -> str:
    """The device id of a 200 answer; :class:`VerifierUnavailable` if it has none."""
    try:
        document = json.loads(body)
        device_id = document["data"]["device_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifierUnavailable("malformed answer from the api-server") from exc
    if document.get("success") is not True or not isinstance(device_id, str) or not device_id:
        raise VerifierUnavailable("malformed answer from the api-server")
    return device_id


def verifier_from_config(config: ProxyConfig) -> ApiServerVerifier | StaticTokenVerifier:
    """``VISIONA_API_INTERNAL_URL`` set: ask the api-server; otherwise the static tokens.
    Use it as an async context manager (the api-server's connections are closed on exit)."""
    if config.api_internal_url:
        return ApiServerVerifier(config.api_internal_url, config.internal_secret)
    tokens = config.static_token_table()
    if not tokens:
        logger.warning("no VISIONA_API_INTERNAL_URL and no static tokens: every agent is refused")
    return StaticTokenVerifier(tokens)


__all__ = [
    "MAX_CONNECTIONS",
    "MAX_RESPONSE_SIZE",
    "VERIFY_PATH",
    "ApiServerVerifier",
    "StaticTokenVerifier",
    "TokenVerifier",
    "VerifierUnavailable",
    "verifier_from_config",
]


DRAINING = Refusal(503, "DRAINING", "the proxy is shutting down; retry later")


async def admit(
    state: ProxyState,
    verifier: TokenVerifier,
    token: str | None,
    *,
    timeout: float,
    remote: str | None,
) -> str | Refusal:
    """The device id a tunnel with ``token`` is served as, or why it is refused.

    A missing and an unknown token are refused alike (and counted); a
    verifier that fails or takes longer than ``timeout`` is a 503, not a 401.
    """
    if state.draining.is_set():
        return DRAINING
    device: str | None = None
    if token:
        try:
            with trio.fail_after(timeout):
                device = await verifier(token)
        except (VerifierUnavailable, trio.TooSlowError) as exc:
            if count := state.verifier_failures_log.due(trio.current_time()):
                logger.warning(
                    "token checks unavailable",
                    extra={"remote": remote, "error": str(exc) or "timed out", "count": count},
                )
            return VERIFIER_UNAVAILABLE
    if device is None:
        state.metrics.auth_failures.inc()  # logged with the other refusals, at a rate
        return UNAUTHORIZED
    if state.draining.is_set():  # it may have begun while we verified
        return DRAINING
    return device
