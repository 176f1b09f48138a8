"""Pairing: trade a one-time pairing token for a device token at the api-server.

``POST {api_url}/api/pairing/exchange`` with ``{"token": "vAc_..."}`` answers
``{"success": true, "data": {"device_id", "device_token", "relay_url"}}``; the agent then
dials ``relay_url`` with the device token (see ``docs/agent.md``).

Two layers, as elsewhere in the package:

- sans-IO: :func:`parse_api_url`, :class:`PairingExchange` (the request's bytes, made by h11;
  the response read from whatever bytes arrive, at most :data:`MAX_RESPONSE_SIZE`),
  :func:`interpret_exchange_response` (status and body -> a result or a typed error) and
  :func:`parse_exchange_response` (all of that on one buffer);
- trio: :func:`exchange_pairing_token` (one attempt over TCP or TLS, bounded in time) and
  :func:`pair_device` (attempts until one succeeds or fails for good, with the tunnel's
  backoff and the server's ``Retry-After``).

What fails how:

=============================================  ===================================================
answer                                         error
=============================================  ===================================================
401 (token used, expired, revoked, unknown),   :class:`PairingRefused`: give up, the token will
400 (body refused)                             not work
429, 408, 5xx, no connection, no answer        :class:`PairingUnavailable`: try again later
within the timeout, not HTTP, too large        (``retry_after`` from the server, if it said)
any other status, a 200 whose body is not      :class:`PairingFailed`: give up; the api-server
the contract's, a ``relay_url`` not ws(s)://   (or ``--api-url``) is not what we expect
=============================================  ===================================================

Nothing here logs or formats the pairing token or the device token.
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import attrs
import h11
import trio

from .backoff import backoff
from .client import check_relay_url
from .retry_after import MAX_RETRY_AFTER, parse_retry_after

__all__ = [
    "EXCHANGE_PATH",
    "EXCHANGE_TIMEOUT",
    "MAX_RESPONSE_SIZE",
    "MAX_RETRY_AFTER",
    "PAIRING_TOKEN_PATTERN",
    "ApiEndpoint",
    "ExchangeResponse",
    "PairingError",
    "PairingExchange",
    "PairingFailed",
    "PairingRefused",
    "PairingResult",
    "PairingUnavailable",
    "exchange_pairing_token",
    "interpret_exchange_response",
    "is_pairing_token",
    "pair_device",
    "parse_api_url",
    "parse_exchange_response",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

#: The exchange route, below the api-server's URL (and its path prefix, if any).
EXCHANGE_PATH = "/api/pairing/exchange"
#: What a pairing token looks like: ``vAc_`` and 32 lower-case hex digits.
PAIRING_TOKEN_PATTERN = re.compile(r"vAc_[0-9a-f]{32}")
#: The most of an answer (head and body) read; more is :class:`PairingUnavailable`.
MAX_RESPONSE_SIZE = 64 * 1024
#: One attempt (connect, TLS, request, whole answer) must finish within this many seconds.
EXCHANGE_TIMEOUT = 15.0
#: The longest server message kept in an error (they are logged).
_MAX_MESSAGE = 200
_USER_AGENT = "visiona-agent (visiona_tunnel.pairing)"
_PATH_CHARS = re.compile(r"[!-~]*")  # printable ASCII, no space


def is_pairing_token(value: str) -> bool:
    """Whether ``value`` has the form of a pairing token (not whether it is valid)."""
    return PAIRING_TOKEN_PATTERN.fullmatch(value) is not None


# -- results and errors -----------------------------------------------------------------------


@attrs.frozen
class PairingResult:
    """What the exchange hands out. ``device_token`` is left out of ``repr``."""

    device_id: str
    device_token: str = attrs.field(repr=False)
    relay_url: str


class PairingError(Exception):
    """The exchange did not give a device token. ``status`` is the HTTP status, if any;
    ``code`` and ``request_id`` come from the api-server's error body, if it had one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.request_id = request_id


class PairingRefused(PairingError):
    """The api-server refused the pairing token (401) or the request (400): give up."""


class PairingFailed(PairingError):
    """An answer outside the contract (another status, a body not understood): give up."""


class PairingUnavailable(PairingError):
    """Try again later: no connection, no (complete, readable) answer, 408, 429 or 5xx.
    ``retry_after``: the seconds the server asked for (``Retry-After``), if it did."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, request_id=request_id)
        self.retry_after = retry_after


# -- sans-IO ----------------------------------------------------------------------------------


@attrs.frozen
class ApiEndpoint:
    """Where the api-server is: from ``http(s)://host[:port][/prefix]``."""

    secure: bool
    host: str
    port: int
    #: The ``Host`` header: the URL's ``host[:port]`` as written.
    authority: str
    #: The path prefix without a trailing slash (``""`` for none).
    prefix: str

    @property
    def exchange_target(self) -> str:
        return self.prefix + EXCHANGE_PATH


def parse_api_url(api_url: str) -> ApiEndpoint:
    """``http(s)://host[:port][/prefix]`` -> :class:`ApiEndpoint`.

    Raises:
        ValueError: not such a URL (the message does not repeat the URL).
    """
    try:
        parts = urlsplit(api_url)
        port = parts.port
    except ValueError:
        raise ValueError("the api URL is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("the api URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("the api URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the api URL must not hold a user name or password")
    if parts.query or parts.fragment or "?" in api_url or "#" in api_url:
        raise ValueError("the api URL must not have a query or a fragment")
    if not _PATH_CHARS.fullmatch(parts.path) or not _PATH_CHARS.fullmatch(parts.netloc):
        raise ValueError("the api URL holds spaces or characters that are not ASCII")
    secure = parts.scheme == "https"
    return ApiEndpoint(
        secure=secure,
        host=parts.hostname,
        port=port or (443 if secure else 80),
        authority=parts.netloc,
        prefix=parts.path.rstrip("/"),
    )


@attrs.frozen
class ExchangeResponse:
    """An answer read whole: status, headers (names lower-case) and body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower-case), or None."""
        values = [value for key, value in self.headers if key == name]
        return values[-1] if values else None


class PairingExchange:
    """One ``POST .../api/pairing/exchange`` on one connection, without I/O.

    Send :attr:`request` (the whole request, ``Connection: close``), then feed what arrives to
    :meth:`receive_data` (``b""`` for the end of the connection) until it returns the
    :class:`ExchangeResponse`. A response that is not HTTP, ends early or passes
    ``max_response_size`` bytes raises :class:`PairingUnavailable`.
    """

    def __init__(
        self,
        endpoint: ApiEndpoint,
        pairing_token: str,
        *,
        max_response_size: int = MAX_RESPONSE_SIZE,
    ) -> None:
        if not is_pairing_token(pairing_token):
            raise ValueError("not a pairing token (vAc_ and 32 lower-case hex digits)")
        self.max_response_size = max_response_size
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_response_size)
        body = json.dumps({"token": pairing_token}, separators=(",", ":")).encode()
        headers = [
            ("Host", endpoint.authority),
            ("User-Agent", _USER_AGENT),
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        request = h11.Request(method="POST", target=endpoint.exchange_target, headers=headers)
        self.request: bytes = b"".join(
            self._conn.send(event) or b""
            for event in (request, h11.Data(data=body), h11.EndOfMessage())
        )
        self._received = 0
        self._status: int | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._done: ExchangeResponse | None = None

    def __repr__(self) -> str:  # the request holds the token
        return f"<PairingExchange received={self._received}>"

    def receive_data(self, data: bytes) -> ExchangeResponse | None:
        """Take bytes from the server (``b""``: it closed); the response once it is whole."""
        if self._done is not None:
            return self._done
        self._received += len(data)
        if self._received > self.max_response_size:
            raise PairingUnavailable(
                f"the api-server's answer is larger than {self.max_response_size} bytes",
                status=self._status,
            )
        try:
            self._conn.receive_data(data)
            return self._next_events()
        except h11.ProtocolError as exc:
            raise PairingUnavailable(
                f"the api-server's answer is not HTTP/1.1: {exc}", status=self._status
            ) from None

    def _next_events(self) -> ExchangeResponse | None:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self._status = event.status_code
                self._headers = list(event.headers)
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self._status is not None
                self._done = ExchangeResponse(self._status, self._headers, bytes(self._body))
                return self._done
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise PairingUnavailable(
                    "the api-server closed the connection before its answer was complete",
                    status=self._status,
                )
            # InformationalResponse (100 Continue ...): wait for the real one.


def interpret_exchange_response(
    response: ExchangeResponse, *, now: float | None = None
) -> PairingResult:
    """The exchange's answer -> the device's credentials, or the typed error it means.

    Raises:
        PairingRefused: 400 or 401. PairingUnavailable: 408, 429, 5xx.
        PairingFailed: any other status, or a 200 whose body is not the contract's.
    """
    status = response.status
    if status == 200:
        return _result_from(response.body)
    code, message, request_id = _error_from(response.body)
    said = ""
    if code:
        said = f"; the api-server said {code}" + (f": {message}" if message else "")
    if status == 401:
        raise PairingRefused(
            f"the pairing token was refused (used, expired, revoked or unknown){said}",
            status=status,
            code=code,
            request_id=request_id,
        )
    if status == 400:
        raise PairingRefused(
            f"the api-server refused the pairing request (HTTP 400){said}",
            status=status,
            code=code,
            request_id=request_id,
        )
    if status in (408, 429) or 500 <= status <= 599:
        raise PairingUnavailable(
            f"the api-server answered HTTP {status}{said}",
            status=status,
            code=code,
            request_id=request_id,
            retry_after=parse_retry_after(response.header(b"retry-after"), now=now),
        )
    raise PairingFailed(
        f"the api-server answered HTTP {status} to the pairing exchange "
        f"(is the api URL right?){said}",
        status=status,
        code=code,
        request_id=request_id,
    )


def parse_exchange_response(raw: bytes, *, now: float | None = None) -> PairingResult:
    """A whole answer as received (up to the end of the connection) -> the result.

    Raises only :class:`PairingError` subclasses, whatever ``raw`` holds.
    """
    exchange = PairingExchange(_PLACEHOLDER_ENDPOINT, _PLACEHOLDER_TOKEN)
    response = exchange.receive_data(raw) or exchange.receive_data(b"")
    assert response is not None  # receive_data(b"") returns the response or raises
    return interpret_exchange_response(response, now=now)


_PLACEHOLDER_ENDPOINT = ApiEndpoint(
    secure=False, host="localhost", port=80, authority="localhost", prefix=""
)
_PLACEHOLDER_TOKEN = "vAc_" + "0" * 32


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _result_from(body: bytes) -> PairingResult:
    envelope = _json_object(body)
    data = envelope.get("data") if envelope is not None else None
    if envelope is None or envelope.get("success") is not True or not isinstance(data, dict):
        raise PairingFailed(
            "the api-server answered 200 without the expected JSON body", status=200
        )
    fields: dict[str, str] = {}
    for name in ("device_id", "device_token", "relay_url"):
        value = data.get(name)
        if not isinstance(value, str) or not value or not value.isprintable():
            raise PairingFailed(f"the api-server's answer has no valid {name!r}", status=200)
        fields[name] = value
    try:
        check_relay_url(fields["relay_url"])
    except ValueError as exc:
        raise PairingFailed(
            f"the api-server's relay_url is not usable ({exc}; is its "
            "VISIONA_TUNNEL_PUBLIC_URL right?)",
            status=200,
        ) from None
    return PairingResult(fields["device_id"], fields["device_token"], fields["relay_url"])


def _error_from(body: bytes) -> tuple[str | None, str | None, str | None]:
    """``code``, ``message``, ``request_id`` of an error body, where there are such."""
    envelope = _json_object(body)
    error = envelope.get("error") if envelope is not None else None
    if not isinstance(error, dict):
        return None, None, None
    code, message, request_id = (_clean(error.get(name)) for name in _ERROR_FIELDS)
    return code, message, request_id


_ERROR_FIELDS = ("code", "message", "request_id")


def _clean(value: object) -> str | None:
    """A server's string, clipped and printable (it is logged); None if not a string."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:_MAX_MESSAGE])


# -- trio -------------------------------------------------------------------------------------


async def exchange_pairing_token(
    api_url: str,
    pairing_token: str,
    *,
    timeout: float = EXCHANGE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    max_response_size: int = MAX_RESPONSE_SIZE,
) -> PairingResult:
    """One exchange: connect (TLS for ``https``), send the request, read the answer, all
    within ``timeout`` seconds.

    Raises:
        ValueError: ``api_url`` or ``pairing_token`` is malformed (before any I/O).
        PairingRefused, PairingFailed, PairingUnavailable: see the module's table.
    """
    endpoint = parse_api_url(api_url)
    exchange = PairingExchange(endpoint, pairing_token, max_response_size=max_response_size)
    with trio.move_on_after(timeout):
        try:
            response = await _exchange(endpoint, exchange, ssl_context)
        except (OSError, trio.BrokenResourceError) as exc:
            raise PairingUnavailable(
                f"could not reach the api-server at {endpoint.host}:{endpoint.port}: "
                f"{_describe(exc)}"
            ) from None
        return interpret_exchange_response(response)
    raise PairingUnavailable(f"no answer from the api-server within {timeout:g} s")


async def _exchange(
    endpoint: ApiEndpoint, exchange: PairingExchange, ssl_context: ssl.SSLContext | None
) -> ExchangeResponse:
    stream: trio.abc.Stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    try:
        if endpoint.secure:
            stream = trio.SSLStream(
                stream,
                ssl_context or ssl.create_default_context(),
                server_hostname=endpoint.host,
                https_compatible=True,
            )
        await stream.send_all(exchange.request)
        while True:
            data = await stream.receive_some(16384)
            response = exchange.receive_data(bytes(data))
            if response is not None:
                return response
    finally:
        await trio.aclose_forcefully(stream)


def _describe(exc: BaseException) -> str:
    """An error and its cause in a few words (trio wraps TLS errors in BrokenResourceError)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        text = f"{text}: {cause}" if str(exc) else str(cause) or type(cause).__name__
    return text


async def pair_device(
    api_url: str,
    pairing_token: str,
    *,
    backoff_base: float = 1.0,
    backoff_cap: float = 30.0,
    backoff_jitter: float = 0.0,
    timeout: float = EXCHANGE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    on_retry: Callable[[int, PairingUnavailable, float], None] | None = None,
) -> PairingResult:
    """:func:`exchange_pairing_token` until it succeeds or fails for good.

    After the ``n``-th :class:`PairingUnavailable` it waits ``backoff(n)`` (as the tunnel
    client between dials) or the server's ``Retry-After``, whichever is longer, after
    logging a warning and calling ``on_retry(n, error, delay)``. Cancel it to stop.

    Raises:
        ValueError: as :func:`exchange_pairing_token`. PairingRefused, PairingFailed.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await exchange_pairing_token(
                api_url, pairing_token, timeout=timeout, ssl_context=ssl_context
            )
        except PairingUnavailable as exc:
            delay = backoff(attempt, base=backoff_base, cap=backoff_cap, jitter=backoff_jitter)
            if exc.retry_after is not None and math.isfinite(exc.retry_after):
                delay = max(delay, exc.retry_after)
            logger.warning(
                "pairing failed, will retry",
                extra={
                    "attempt": attempt,
                    "error": str(exc),
                    "status": exc.status,
                    "request_id": exc.request_id,
                    "delay": delay,
                },
            )
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await trio.sleep(delay)
